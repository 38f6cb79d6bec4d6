"""The best evaluation so far (lower eval loss, higher caption metric) and early stopping's patience."""

from vlm_tune.best_tracker import BestTracker
from vlm_tune.recipe import TrainConfig


def test_eval_loss_is_better_lower_and_patience_counts_evaluations_without_improvement():
    tracker = BestTracker.from_recipe(TrainConfig(keep_best="eval_loss", early_stopping_patience=2))
    assert (tracker.metric, tracker.keep, tracker.patience) == ("eval_loss", True, 2)
    assert [tracker.update(step, {"eval_loss": v}) for step, v in [(1, 3.0), (2, 2.0), (3, 2.5)]] == [True, True, False]
    assert (tracker.value, tracker.step, tracker.stale, tracker.exhausted) == (2.0, 2, 1, False)
    assert not tracker.update(4, {"CIDEr-D": 1.0})  # an evaluation without the watched metric does not count
    assert not tracker.update(5, {"eval_loss": float("nan")}) and tracker.exhausted
    assert tracker.describe() == "best eval_loss 2.0000 at step 2, 2/2 evaluations without improvement"


def test_caption_metrics_are_better_higher_and_the_state_survives_a_resume():
    tracker = BestTracker.from_recipe(TrainConfig(keep_best="CIDEr-D"))
    assert tracker.update(5, {"CIDEr-D": 0.4, "eval_loss": 2.0}) and not tracker.update(10, {"CIDEr-D": 0.3})
    assert tracker.update(15, {"CIDEr-D": 0.9}) and not tracker.exhausted  # no patience: never stops
    resumed = BestTracker.from_recipe(TrainConfig(keep_best="CIDEr-D"))
    resumed.restore(tracker.state())
    assert resumed.state() == {"metric": "CIDEr-D", "value": 0.9, "step": 15, "stale": 0}
    assert BestTracker.from_recipe(TrainConfig()) is None
    early_only = BestTracker.from_recipe(TrainConfig(early_stopping_patience=3))
    assert (early_only.metric, early_only.keep) == ("eval_loss", False)  # watches the eval loss, keeps nothing extra
