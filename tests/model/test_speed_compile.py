"""speed.compile: layers computes what the eager path computes, keeps checkpoint keys, and refuses what it cannot do."""

import pytest
import torch
from safetensors.torch import load_file
from test_model_speed import _mllama_tile_batch
from tiny import tiny_vlm, tiny_vlm_folder
from vlm_batches import loss_and_grads, make_batch, randomize_lora_b

from vlm_tune.checkpoint import save_checkpoint
from vlm_tune.model.build import build_model
from vlm_tune.model.compile import _TrainingForward
from vlm_tune.model.components import find_components
from vlm_tune.model.load import _enable_checkpointing
from vlm_tune.model.speed import apply_speed
from vlm_tune.model.targeting import apply_targeting
from vlm_tune.recipe import ComponentConfig, ModelConfig, RecipeError, SpeedConfig, recipe_from_dict

LORA = ComponentConfig(mode="lora", rank=4, alpha=8.0)
DORA = ComponentConfig(mode="lora", rank=4, alpha=8.0, variant="dora")
CKPT = ModelConfig(gradient_checkpointing=True)
RTOL = 1e-4  # inductor reorders float32 sums; seen: 1e-6 relative at most on these models


def _count_compiled_calls(patches) -> list:
    """Record every call that goes to a compiled forward (rather than the block's own)."""
    calls = []
    for module in patches.handles[-1].modules:
        real = module.forward.compiled
        module.forward.compiled = lambda *args, _real=real, **kwargs: calls.append(1) or _real(*args, **kwargs)
    return calls


CASES = {  # case -> (arch, components, compiled blocks per component)
    "idefics3": ("idefics3", {"vision": LORA, "language": LORA}, {"vision": 2, "language": 2}),
    # PEFT's DoRA caches its weight norm in a dict: Dynamo leaves such layers (mostly) eager, the result holds
    "idefics3 dora": ("idefics3", {"language": DORA}, {"language": 2}),
    "qwen2_5_vl": ("qwen2_5_vl", {"language": LORA}, {"language": 2}),  # frozen vision in front: stays eager
    # cross-attention LoRA, the padding-tile drop (one real tile of two in the first sample), a trained projector
    "mllama": (
        "mllama",
        {"cross_attention": LORA, "language": LORA, "projector": ComponentConfig(mode="full")},
        {"language": 2},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_layers_give_the_eager_loss_and_gradients_with_checkpointing(case, caplog):
    arch, components, expected = CASES[case]
    model, processor = tiny_vlm(arch, 0)
    _enable_checkpointing(model)
    model, _ = apply_targeting(model, components)
    randomize_lora_b(model)
    model.train()
    batch = _mllama_tile_batch(processor) if arch == "mllama" else make_batch(arch, processor, batch_size=2)
    cmap = find_components(model.get_base_model())
    eager_patches = apply_speed(model, SpeedConfig(), CKPT, cmap)  # chunked loss, checkpointing
    eager = loss_and_grads(model, batch)
    eager_patches.remove()
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="vlm_tune"):
        patches = apply_speed(model, SpeedConfig(compile="layers"), CKPT, cmap)
    assert patches.compiled == expected
    # the DoRA warning names DoRA layers only (every PEFT LoRA layer has an empty magnitude-vector dict)
    assert ("DoRA layers break" in caplog.text) == ("dora" in case)
    calls = _count_compiled_calls(patches)
    torch._dynamo.utils.counters.clear()
    compiled = loss_and_grads(model, batch)
    assert len(calls) >= sum(expected.values())  # every block went to torch.compile (recomputes come on top)
    if "dora" not in case:  # Dynamo made graphs of them
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= len(
            {type(m) for m in patches.handles[-1].modules}
        )
    assert compiled[0] == pytest.approx(eager[0], rel=RTOL)
    assert compiled[1].keys() == eager[1].keys() and eager[1]
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=RTOL, atol=1e-6, msg=name)

    model.eval()  # evaluation and generate run the blocks' own forward
    calls.clear()
    with torch.no_grad():
        model(**batch)
    assert calls == []
    blocks = patches.handles[-1].modules
    patches.remove()
    assert blocks and not any(isinstance(module.forward, _TrainingForward) for module in blocks)


def _four_bit_step(folder, speed: dict, precision: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one QLoRA step (checkpointing, chunked loss), bf16 autocast or all fp32."""
    bf16 = precision == "bf16"
    raw = {
        "model": {
            "name_or_path": str(folder),
            "dtype": precision if not bf16 else "bfloat16",
            "gradient_checkpointing": True,
            "quantization": {"bits": 4, "compute_dtype": "bfloat16" if bf16 else "float32"},
        },
        "components": {"language": {"mode": "lora", "rank": 4}},
        "train": {"mixed_precision": "bf16" if bf16 else "no"},
        "speed": speed,
    }
    torch.manual_seed(0)  # the same LoRA A init in every build
    built = build_model(recipe_from_dict(raw))
    randomize_lora_b(built.model)
    built.model.train()
    batch = make_batch("qwen2_5_vl", built.processor, batch_size=2, model=built.model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = built.model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in built.model.named_parameters() if p.grad is not None}


def test_four_bit_layers_compile_into_one_graph_and_match_the_eager_step(tmp_path):
    pytest.importorskip("bitsandbytes")
    folder = tiny_vlm_folder("qwen2_5_vl", tmp_path)
    reference = _four_bit_step(folder, {}, "float32")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _four_bit_step(folder, {"compile": "layers"}, "float32")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # both decoder layers, no graph break
    assert compiled[0] == pytest.approx(reference[0], rel=RTOL)
    for name, grad in reference[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=RTOL, atol=1e-6, msg=name)
    # bf16 autocast: compiled kernels round differently; they are no further from the fp32 step than eager bf16 is
    errors = {}
    for name, speed in (("eager", {}), ("compiled", {"compile": "layers"})):
        grads = _four_bit_step(folder, speed, "bf16")[1]
        errors[name] = max(float((grads[k] - g).norm() / g.norm()) for k, g in reference[1].items())
    assert errors["compiled"] <= 1.5 * errors["eager"] + 1e-3, errors


def test_a_checkpoint_saved_with_compile_has_the_keys_of_one_saved_without(tmp_path):
    folder = tiny_vlm_folder("idefics3", tmp_path / "model")
    raw = {
        "model": {"name_or_path": str(folder), "dtype": "float32", "gradient_checkpointing": True},
        "components": {"language": {"mode": "lora", "rank": 4}},
        "train": {"mixed_precision": "no"},
    }
    plain = build_model(recipe_from_dict(raw))
    compiled = build_model(recipe_from_dict({**raw, "speed": {"compile": "layers"}}))
    randomize_lora_b(compiled.model)
    batch = make_batch("idefics3", compiled.processor)
    compiled.model.train()
    compiled.model(**batch).loss.backward()  # the compiled blocks have run
    files = {}
    for name, built in (("plain", plain), ("compiled", compiled)):
        (tmp_path / name).mkdir()
        checkpoint = save_checkpoint(tmp_path / name, 1, built.model, {"epoch": 0, "batches_done": 0})
        files[name] = {path.name: load_file(path) for path in checkpoint.rglob("*.safetensors")}
    assert files["plain"] and {k: sorted(v) for k, v in files["plain"].items()} == {
        k: sorted(v) for k, v in files["compiled"].items()
    }
    assert not any("_orig_mod" in key for tensors in files["compiled"].values() for key in tensors)
    loaded = build_model(recipe_from_dict(raw), checkpoint=tmp_path / "compiled", training=True)
    trained = dict(compiled.model.named_parameters())
    for name, param in loaded.model.named_parameters():
        if "lora_B" in name:
            assert torch.equal(param, trained[name]), name


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"relevance": {"enabled": True}}, "relevance.enabled"),
        ({"components": {"language": {"mode": "prompt"}}}, "components.language mode prompt"),
        ({"components": {"language": {"mode": "lora", "variant": "adalora", "target_rank": 2}}}, "variant adalora"),
        ({"speed": {"compile": "layers", "compile_components": ["decoder"]}}, "compile_components: unknown"),
    ],
)
def test_compile_with_what_it_cannot_combine_is_one_recipe_error_naming_the_fields(extra, field):
    raw = {"components": {"language": {"mode": "lora"}}, "speed": {"compile": "layers"}}
    with pytest.raises(RecipeError) as raised:
        recipe_from_dict({**raw, **extra})
    problems = [line for line in str(raised.value).splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and field in problems[0] and "speed." in problems[0]
    recipe_from_dict({**raw, **extra, "speed": {"compile": "none"}})  # the fix the message gives


@pytest.mark.slow  # three short training runs, with generation and a resume
def test_training_with_compile_gives_the_eager_losses_evaluates_generates_and_resumes(tmp_path):
    from test_train import SimulatedCrash, _coco_set, _losses, _recipe

    from vlm_tune.checkpoint import latest_checkpoint
    from vlm_tune.run_log import read_log
    from vlm_tune.train import train

    setup = {"model": str(tiny_vlm_folder("idefics3", tmp_path / "model")), "data": str(_coco_set(tmp_path / "data"))}

    def recipe(name: str, compile: str, **overrides):
        made = _recipe(setup, tmp_path / name, max_steps=4, eval_generate_every=2, **overrides)
        made.components["language"].dropout = 0.0  # compiled kernels draw other dropout masks
        made.model.gradient_checkpointing, made.speed.compile = True, compile
        made.eval.use_java, made.eval.generate_limit, made.eval.max_new_tokens = False, 2, 4
        return made

    def crash_at_three(step):
        if step == 3:
            raise SimulatedCrash

    train(recipe("eager", "none"))
    with pytest.raises(SimulatedCrash):
        train(recipe("compiled", "layers"), on_step=crash_at_three)
    assert latest_checkpoint(tmp_path / "compiled").name == "checkpoint-2"
    train(recipe("compiled", "layers", resume="auto"))
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert sorted(compiled) == sorted(eager) == [1, 2, 3, 4]
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=RTOL), step
    scored = [r["step"] for r in read_log(tmp_path / "compiled" / "log.jsonl") if "eval/CIDEr-D" in r]
    assert 2 in scored and 4 in scored  # captions generated (eagerly) between compiled steps, and after the resume


def test_fsdp_refuses_compile_naming_the_field(monkeypatch):
    from vlm_tune.distributed import ShardingError, fsdp_plugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    recipe = recipe_from_dict({"components": {"language": {"mode": "lora"}}, "speed": {"compile": "layers"}})
    with pytest.raises(
        ShardingError, match=r"speed.compile: layers is not checked under FSDP; set speed.compile: none"
    ):
        fsdp_plugin(recipe)
