"""Adapter variants through the training command: AdaLoRA, PiSSA, prompt and prefix tuning train, save, resume
exactly, start a second stage (init_from), evaluate, and leave an adapter that plain PEFT loads."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from test_train import _coco_set, _losses, _raw_recipe
from tiny import tiny_vlm_folder
from vlm_batches import make_batch

from vlm_tune.checkpoint import CheckpointError, latest_checkpoint
from vlm_tune.evaluate import evaluate_run
from vlm_tune.model.build import build_model, load_for_inference
from vlm_tune.model.load import load_model
from vlm_tune.recipe import recipe_from_dict
from vlm_tune.train import train

VARIANTS = {
    "adalora": {
        "vision": {"mode": "lora", "variant": "adalora", "rank": 6, "target_rank": 3, "lr": 1e-2},
        "language": {"mode": "lora", "variant": "adalora", "rank": 4, "target_rank": 2, "lr": 1e-2},
    },
    "pissa": {"projector": {"mode": "full"}, "language": {"mode": "lora", "rank": 4, "init": "pissa", "lr": 1e-3}},
    "prompt": {"projector": {"mode": "full"}, "language": {"mode": "prompt", "num_virtual_tokens": 4, "lr": 1e-2}},
    "prefix": {"vision": {"mode": "lora", "rank": 2}, "language": {"mode": "prefix", "num_virtual_tokens": 4}},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {"model": str(tiny_vlm_folder("idefics3", root / "model")), "data": str(_coco_set(root / "data"))}


def _recipe(setup, variant: str, output_dir: Path, **train_overrides):
    schedule = {"max_steps": 4, "adalora": {"warmup": 1, "final": 1, "interval": 1}}
    raw = _raw_recipe(setup, output_dir, **{**schedule, **train_overrides})
    raw["components"] = VARIANTS[variant]
    del raw["train"]["schedule"]  # the variants train on the default schedule
    raw["eval"] = {"batch_size": 4, "max_new_tokens": 4, "use_java": False, "limit": 2}
    return recipe_from_dict(raw)


class SimulatedCrash(Exception):
    """Stands for the process being killed between two steps."""


def _crash_at_three(step):
    if step == 3:
        raise SimulatedCrash  # after step 3: checkpoint-2 is the last one


@pytest.fixture(scope="module")
def straight_runs(setup, tmp_path_factory):
    """variant -> the folder of an uninterrupted 4-step run (trained once, read by several tests)."""
    root, runs = tmp_path_factory.mktemp("straight"), {}

    def run(variant: str) -> Path:
        if variant not in runs:
            train(_recipe(setup, variant, root / variant))
            runs[variant] = root / variant
        return runs[variant]

    return run


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_resumes_with_the_same_losses_and_evaluates(setup, straight_runs, tmp_path, variant):
    straight_dir = straight_runs(variant)
    with pytest.raises(SimulatedCrash):
        train(_recipe(setup, variant, tmp_path / "crashed"), on_step=_crash_at_three)
    train(_recipe(setup, variant, tmp_path / "crashed", resume="auto"))
    straight, resumed = _losses(straight_dir), _losses(tmp_path / "crashed")
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4]
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), (variant, step)
    result = evaluate_run(_recipe(setup, variant, straight_dir), checkpoint=straight_dir, show_progress=False)
    assert set(result["metrics"]) >= {"CIDEr-D", "BLEU-4"} and result["num_images"] == 2
    if variant in ("adalora", "pissa"):  # the training form, loaded into a second stage
        second = _recipe(setup, variant, tmp_path / "second", max_steps=3, init_from=str(straight_dir))
        assert train(second)["step"] == 3


def test_adalora_report_shows_each_layers_final_rank_within_each_budget(straight_runs):
    run = straight_runs("adalora")
    report = json.loads((run / "components.json").read_text())
    for component, target in (("vision", 3), ("language", 2)):
        ranks = list(report["layer_ranks"][component].values())
        assert len(set(ranks)) > 1 and sum(ranks) <= target * len(ranks), (component, ranks)
    table = (run / "components.txt").read_text()
    assert "language: adalora ranks per layer (start 4, target 2" in table
    assert "model.text_model.layers.1.mlp.down_proj" in table


def test_each_adalora_checkpoint_keeps_its_own_ranks_and_its_export_shows_them(straight_runs, tmp_path):
    from vlm_tune.checkpoint import list_checkpoints
    from vlm_tune.export import export_checkpoint

    run = straight_runs("adalora")
    checkpoints = list_checkpoints(run)
    tables = [(checkpoint / "components.txt").read_text() for checkpoint in checkpoints]
    assert len(tables) == 2 and all("language: adalora ranks per layer" in table for table in tables)
    assert tables[-1] == (run / "components.txt").read_text()  # the run folder shows the latest save
    # the run's table after checkpoint-4 is replaced by a stale one: an export of checkpoint-2 reads its own
    (run / "components.txt").write_text("stale\n")
    try:
        card = (export_checkpoint(checkpoints[0], tmp_path / "export") / "README.md").read_text()
    finally:
        (run / "components.txt").write_text(tables[-1])
    assert tables[0].strip() in card and "stale" not in card


@pytest.mark.parametrize("variant", ["adalora", "pissa"])
def test_shipped_adapter_applies_to_the_original_base_with_plain_peft(setup, straight_runs, variant):
    run = straight_runs(variant)
    recipe = _recipe(setup, variant, run)
    checkpoint = latest_checkpoint(run)
    model, processor = load_for_inference(recipe, checkpoint)  # the training form: PiSSA on W_res, AdaLoRA masked
    batch = make_batch("idefics3", processor)
    with torch.no_grad():
        expected = model(**batch).logits
    base, _ = load_model(recipe.model, verbose=False)
    with torch.no_grad():
        base_logits = base(**batch).logits
    plain = PeftModel.from_pretrained(base, checkpoint / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, expected, atol=1e-4)
        assert torch.allclose(plain.merge_and_unload()(**batch).logits, expected, atol=1e-4)
    assert not torch.allclose(base_logits, expected, atol=1e-4)


def test_a_checkpoint_of_another_init_or_mode_is_refused_naming_the_fields(setup, straight_runs, tmp_path):
    recipe = _recipe(setup, "pissa", tmp_path / "x")
    recipe.components["language"].init = "default"
    with pytest.raises(CheckpointError, match=r"trained with \{'inits': \{'language': 'pissa'\}\}.*components.\*"):
        build_model(recipe, checkpoint=straight_runs("pissa"), training=False)
    recipe = _recipe(setup, "prompt", tmp_path / "y")
    recipe.components["language"].num_virtual_tokens = 8
    with pytest.raises(CheckpointError, match=r"soft prompt trained with num_virtual_tokens=4 \(recipe: 8\)"):
        build_model(recipe, checkpoint=straight_runs("prompt"), training=False)


def test_an_adalora_schedule_without_room_to_allocate_is_a_clear_error(setup, tmp_path):
    from vlm_tune.model.adalora import AdaLoraScheduleError

    recipe = _recipe(setup, "adalora", tmp_path / "run")
    recipe.train.adalora.warmup, recipe.train.adalora.final = 2, 2
    with pytest.raises(AdaLoraScheduleError, match=r"train.adalora: warmup \(2 steps\) and final \(2 steps\)"):
        train(recipe)
