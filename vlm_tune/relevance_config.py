"""The recipe's `relevance` section: visual token selection (the modules live in vlm_tune/relevance/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class RelevanceConfig:
    enabled: bool = field(
        default=False, metadata={"help": "insert knowing/balancing/attending between projector and language model"}
    )
    keep: Union[int, float] = field(
        default=1.0, metadata={"help": "visual tokens kept per image: a count (int >= 1) or a fraction in (0, 1]"}
    )
    method: Literal["relevance", "random", "pool"] = field(
        default="relevance", metadata={"help": "relevance modules, or a baseline at the same K"}
    )
    summary_token: bool = field(
        default=False, metadata={"help": "fold the dropped tokens into one summary token, one of the K slots"}
    )
    lr: Optional[float] = field(
        default=None, metadata={"help": "learning rate of the relevance modules (default train.lr)"}
    )
    hidden_size: int = field(default=64, metadata={"help": "width of the relevance modules' internal projections"})
    temperature: float = field(default=1.0, metadata={"help": "softness of the differentiable selection in training"})
    exploration: float = field(
        default=0.0, metadata={"help": "Gumbel noise added to the relevance when choosing in training (0: none)"}
    )
    start_step: int = field(
        default=0,
        metadata={"help": "optimizer step from which the modules learn; before it they choose by their initial scores"},
    )

    def _check(self) -> list[str]:
        errors = []
        if isinstance(self.keep, bool) or (isinstance(self.keep, int) and self.keep < 1):
            errors.append(f"keep: a count must be an integer >= 1, got {self.keep}")
        elif isinstance(self.keep, float) and not 0.0 < self.keep <= 1.0:
            errors.append(f"keep: a fraction must be in (0, 1], got {self.keep}")
        if self.lr is not None and self.lr <= 0:
            errors.append(f"lr: must be positive, got {self.lr}")
        if self.hidden_size <= 0:
            errors.append(f"hidden_size: must be a positive integer, got {self.hidden_size}")
        if self.temperature <= 0:
            errors.append(f"temperature: must be positive, got {self.temperature}")
        non_negative = {"exploration": self.exploration, "start_step": self.start_step}
        errors += [f"{name}: must be >= 0, got {value}" for name, value in non_negative.items() if value < 0]
        return errors
