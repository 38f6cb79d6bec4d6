"""The warnings of the start summary, one line per setting that will not do what it seems to."""

from vlm_tune.recipe import recipe_from_dict
from vlm_tune.run_summary import TrainingPlan, plan_warnings


def _plan(total_steps: int, steps_per_epoch: int) -> TrainingPlan:
    return TrainingPlan(
        examples={},
        micro_batches_per_epoch=steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=total_steps / steps_per_epoch,
        world_size=1,
        batch_per_device=8,
        grad_accum=1,
        effective_batch=8,
        trainable_params=1,
        total_params=2,
        precision="",
        devices="cpu",
        checkpoints="",
    )


def _warnings(components=None, eval_cfg=None, **train) -> list[str]:
    raw = {
        "components": components or {"language": {"mode": "lora"}},
        "data": {"eval": {"path": "val.json"}},
        "train": train,
        "eval": eval_cfg or {},
    }
    recipe = recipe_from_dict(raw)
    return plan_warnings(recipe, _plan(recipe.train.max_steps or 100, 50))


def test_a_plain_recipe_gets_no_warning():
    assert _warnings() == []
    assert _warnings(max_steps=20) == []  # epochs left at its default: the summary says 0.40 epochs, no warning


def test_each_warning_is_one_line():
    (warmup,) = _warnings(max_steps=20, warmup_steps=20)
    assert warmup.startswith("train.warmup_steps (20) is not below the 20 optimizer steps: the whole run is warmup")
    (epochs,) = _warnings(max_steps=20, epochs=3)
    assert epochs == "train.epochs (3) is ignored: train.max_steps (20) sets the length, 0.40 epoch(s) of 50 steps"
    components = {"projector": {"mode": "full", "rank": 16, "alpha": 32}, "vision": {"mode": "frozen", "lr": 1e-3}}
    no_effect = _warnings(components=components)
    assert no_effect == [
        "components.projector.rank, components.projector.alpha: no effect, components.projector.mode is full",
        "components.vision.lr: no effect, components.vision.mode is frozen",
    ]
    (meteor,) = _warnings(keep_best="METEOR", eval_generate_every=10, eval_every=10, eval_cfg={"use_java": False})
    assert meteor.startswith("train.keep_best: METEOR needs Java")
    (at_the_end,) = _warnings(early_stopping_patience=3)
    assert at_the_end.startswith("train.keep_best / early_stopping_patience: the eval loss is computed only at the")
    assert all("\n" not in line for line in (warmup, epochs, meteor, at_the_end, *no_effect))
