"""Training on conversations: VQA metrics during training, and the known DDP hang when one process's
micro-batch has no image (2 CPU processes, gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tiny import tiny_vlm_folder

from vlm_tune.recipe import recipe_from_dict
from vlm_tune.run_log import read_log
from vlm_tune.train import train

REPO = Path(__file__).resolve().parent.parent


def _conversations(folder: Path) -> Path:
    """Two conversations: one about an image, one text-only."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (220, 30, 30)).save(folder / "red.png")
    rows = [
        {
            "id": "image",
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": "red"},
            ],
            "images": ["red.png"],
            "answers": ["red"],
        },
        {
            "id": "text",
            "messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}],
        },
    ]
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _recipe(model: str, data: Path, output_dir: Path, **train_fields) -> dict:
    return {
        "model": {"name_or_path": model, "dtype": "float32", "attn_implementation": "eager"},
        "components": {
            "vision": {"mode": "full"},
            "projector": {"mode": "full"},
            "language": {"mode": "lora", "rank": 4},
        },
        "data": {"train": {"format": "messages", "path": str(data)}},
        "train": {"output_dir": str(output_dir), "batch_size": 1, "mixed_precision": "no", "lr": 1e-2, **train_fields},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return str(tiny_vlm_folder("idefics3", root / "model")), _conversations(root / "data")


def test_vqa_metrics_are_logged_during_training(setup, tmp_path):
    model, data = setup
    raw = _recipe(model, data, tmp_path / "run", max_steps=2, batch_size=2, eval_generate_every=2)
    raw["data"]["eval"] = {"format": "messages", "path": str(data), "task": "vqa"}
    raw["eval"] = {"generate_limit": 2, "max_new_tokens": 3}
    train(recipe_from_dict(raw))
    scored = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "eval/vqa_accuracy" in r]
    assert [r["step"] for r in scored] == [0, 2]
    assert all(set(r) == {"step", "eval/exact_match", "eval/vqa_accuracy", "eval/anls"} for r in scored)


WORKER = """
import sys
import torch
from safetensors.torch import save_file
import vlm_tune.train as train_module
from vlm_tune.recipe import load_recipe

if sys.argv[3] == "no-dummy":  # the collective mismatch this guards against (a crash on gloo, a hang on NCCL)
    import vlm_tune.data.keepalive as keepalive
    keepalive.vision_side_trains = lambda recipe: False
seen = {}
real_step = train_module.train_step

def recording_step(run, group, *args, **kwargs):
    seen["model"] = run.model
    seen.setdefault("rows", []).append(group[0]["input_ids"].shape[0])  # 2: text-only sample + dummy image
    return real_step(run, group, *args, **kwargs)

train_module.train_step = recording_step
train_module.train(load_recipe(sys.argv[1]))
rank = torch.distributed.get_rank()
params = {n: p.detach().cpu().contiguous() for n, p in seen["model"].named_parameters() if p.requires_grad}
params["_rows"] = torch.tensor(seen["rows"])
save_file(params, f"{sys.argv[2]}/params-{rank}.safetensors")
"""


def run_two_processes(setup, tmp_path, mode: str = "dummy", timeout: int = 300) -> subprocess.CompletedProcess:
    """Train on 2 CPU processes where one process's micro-batch is always the text-only sample."""
    model, data = setup
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(model, data, tmp_path / "run", max_steps=3)))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, str(worker), str(recipe), str(tmp_path), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.slow
def test_two_processes_finish_when_one_micro_batch_has_no_image(setup, tmp_path):
    result = run_two_processes(setup, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"params-{rank}.safetensors") for rank in (0, 1)]
    rows = [ranks[r].pop("_rows").tolist() for r in (0, 1)]
    assert all(sorted(step) == [1, 2] for step in zip(*rows))  # each step, one rank read the text-only sample
    assert ranks[0].keys() == ranks[1].keys() and any("vision_model" in name for name in ranks[0])
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
