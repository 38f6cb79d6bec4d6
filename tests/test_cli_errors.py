"""Every command line answers a user mistake with one `error: ...` line and exit code 2, never a traceback.

Each row of BAD_INPUTS runs one command in a subprocess (all rows at once, a few at a time). To cover a new
command (export, generate...), add rows: the module, its arguments (built from the `files` fixture), and a
piece of the message it must print.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from tiny import tiny_vlm_folder

from vlm_tune.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BadInput:
    """One mistake: `python -m MODULE ARGS` (run in `cwd`, default the repository root, with `env` added to
    the environment) must say `says`."""

    name: str
    module: str
    args: Callable[[dict], list[str]]
    says: str
    cwd: Callable[[dict], Path] = lambda files: ROOT
    env: tuple[tuple[str, str], ...] = ()


BAD_INPUTS = [
    # python -m vlm_tune.train
    BadInput("train: no recipe", "vlm_tune.train", lambda f: [], "the following arguments are required: recipe"),
    BadInput("train: recipe file missing", "vlm_tune.train", lambda f: [f["missing"]], "recipe file not found"),
    BadInput(
        "train: bad value", "vlm_tune.train", lambda f: [f["recipe"], "train.lr=-1"], "train.lr: must be positive"
    ),
    BadInput(
        "train: no model folder",
        "vlm_tune.train",
        lambda f: [f["recipe"], f"model.name_or_path={f['missing']}", f"train.output_dir={f['root']}/run-no-model"],
        "model.name_or_path: no such folder",
    ),
    BadInput(
        "train: init_from missing",
        "vlm_tune.train",
        lambda f: [f["recipe"], f"train.init_from={f['missing']}", f"train.output_dir={f['root']}/run-init"],
        "train.init_from: checkpoint",
    ),
    BadInput(
        "train: output_dir is a file",
        "vlm_tune.train",
        lambda f: [f["recipe"], f"train.output_dir={f['recipe']}"],
        "train.output_dir: cannot write the run folder",
    ),
    BadInput(
        "train: output_dir holds another run's checkpoints",
        "vlm_tune.train",
        lambda f: [f["recipe"], f"train.output_dir={f['reused_run']}"],
        "already holds checkpoints of a run (checkpoint-9); continue it with train.resume=auto",
    ),
    BadInput(
        "train: unknown attention implementation",
        "vlm_tune.train",
        lambda f: [f["recipe"], "model.attn_implementation=fastest"],
        "model.attn_implementation: unknown 'fastest'",
    ),
    BadInput(  # fails after the tiny model loads
        "train: relevance on blip-2",
        "vlm_tune.train",
        lambda f: [f["blip2_recipe"], "relevance.enabled=true", f"train.output_dir={f['root']}/run-blip2"],
        "model type 'blip-2' is not supported",
    ),
    BadInput(
        "train: loftq without quantization",
        "vlm_tune.train",
        lambda f: [f["recipe"], "components.language.init=loftq"],
        "components.language.init: loftq initialises LoRA from the 4-bit quantisation error",
    ),
    BadInput(
        "train: prompt on the vision encoder",
        "vlm_tune.train",
        lambda f: [f["recipe"], "components.vision.mode=prompt"],
        "components.vision.mode: prompt adds virtual tokens to the language decoder",
    ),
    BadInput(  # fails after the tiny model loads: 1 step leaves no room to re-allocate ranks
        "train: adalora schedule",
        "vlm_tune.train",
        lambda f: [f["recipe"], "components.language.variant=adalora", "train.adalora.final=1"],
        "train.adalora: warmup (0 steps) and final (1 steps) leave no step",
    ),
    BadInput(  # fails before the model loads
        "train: no training set",
        "vlm_tune.train",
        lambda f: [f["recipe"], "data.train=null", f"train.output_dir={f['root']}/run-no-data"],
        "data.train is not set",
    ),
    BadInput(
        "train: a Hugging Face key",
        "vlm_tune.train",
        lambda f: [f["recipe"], "train.learning_rate=1e-4"],
        "train.learning_rate: unknown key (a Hugging Face name; here it is train.lr)",
    ),
    BadInput(
        "train: keep_best of an unknown metric",
        "vlm_tune.train",
        lambda f: [f["recipe"], "train.keep_best=accuracy"],
        "train.keep_best: unknown metric 'accuracy'",
    ),
    BadInput(
        "train: wrong caption column",
        "vlm_tune.train",
        lambda f: [
            f["recipe"],
            "data.train.format=jsonl",
            f"data.train.path={f['rows']}",
            f"train.output_dir={f['root']}/run-cols",
        ],
        "no column ['caption']",
    ),
    BadInput(  # what `accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets
        "train: FSDP with the paged 8-bit optimizer",
        "vlm_tune.train",
        lambda f: [f["recipe"], "speed.optimizer=paged_adamw_8bit"],
        "speed.optimizer: paged_adamw_8bit cannot step sharded parameters",
        env=(("ACCELERATE_USE_FSDP", "true"), ("FSDP_VERSION", "2")),
    ),
    BadInput(
        "train: vision cache on a family it is not checked on",
        "vlm_tune.train",
        lambda f: [f["recipe"], "speed.vision_cache_gib=1", f"train.output_dir={f['root']}/run-vision-cache"],
        "speed.vision_cache_gib is not checked on idefics3 models (valid: qwen2_vl, qwen2_5_vl)",
    ),
    BadInput(  # fails after the tiny model loads
        "train: liger-kernel on a CPU",
        "vlm_tune.train",
        lambda f: [f["recipe"], "speed.liger_kernel=true", f"train.output_dir={f['root']}/run-liger"],
        "speed.liger_kernel runs Triton kernels on a CUDA GPU; set speed.liger_kernel: false on CPU",
    ),
    BadInput(
        "train: activation budget without checkpointing",
        "vlm_tune.train",
        lambda f: [f["recipe"], "speed.activation_budget_gib=2"],
        "speed.activation_budget_gib: chooses which checkpointed layers recompute",
    ),
    # python -m vlm_tune.evaluate
    BadInput("evaluate: nothing to do", "vlm_tune.evaluate", lambda f: [], "give a recipe"),
    BadInput(
        "evaluate: a checkpoint without a recipe near it",
        "vlm_tune.evaluate",
        lambda f: ["--checkpoint", f["bare_run"]],
        "no recipe.yaml in the checkpoint or its run folder",
    ),
    BadInput(
        "evaluate: latest without a run",
        "vlm_tune.evaluate",
        lambda f: ["--checkpoint", "latest"],
        "--checkpoint latest: name the run",
    ),
    BadInput(
        "evaluate: a run without a best checkpoint",
        "vlm_tune.evaluate",
        lambda f: [f["recipe"], "--checkpoint", f"{f['bare_run']}/best"],
        "has no best checkpoint (best.json): train with train.keep_best",
    ),
    BadInput(
        "evaluate: an earlier evaluation in the folder",
        "vlm_tune.evaluate",
        lambda f: [f["recipe"], "--output-dir", f["eval_a"]],
        "already holds an evaluation",
    ),
    BadInput(
        "evaluate: --split of a COCO file without a split name",
        "vlm_tune.evaluate",
        lambda f: [f["recipe"], f"data.eval.path={f['coco_plain']}", "--split", "test"],
        "a COCO file holds one split",
    ),
    BadInput(
        "evaluate: no eval set", "vlm_tune.evaluate", lambda f: [f["recipe"], "data.eval=null"], "data.eval is not set"
    ),
    BadInput(
        "evaluate: checkpoint missing",
        "vlm_tune.evaluate",
        lambda f: [f["recipe"], "--checkpoint", f["missing"]],
        "does not exist",
    ),
    BadInput(
        "evaluate: output folder is a file",
        "vlm_tune.evaluate",
        lambda f: [f["recipe"], "--output-dir", f["recipe"]],
        "eval.output_dir: cannot write the evaluation folder",
    ),
    BadInput(
        "evaluate: compare missing folders",
        "vlm_tune.evaluate",
        lambda f: ["--compare", f["missing"], f["missing"]],
        "no metrics.json here",
    ),
    BadInput(
        "evaluate: compare garbled metrics",
        "vlm_tune.evaluate",
        lambda f: ["--compare", f["eval_a"], f["garbled"]],
        "are not numbers",
    ),
    BadInput(
        "evaluate: compare into a missing folder",
        "vlm_tune.evaluate",
        lambda f: ["--compare", f["eval_a"], f["eval_a"], "--out", f"{f['missing']}/compare.md"],
        "cannot write the comparison",
    ),
    # python -m vlm_tune.export
    BadInput("export: no --out", "vlm_tune.export", lambda f: [f["fake_run"]], "required: --out"),
    BadInput(
        "export: checkpoint missing",
        "vlm_tune.export",
        lambda f: [f["missing"], "--out", f"{f['missing']}-out"],
        "does not exist",
    ),
    BadInput(
        "export: not a checkpoint",
        "vlm_tune.export",
        lambda f: [f["empty_dir"], "--out", f"{f['missing']}-out"],
        "is not a complete checkpoint",
    ),
    BadInput(
        "export: no recipe beside the checkpoint",
        "vlm_tune.export",
        lambda f: [f["lonely_checkpoint"], "--out", f"{f['missing']}-out"],
        "--recipe RECIPE.yaml",
    ),
    BadInput(
        "export: --out holds other files",
        "vlm_tune.export",
        lambda f: [f["fake_run"], "--out", f["eval_a"]],
        "is a folder with other files in it",
    ),
    BadInput(
        "export: --dtype without --merge",
        "vlm_tune.export",
        lambda f: [f["fake_run"], "--out", f"{f['missing']}-out", "--dtype", "float16"],
        "add --merge",
    ),
    # python -m vlm_tune.generate
    BadInput(
        "generate: no model or checkpoint",
        "vlm_tune.generate",
        lambda f: ["--image", f["image"]],
        "one of the arguments --model --checkpoint is required",
    ),
    BadInput(
        "generate: image missing",
        "vlm_tune.generate",
        lambda f: ["--checkpoint", f["fake_run"], "--image", f"{f['missing']}.png"],
        "image file not found",
    ),
    BadInput(
        "generate: not an image",
        "vlm_tune.generate",
        lambda f: ["--checkpoint", f["fake_run"], "--image", f["image"], "--image", f["recipe"]],
        "unreadable image",
    ),
    BadInput(
        "generate: truncated image",
        "vlm_tune.generate",
        lambda f: ["--model", f["empty_dir"], "--image", f["truncated_image"]],
        "unreadable image",
    ),
    BadInput(
        "generate: model folder missing",
        "vlm_tune.generate",
        lambda f: ["--model", f["missing"], "--image", f["image"]],
        "no such folder",
    ),
    BadInput(
        "generate: model folder is no export",
        "vlm_tune.generate",
        lambda f: ["--model", f["empty_dir"], "--image", f["image"]],
        "no export.json",
    ),
    BadInput(
        "generate: not a checkpoint",
        "vlm_tune.generate",
        lambda f: ["--checkpoint", f["empty_dir"], "--image", f["image"]],
        "is not a complete checkpoint",
    ),
    BadInput(
        "generate: zero beams",
        "vlm_tune.generate",
        lambda f: ["--checkpoint", f["fake_run"], "--image", f["image"], "--num-beams", "0"],
        "--num-beams must be >= 1",
    ),
    # python -m vlm_tune.recipe_reference
    BadInput("recipe_reference: unknown option", "vlm_tune.recipe_reference", lambda f: ["--bogus"], "unrecognized"),
    BadInput(
        "recipe_reference: no README here",
        "vlm_tune.recipe_reference",
        lambda f: ["--write"],
        "README.md: no such file",
        cwd=lambda f: Path(f["empty_dir"]),
    ),
    # python -m vlm_tune.data.shapes
    BadInput(
        "shapes: negative count", "vlm_tune.data.shapes", lambda f: ["--out", f["missing"], "--val", "-1"], ">= 0"
    ),
    BadInput(
        "shapes: out is a file",
        "vlm_tune.data.shapes",
        lambda f: ["--out", f["recipe"], "--train", "1", "--val", "0", "--test", "0", "--test-novel", "0"],
        "cannot write the set there",
    ),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Paths the bad inputs name: recipes over tiny model folders, evaluation folders, paths that do not exist."""
    root = tmp_path_factory.mktemp("cli")
    data = {"format": "coco", "path": str(ROOT / "data" / "shapes" / "captions_val.json"), "limit": 4}
    recipe = {
        "model": {"name_or_path": str(tiny_vlm_folder("idefics3", root)), "dtype": "float32"},
        "components": {"language": {"mode": "lora", "rank": 4}},
        "data": {"train": data, "eval": data},
        "train": {"output_dir": str(root / "run"), "max_steps": 1, "mixed_precision": "no"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    recipe["model"]["name_or_path"] = str(tiny_vlm_folder("blip2", root))
    (root / "blip2.yaml").write_text(yaml.safe_dump(recipe))
    for name, metrics in (("eval_a", {"BLEU-1": 0.5}), ("garbled", {"BLEU-1": "high"})):
        (root / name).mkdir()
        (root / name / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    (root / "empty").mkdir()
    lora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    save_checkpoint(root / "reused", 9, lora, {"epoch": 0, "batches_done": 9})
    for run in ("bare_run", "fake_run"):  # complete checkpoint markers without weights: fail before any loading
        (root / run / "checkpoint-1").mkdir(parents=True)
        (root / run / "checkpoint-1" / "COMPLETE").write_text("ok\n")
    (root / "fake_run" / "recipe.yaml").write_text(yaml.safe_dump(recipe))  # bare_run has no recipe.yaml anywhere
    image = ROOT / "data" / "shapes" / "images" / "test_00000.png"
    (root / "truncated.png").write_bytes(image.read_bytes()[:100])
    (root / "rows.jsonl").write_text(json.dumps({"image": "0.png", "text": "a red square"}) + "\n")
    (root / "annotations.json").write_text(json.dumps({"images": [], "annotations": []}))
    return {
        "root": str(root),  # rows that reach the run folder get one each: a run folder is locked while in use
        "reused_run": str(root / "reused"),
        "bare_run": str(root / "bare_run"),
        "rows": str(root / "rows.jsonl"),
        "coco_plain": str(root / "annotations.json"),
        "recipe": str(root / "recipe.yaml"),
        "blip2_recipe": str(root / "blip2.yaml"),
        "eval_a": str(root / "eval_a"),
        "garbled": str(root / "garbled"),
        "missing": str(root / "nowhere"),
        "empty_dir": str(root / "empty"),
        "fake_run": str(root / "fake_run"),
        "lonely_checkpoint": str(root / "bare_run" / "checkpoint-1"),
        "image": str(image),
        "truncated_image": str(root / "truncated.png"),
    }


def _run(bad: BadInput, files: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **dict(bad.env)}
    return subprocess.run(
        [sys.executable, "-m", bad.module, *bad.args(files)],
        capture_output=True,
        text=True,
        env=env,
        cwd=bad.cwd(files),
        timeout=300,
    )


@pytest.fixture(scope="module")
def outcomes(files) -> dict[str, subprocess.CompletedProcess]:
    """Every row's finished command, by row name (most of the time goes into importing torch, so run several)."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda bad: _run(bad, files), BAD_INPUTS)
        return {bad.name: result for bad, result in zip(BAD_INPUTS, results)}


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[bad.name for bad in BAD_INPUTS])
def test_a_user_mistake_ends_in_one_error_line_and_exit_code_2(bad: BadInput, outcomes):
    result = outcomes[bad.name]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-3000:]
    assert bad.says in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, result.stderr[-3000:]
