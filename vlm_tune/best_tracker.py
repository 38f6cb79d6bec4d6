"""train.keep_best and train.early_stopping_patience: the best evaluation so far, and when to stop.

The watched metric is train.keep_best (eval_loss: lower is better; a caption metric: higher is better), or
the eval loss when only early stopping is set. An evaluation that improves on the best makes the loop save
a checkpoint at that step (keep_best) and name it in RUN/best.json; pruning keeps it besides the newest.
The tracker's state is saved in every checkpoint's state.json, so a resumed run goes on counting alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class BestTracker:
    """The watched metric, its best value and step, and the evaluations since it last improved."""

    metric: str
    keep: bool  # train.keep_best is set: save on improvement, name the checkpoint in best.json
    patience: Optional[int]  # train.early_stopping_patience
    value: Optional[float] = None
    step: Optional[int] = None
    stale: int = 0  # evaluations without improvement since the best

    @classmethod
    def from_recipe(cls, train_cfg) -> Optional[BestTracker]:
        """The tracker the recipe's train section asks for, or None (neither keep_best nor early stopping)."""
        if not train_cfg.keep_best and not train_cfg.early_stopping_patience:
            return None
        return cls(train_cfg.keep_best or "eval_loss", bool(train_cfg.keep_best), train_cfg.early_stopping_patience)

    def update(self, step: int, scores: dict[str, float]) -> bool:
        """Count one evaluation (scores: eval_loss and / or caption metrics); True when it is the best so far.

        Evaluations that did not compute the watched metric are not counted.
        """
        if self.metric not in scores:
            return False
        value = scores[self.metric]
        lower_is_better = self.metric == "eval_loss"
        improved = math.isfinite(value) and (
            self.value is None or (value < self.value if lower_is_better else value > self.value)
        )
        if improved:
            self.value, self.step, self.stale = value, step, 0
        else:
            self.stale += 1
        return improved

    @property
    def exhausted(self) -> bool:
        """True when early stopping's patience has run out."""
        return self.patience is not None and self.stale >= self.patience

    def state(self) -> dict:
        """What a checkpoint's state.json keeps of the tracker."""
        return {"metric": self.metric, "value": self.value, "step": self.step, "stale": self.stale}

    def restore(self, state: Optional[dict]) -> None:
        """Go on from a checkpoint's saved state (ignored when it watched another metric, or is missing)."""
        if state and state.get("metric") == self.metric:
            self.value, self.step, self.stale = state["value"], state["step"], state["stale"]

    def describe(self) -> str:
        """One line for the log: the best value and step, and the patience left."""
        best = f"best {self.metric} {self.value:.4f} at step {self.step}" if self.value is not None else "no best yet"
        patience = f", {self.stale}/{self.patience} evaluations without improvement" if self.patience else ""
        return best + patience
