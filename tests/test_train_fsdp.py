"""FSDP2 through `accelerate launch` with recipes/accelerate/fsdp*.yaml: on 2 CPU processes (gloo, through
tests/cpu_fsdp.py) the losses equal one process's at the same global batch, and the checkpoints load in one
process and resume with either process count. The gpu-marked tests launch the same configs on 2 GPUs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import _coco_set
from test_train_conversations import _conversations
from tiny import tiny_vlm, tiny_vlm_folder

from vlm_tune.recipe import recipe_from_dict
from vlm_tune.run_log import read_log
from vlm_tune.train import train
from vlm_tune.training_state import read_training_state

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "recipes" / "accelerate"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return {
        "model": str(tiny_vlm_folder("idefics3", root / "model")),
        "captions": str(_coco_set(root / "data")),
        "chat": str(_conversations(root / "chat")),
    }


def _recipe(setup, output_dir, **train_fields) -> dict:
    """LoRA on vision and language, the projector fully trained, relevance modules with their own lr."""
    captions = {"format": "coco", "path": setup["captions"]}
    return {
        "model": {"name_or_path": setup["model"], "dtype": "float32", "attn_implementation": "eager"},
        "components": {
            "vision": {"mode": "lora", "rank": 4},
            "projector": {"mode": "full", "lr": 1e-3},
            "language": {"mode": "lora", "rank": 4, "alpha": 8, "lr": 3e-3},
        },
        "relevance": {"enabled": True, "keep": 0.5, "lr": 1e-2},
        "data": {"train": captions, "eval": captions},
        "eval": {"use_java": False, "generate_limit": 4, "max_new_tokens": 4},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 4,
            "grad_accum": 2,
            "mixed_precision": "no",
            "save_every": 2,
            "seed": 3,
            "schedule": "cosine",
            "warmup_steps": 1,
            **train_fields,
        },
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(recipe: dict, tmp_path: Path, config: str = "fsdp.yaml", gpu: bool = False, env: dict | None = None):
    """`accelerate launch --config_file recipes/accelerate/CONFIG` of the training command on 2 processes
    (CPU: through tests/cpu_fsdp.py, since accelerate keeps FSDP for GPU backends only)."""
    path = tmp_path / f"{Path(recipe['train']['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    paths = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keeps a carried site folder
    environment = {**os.environ, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1", **(env or {})}
    if not gpu:
        environment["ACCELERATE_USE_CPU"] = "1"
    entry = ["-m", "vlm_tune.train"] if gpu else [str(REPO / "tests" / "cpu_fsdp.py")]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    command += ["--num_processes", "2", "--main_process_port", str(_free_port()), *entry, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_log(Path(run_dir) / "log.jsonl") if "train/loss" in r}


def _logged(run_dir, prefix: str) -> list[float]:
    """Every logged value whose key starts with `prefix`, in log order."""
    records = read_log(Path(run_dir) / "log.jsonl")
    return [value for r in records for key, value in sorted(r.items()) if key.startswith(prefix)]


def _assert_same_losses(single, sharded, steps, abs_tol=1e-4):
    assert sorted(single) == sorted(sharded) == steps
    for step in steps:
        assert sharded[step] == pytest.approx(single[step], abs=abs_tol), step


def _assert_same_checkpoints(one: Path, two: Path):
    """The same files, keys and (within float tolerance) values, the optimizer state included."""
    assert sorted(p.name for p in one.rglob("*") if p.is_file()) == sorted(
        p.name for p in two.rglob("*") if p.is_file()
    )
    for name in ("adapter/adapter_model.safetensors", "relevance.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5), (name, key)
    a, b = (read_training_state(c)["optimizer"] for c in (one, two))
    assert [g["name"] for g in b["param_groups"]] == ["vision", "projector", "language", "relevance"]
    assert [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]]
    assert a["state"].keys() == b["state"].keys()
    for index, entry in a["state"].items():
        for key, value in entry.items():  # full tensors, not one process's shards
            assert torch.allclose(value, b["state"][index][key], atol=1e-6), (index, key)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_its_checkpoints_resume_with_either_process_count(setup, tmp_path):
    """Same global batch (4: 2 x 2 micro-batches, or 1 x 2 on each of 2 processes): same losses, eval loss,
    caption scores, checkpoint files and optimizer state; each run resumes from the other's checkpoint-2."""
    from vlm_tune.model.build import load_for_inference

    one = _recipe(setup, tmp_path / "one", batch_size=2, eval_generate_every=4)
    two = _recipe(setup, tmp_path / "two", batch_size=1, eval_generate_every=4)
    for recipe in (one, two):
        recipe["eval"]["generate_limit"] = 2
    train(recipe_from_dict(one))
    launch(two, tmp_path)
    _assert_same_losses(_losses(tmp_path / "one"), _losses(tmp_path / "two"), [1, 2, 3, 4])
    # eval/loss, and the caption metrics (every process generated under FSDP)
    assert _logged(tmp_path / "two", "eval/") == pytest.approx(_logged(tmp_path / "one", "eval/"), abs=1e-5)
    _assert_same_checkpoints(tmp_path / "one" / "checkpoint-4", tmp_path / "two" / "checkpoint-4")

    train(
        recipe_from_dict(
            _recipe(setup, tmp_path / "one-from-two", batch_size=2, resume=str(tmp_path / "two" / "checkpoint-2"))
        )
    )
    launch(
        _recipe(setup, tmp_path / "two-from-one", batch_size=1, resume=str(tmp_path / "one" / "checkpoint-2")), tmp_path
    )
    for resumed in ("one-from-two", "two-from-one"):  # steps 3 and 4 need the gathered / re-sharded optimizer state
        _assert_same_losses(
            {s: v for s, v in _losses(tmp_path / "one").items() if s > 2}, _losses(tmp_path / resumed), [3, 4]
        )

    model, _ = load_for_inference(recipe_from_dict(one), tmp_path / "two")  # evaluate's path: one process
    saved = load_file(tmp_path / "two" / "checkpoint-4" / "relevance.safetensors")
    assert all(torch.equal(saved[key], value) for key, value in model.relevance.state_dict().items())


@pytest.mark.slow
def test_fsdp_shards_a_4bit_base_and_runs_the_frozen_vision_tower_on_every_process(setup, tmp_path):
    """QLoRA under fsdp_qlora.yaml on conversations, one process reading the text-only one at every step.

    The packed 4-bit weights are stored in the compute dtype and sharded. FSDP gathers the frozen vision layers
    in every forward, so the text-only micro-batch gets the dummy image (without it gloo aborts on the
    mismatched collectives); the losses equal one process's, which reads both conversations in one batch.
    """
    one = _recipe(setup, tmp_path / "one", batch_size=2, grad_accum=1, max_steps=3, save_every=0)
    two = _recipe(setup, tmp_path / "two", batch_size=1, grad_accum=1, max_steps=3, save_every=0)
    for recipe in (one, two):
        recipe["model"]["quantization"] = {"compute_dtype": "float32"}
        recipe["components"] = {"language": {"mode": "lora", "rank": 4, "lr": 1e-2}}
        recipe["relevance"]["enabled"] = False
        recipe["data"] = {"train": {"format": "messages", "path": setup["chat"]}}
    train(recipe_from_dict(one))
    launch(two, tmp_path, config="fsdp_qlora.yaml", env={"CPU_FSDP_SHARDS": str(tmp_path / "shards.json")})
    _assert_same_losses(_losses(tmp_path / "one"), _losses(tmp_path / "two"), [1, 2, 3])
    shards = json.loads((tmp_path / "shards.json").read_text())
    packed = shards["base_model.model.model.text_model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert packed[2] == "torch.float32" and packed[1][0] * 2 == packed[0][0]  # 4-bit bytes as fp32, half each


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp.yaml", "fsdp_qlora.yaml"])
def test_fsdp_on_two_gpus_matches_one_gpu(setup, tmp_path, config):
    """The real launch (no CPU shim, NCCL), in bf16; 4-bit with fsdp_qlora.yaml."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    one = _recipe(setup, tmp_path / "one", batch_size=2, mixed_precision="bf16", eval_generate_every=4)
    two = _recipe(setup, tmp_path / "two", batch_size=1, mixed_precision="bf16", eval_generate_every=4)
    if config == "fsdp_qlora.yaml":
        for recipe in (one, two):
            recipe["model"]["quantization"] = {"compute_dtype": "bfloat16"}
    train(recipe_from_dict(one))
    launch(two, tmp_path, config=config, gpu=True)
    _assert_same_losses(_losses(tmp_path / "one"), _losses(tmp_path / "two"), [1, 2, 3, 4], abs_tol=2e-2)
    train(recipe_from_dict(_recipe(setup, tmp_path / "one-from-two", batch_size=2, resume=str(tmp_path / "two"))))
    assert sorted(_losses(tmp_path / "one-from-two")) == [3, 4]


# --- without processes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "units"),
    [
        ("idefics3", {"Idefics3EncoderLayer", "LlamaDecoderLayer"}),
        ("qwen2_5_vl", {"Qwen2_5_VLVisionBlock", "Qwen2_5_VLDecoderLayer"}),
        (
            "mllama",  # its vision layers are not checkpointable one by one: found through _no_split_modules
            {"MllamaVisionEncoderLayer", "MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"},
        ),
    ],
)
def test_fsdp_units_are_the_models_repeated_layers(arch, units):
    from vlm_tune.distributed import layer_classes

    model, _ = tiny_vlm(arch)
    assert set(layer_classes(model)) == units


def test_fsdp_units_include_the_relevance_modules(setup):
    from vlm_tune.distributed import layer_classes
    from vlm_tune.model.build import build_model

    recipe = recipe_from_dict(_recipe(setup, "unused"))
    assert layer_classes(build_model(recipe).model) == ["Idefics3EncoderLayer", "LlamaDecoderLayer", "RelevanceModules"]


def test_fsdp_settings_it_cannot_use_are_named_together(setup, monkeypatch):
    from vlm_tune.distributed import ShardingError, fsdp_plugin

    recipe = recipe_from_dict(_recipe(setup, "unused"))
    assert fsdp_plugin(recipe) is None  # not launched with an FSDP config
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    recipe.speed.optimizer = "paged_adamw_8bit"
    recipe.components["language"].variant = "adalora"
    with pytest.raises(ShardingError) as error:
        fsdp_plugin(recipe)
    names = ("speed.optimizer: paged_adamw_8bit", "fsdp_activation_checkpointing", "set fsdp_version: 2")
    for name in (*names, "components.language: mode lora, variant adalora"):
        assert name in str(error.value)


def test_fsdp_plugin_gathers_parameters_in_their_own_dtype(setup, monkeypatch):
    from vlm_tune.distributed import fsdp_plugin

    for name, value in {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    }.items():
        monkeypatch.setenv(name, value)
    plugin = fsdp_plugin(recipe_from_dict(_recipe(setup, "unused")))
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap is None  # named from the model later
    assert plugin.mixed_precision_policy.param_dtype is None and plugin.mixed_precision_policy.reduce_dtype is None


def test_4bit_weights_are_stored_in_the_compute_dtype_and_not_placed_under_fsdp(monkeypatch):
    import vlm_tune.model.load as load
    from vlm_tune.model.components import find_components
    from vlm_tune.recipe import QuantizationConfig

    model, _ = tiny_vlm("idefics3")
    cmap = find_components(model)
    quant = QuantizationConfig(compute_dtype="bfloat16")
    storage_alone = load.bnb_config(quant, cmap, []).bnb_4bit_quant_storage
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert (storage_alone, load.bnb_config(quant, cmap, []).bnb_4bit_quant_storage) == (torch.uint8, torch.bfloat16)
    monkeypatch.setattr(load.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(load.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert load._device_map(True) is None  # FSDP places the shards
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert load._device_map(True) == {"": 1}  # DDP: each process's own GPU


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_accelerate_configs_are_read_by_accelerate(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(CONFIGS / config))
    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "fsdp_qlora.yaml": "FSDP"}[config]
    assert str(loaded.distributed_type).split(".")[-1] == expected
    if expected == "FSDP":
        assert loaded.fsdp_config["fsdp_version"] == 2 and not loaded.fsdp_config["fsdp_activation_checkpointing"]


def _agree_on_data(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE="2", ACCELERATE_USE_CPU="1")
    from types import SimpleNamespace

    from accelerate import Accelerator

    from vlm_tune.distributed import usable_on_every_process
    from vlm_tune.train_step import every_process_has_data

    accelerator = Accelerator(cpu=True)
    steps = [every_process_has_data(group, accelerator) for group in ([{}], [] if rank else [{}], [])]
    # grad_accum 2, process 0's second micro-batch and process 1's first hold no usable sample
    good, bad = {"input_ids": rank}, {}
    group = [good, bad] if rank == 0 else [bad, good]
    sharded = SimpleNamespace(is_fsdp2=True, num_processes=2, device=accelerator.device, reduce=accelerator.reduce)
    both = [{"input_ids": rank, "position": 0}, {"input_ids": rank, "position": 1}]
    kept = {
        "fsdp": usable_on_every_process(group, sharded),
        "ddp": usable_on_every_process(group, accelerator),
        "fsdp, both usable": [batch["position"] for batch in usable_on_every_process(both, sharded)],
    }
    results[rank] = {"steps": steps, "kept": kept}
    accelerator.wait_for_everyone()


def test_a_step_runs_only_when_every_process_has_a_micro_batch():
    """All processes skip a step alike, and under FSDP run as many micro-batches: a process without one would
    leave the others waiting in the weights' all-gather."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_agree_on_data, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank]["steps"] == [True, False, False]
        # FSDP: every process runs as many forwards (none here); DDP keeps each process's own usable batch
        kept = {"fsdp": [], "ddp": [{"input_ids": rank}], "fsdp, both usable": [0, 1]}
        assert results[rank]["kept"] == kept


def test_text_only_batches_get_the_dummy_image_under_fsdp_even_with_a_frozen_vision_side(setup):
    from types import SimpleNamespace

    from vlm_tune.data.keepalive import needs_dummy_images

    frozen = _recipe(setup, "unused")
    frozen["components"] = {"language": {"mode": "lora", "rank": 4}}
    frozen["relevance"]["enabled"] = False
    frozen, trains = recipe_from_dict(frozen), recipe_from_dict(_recipe(setup, "unused"))

    def accelerator(processes, fsdp):
        return SimpleNamespace(num_processes=processes, is_fsdp2=fsdp)

    assert not needs_dummy_images(frozen, accelerator(2, False))  # DDP: nothing on the vision side waits
    assert needs_dummy_images(trains, accelerator(2, False))  # DDP waits for the vision side's gradients
    assert needs_dummy_images(frozen, accelerator(2, True))  # FSDP gathers the frozen vision layers too
    assert not needs_dummy_images(trains, accelerator(1, True))  # one process waits for no one
