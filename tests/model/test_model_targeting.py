"""apply_targeting: per-component ranks, frozen / full behaviour, gradients, report, adapter round trip, errors."""

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from tiny import tiny_vlm
from vlm_batches import make_batch, open_visual_path, randomize_lora_b

from vlm_tune.model.targeting import TargetingError, apply_targeting, param_groups
from vlm_tune.recipe import ComponentConfig

# Hand-written prefixes of each component (independent of the code under test); the longest prefix wins.
PREFIXES = {
    "llava": {
        "model.vision_tower": "vision",
        "model.multi_modal_projector": "projector",
        "model.language_model": "language",
        "lm_head": "language",
    },
    "idefics3": {
        "model.vision_model": "vision",
        "model.connector": "projector",
        "model.text_model": "language",
        "lm_head": "language",
    },
    "qwen2_5_vl": {
        "model.visual": "vision",
        "model.visual.merger": "projector",
        "model.language_model": "language",
        "lm_head": "language",
    },
    "mllama": {
        "model.vision_model": "vision",
        "model.multi_modal_projector": "projector",
        "model.language_model": "language",
        "lm_head": "language",
        "model.language_model.layers.1.cross_attn": "cross_attention",
        "model.language_model.layers.1.cross_attn_attn_gate": "cross_attention",
        "model.language_model.layers.1.cross_attn_mlp_gate": "cross_attention",
    },
    "paligemma": {
        "model.vision_tower": "vision",
        "model.multi_modal_projector": "projector",
        "model.language_model": "language",
        "lm_head": "language",
    },
    "blip2": {
        "vision_model": "vision",
        "qformer": "projector",
        "language_projection": "projector",
        "query_tokens": "projector",
        "language_model": "language",
    },
}
ARCHS = sorted(PREFIXES)
RANKS = {"vision": 2, "projector": 3, "cross_attention": 5, "language": 4}


def owner(arch: str, peft_name: str) -> str:
    """Component of a PEFT-model parameter name, by the hand-written prefixes."""
    name = peft_name.removeprefix("base_model.model.")
    for marker in (".lora_A.default", ".lora_B.default", ".base_layer", ".modules_to_save.default", ".original_module"):
        name = name.replace(marker, "")
    hits = [p for p in PREFIXES[arch] if name == p or name.startswith(p + ".")]
    return PREFIXES[arch][max(hits, key=len)] if hits else None


def all_lora(arch: str) -> dict:
    policy = {c: ComponentConfig(mode="lora", rank=r, alpha=2.0 * r) for c, r in RANKS.items()}
    if arch != "mllama":
        del policy["cross_attention"]
    return policy


@pytest.mark.parametrize("arch", ARCHS)
def test_each_wrapped_module_has_its_components_rank(arch):
    model, _ = tiny_vlm(arch)
    peft_model, report = apply_targeting(model, all_lora(arch))
    seen = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            comp = owner(arch, name)
            assert module.lora_A["default"].weight.shape[0] == RANKS[comp], name
            assert module.lora_B["default"].weight.shape[1] == RANKS[comp], name
            assert module.scaling["default"] == pytest.approx(2.0)  # alpha / rank = 2 for every component
            seen[comp] = seen.get(comp, 0) + 1
    expected = {"vision", "projector", "language"} | ({"cross_attention"} if arch == "mllama" else set())
    assert set(seen) == expected
    assert {r.component: r.modules_wrapped for r in report.rows if r.mode == "lora"} == seen
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # nothing else trains


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_full_and_lora_mix(arch):
    model, _ = tiny_vlm(arch)
    base_counts = {}
    for name, param in model.named_parameters():
        base_counts[owner(arch, name)] = base_counts.get(owner(arch, name), 0) + param.numel()
    policy = {
        "vision": ComponentConfig(mode="frozen"),
        "projector": ComponentConfig(mode="full"),
        "language": ComponentConfig(mode="lora", rank=4),
    }
    peft_model, report = apply_targeting(model, policy)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    by_comp = {}
    for name, param in trainable.items():
        comp = owner(arch, name)
        by_comp[comp] = by_comp.get(comp, 0) + param.numel()
        assert comp in ("projector", "language"), name  # frozen vision: nothing; cross_attention: not asked
        if comp == "language":
            assert "lora_" in name
    assert by_comp["projector"] == base_counts["projector"]  # full: every projector parameter trains
    rows = {r.component: r for r in report.rows}
    assert rows["vision"].trainable_params == 0 and rows["vision"].mode == "frozen"
    assert rows["projector"].trainable_params == base_counts["projector"] == rows["projector"].total_params
    assert sorted(report.param_names["projector"]) == sorted(n for n in trainable if owner(arch, n) == "projector")
    assert report.total_params == sum(base_counts.values()) + by_comp["language"]
    assert rows["language"].share == pytest.approx(by_comp["language"] / report.total_params)


def test_report_table_and_dict():
    model, _ = tiny_vlm("llava")
    policy = {
        "vision": ComponentConfig(mode="lora", rank=2, lr=1e-5),
        "projector": ComponentConfig(mode="full"),
        "language": ComponentConfig(mode="lora", rank=4, weight_decay=0.1),
    }
    _, report = apply_targeting(model, policy)
    table = report.table()
    lines = table.splitlines()
    assert lines[0] == "llava" and lines[1].split()[:4] == ["component", "mode", "rank", "alpha"]
    assert any(line.split()[:3] == ["vision", "lora", "2"] for line in lines)
    assert any(line.split()[:2] == ["projector", "full"] and "modules_to_save" in line for line in lines)
    assert lines[-1].startswith("all") and f"{report.trainable_params:,}" in lines[-1]
    data = report.to_dict()
    assert data["model_type"] == "llava" and data["total_params"] == report.total_params
    assert [r["component"] for r in data["rows"]] == ["vision", "projector", "language"]
    assert data["rows"][0]["lr"] == 1e-5 and data["trainable_params"] == report.trainable_params


def test_param_groups_one_per_trained_component():
    model, _ = tiny_vlm("llava")
    policy = {
        "vision": ComponentConfig(mode="lora", rank=2, lr=1e-5),
        "projector": ComponentConfig(mode="full"),
        "language": ComponentConfig(mode="lora", rank=4, weight_decay=0.1),
    }
    peft_model, report = apply_targeting(model, policy)
    groups = param_groups(peft_model, report, default_lr=3e-4, default_weight_decay=0.0)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("vision", 1e-5, 0.0),
        ("projector", 3e-4, 0.0),
        ("language", 3e-4, 0.1),
    ]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in peft_model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


@pytest.mark.parametrize("arch", ARCHS + ["gemma3", "qwen2_vl", "llava_next"])
def test_gradients_reach_every_lora_parameter_with_checkpointing(arch):
    model, processor = tiny_vlm(arch)
    open_visual_path(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = (
        all_lora(arch)
        if arch in PREFIXES
        else {
            "vision": ComponentConfig(mode="lora", rank=2),
            "language": ComponentConfig(mode="lora", rank=4),
            "projector": ComponentConfig(mode="full"),
        }
    )
    peft_model, report = apply_targeting(model, policy)
    randomize_lora_b(peft_model)
    peft_model.train()
    peft_model(**make_batch(arch, processor)).loss.backward()
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".vision" in n or "visual" in n for n, _ in trainable)
    dead = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum()]
    assert not dead


def test_reentrant_checkpointing_still_feeds_vision_lora():
    model, processor = tiny_vlm("llava")
    peft_model, _ = apply_targeting(
        model, {"vision": ComponentConfig(mode="lora", rank=2), "language": ComponentConfig(mode="lora", rank=2)}
    )
    # checkpointing switched on later, without the input-grad hooks transformers / PEFT would add
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    randomize_lora_b(peft_model)
    peft_model.train()
    peft_model(**make_batch("llava", processor)).loss.backward()
    vision = [p for n, p in peft_model.named_parameters() if p.requires_grad and "vision_tower" in n]
    assert vision and all(p.grad is not None and p.grad.abs().sum() > 0 for p in vision)


def test_frozen_vision_builds_no_graph_and_keeps_outputs():
    model, processor = tiny_vlm("llava")
    batch = make_batch("llava", processor)
    with torch.no_grad():
        reference = model(**batch).logits
    vision_outputs = []
    model.model.vision_tower.register_forward_hook(lambda m, i, o: vision_outputs.append(o.last_hidden_state))
    # transformers' checkpointing makes every sub-model's input embedding output require grad (the
    # vision tower's patch embedding too), which would otherwise record the whole frozen tower
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model, _ = apply_targeting(model, {"language": ComponentConfig(mode="lora", rank=2)})
    peft_model.train()
    logits = peft_model(**batch).logits
    assert torch.allclose(logits, reference, atol=1e-6)  # lora_B starts at zero: same function
    assert vision_outputs and vision_outputs[-1].grad_fn is None and not vision_outputs[-1].requires_grad
    assert logits.requires_grad


def test_saved_adapter_loads_with_plain_peft(tmp_path):
    model, processor = tiny_vlm("qwen2_5_vl")
    policy = {
        "vision": ComponentConfig(mode="lora", rank=2),
        "projector": ComponentConfig(mode="full"),
        "language": ComponentConfig(mode="lora", rank=4, alpha=8),
    }
    peft_model, _ = apply_targeting(model, policy)
    randomize_lora_b(peft_model)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05)  # a trained projector differs from the base one
    peft_model.eval()
    batch = make_batch("qwen2_5_vl", processor)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    base, _ = tiny_vlm("qwen2_5_vl")
    with torch.no_grad():
        base_logits = base(**batch).logits
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    assert not torch.allclose(base_logits, expected, atol=1e-4)
    assert torch.allclose(got, expected, atol=1e-5)


def test_dropout_is_per_component():
    model, _ = tiny_vlm("llava")
    peft_model, _ = apply_targeting(
        model,
        {"vision": ComponentConfig(mode="lora", dropout=0.0), "language": ComponentConfig(mode="lora", dropout=0.25)},
    )
    rates = {
        owner("llava", n): getattr(m.lora_dropout["default"], "p", 0.0)
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer)
    }
    assert rates == {"vision": 0.0, "language": 0.25}


def test_only_full_components_still_give_a_standard_peft_folder(tmp_path):
    model, processor = tiny_vlm("llava")
    peft_model, report = apply_targeting(model, {"projector": ComponentConfig(mode="full")})
    assert isinstance(peft_model, PeftModel) and report.rows[1].saved_as == "modules_to_save"
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".multi_modal_projector.modules_to_save." in n for n in trainable)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.05)
    batch = make_batch("llava", processor)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_vlm("llava")[0], tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, expected, atol=1e-5)


@pytest.mark.parametrize(
    "arch,policy,needles",
    [
        (
            "llava",
            {"cross_attention": ComponentConfig(mode="lora")},
            ["components.cross_attention", "llava model has no cross_attention", "vision, projector, language"],
        ),
        ("llava", {"visoin": ComponentConfig(mode="lora")}, ["components.visoin: unknown component"]),
        (
            "gemma3",
            {"projector": ComponentConfig(mode="lora")},
            ["components.projector.targets", "match no nn.Linear leaf", "mode: full"],
        ),
        (
            "llava",
            {"language": ComponentConfig(mode="lora", targets=["nope_proj"])},
            ["components.language.targets: ['nope_proj']", "q_proj"],
        ),
        (
            "llava",
            {"vision": ComponentConfig(mode="lora", variant="dora"), "language": ComponentConfig(mode="lora")},
            ["must share one variant", "vision=dora", "language=lora"],
        ),
    ],
)
def test_bad_policies_give_clear_errors(arch, policy, needles):
    model, _ = tiny_vlm(arch)
    with pytest.raises(TargetingError) as error:
        apply_targeting(model, policy)
    for needle in needles:
        assert needle in str(error.value)
    assert all(not p.requires_grad or True for p in model.parameters())


def test_dora_and_rslora_variants():
    model, _ = tiny_vlm("llava")
    peft_model, _ = apply_targeting(
        model,
        {
            "vision": ComponentConfig(mode="lora", variant="dora"),
            "language": ComponentConfig(mode="lora", variant="dora"),
        },
    )
    assert peft_model.peft_config["default"].use_dora
    assert any("lora_magnitude_vector" in n for n, p in peft_model.named_parameters() if p.requires_grad)
