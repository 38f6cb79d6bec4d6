"""The recipe schema of what trains in a component (`components.NAME`), AdaLoRA's schedule (`train.adalora`), and the
recipe-level checks of the components (`check_adapters`).

Part of the recipe schema in vlm_tune/recipe.py (which re-exports both), kept apart for the file-size rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class ComponentConfig:
    mode: Literal["frozen", "lora", "full", "prompt", "prefix"] = field(
        default="frozen",
        metadata={"help": "how this component trains (prompt / prefix: soft prompts, language only)"},
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank (mode lora)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    targets: list[str] = field(
        default_factory=lambda: ["attention", "mlp"],
        metadata={"help": "kinds (attention, mlp) or leaf names / regexes"},
    )
    variant: Literal["lora", "dora", "rslora", "adalora"] = field(
        default="lora", metadata={"help": "LoRA flavour (adalora: ranks re-allocated across layers, see train.adalora)"}
    )
    target_rank: Optional[int] = field(
        default=None,
        metadata={"help": "adalora: average rank per layer after allocation (default: two thirds of rank)"},
    )
    init: Literal["default", "pissa", "olora", "loftq"] = field(
        default="default",
        metadata={"help": "LoRA start: default (B = 0), pissa / olora (principal directions), loftq (4-bit error)"},
    )
    num_virtual_tokens: int = field(default=20, metadata={"help": "virtual tokens (mode prompt or prefix)"})
    lr: Optional[float] = field(
        default=None, metadata={"help": "learning rate of this component's parameter group (default train.lr)"}
    )
    weight_decay: Optional[float] = field(
        default=None, metadata={"help": "weight decay of this group (default train.weight_decay)"}
    )
    modules: Optional[list[str]] = field(
        default=None, metadata={"help": "regexes over module names that define this component (overrides detection)"}
    )

    def _check(self) -> list[str]:
        errors = []
        if self.rank <= 0:
            errors.append(f"rank: must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            errors.append(f"alpha: must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.lr is not None and self.lr <= 0:
            errors.append(f"lr: must be positive, got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            errors.append(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.mode == "lora" and not self.targets:
            errors.append("targets: must name at least one kind or module when mode is lora")
        if self.modules is not None and not self.modules:
            errors.append("modules: must hold at least one regex, or be omitted")
        return errors + self._check_variant()

    def _check_variant(self) -> list[str]:
        """Combinations of variant, target_rank, init and num_virtual_tokens with the mode."""
        errors = []
        if self.target_rank is not None and self.variant != "adalora":
            errors.append(f"target_rank: only used with variant adalora (variant is {self.variant})")
        elif self.target_rank is not None and not 0 < self.target_rank < self.rank:
            errors.append(f"target_rank: must be between 1 and rank - 1 ({self.rank - 1}), got {self.target_rank}")
        if self.init != "default" and self.mode != "lora":
            errors.append(f"init: {self.init} starts a LoRA adapter, but mode is {self.mode}; use mode: lora")
        elif self.init != "default" and self.variant not in ("lora", "rslora"):
            errors.append(
                f"init: {self.init} works with variant lora or rslora, not {self.variant} (its adapter could not "
                f"be converted into one for the original base)"
            )
        if self.variant == "adalora" and self.mode == "lora" and self.rank < 2:
            errors.append(f"rank: adalora starts from rank >= 2 and allocates down to target_rank, got {self.rank}")
        if self.num_virtual_tokens <= 0:
            errors.append(f"num_virtual_tokens: must be a positive integer, got {self.num_virtual_tokens}")
        return errors

    @property
    def adalora_target_rank(self) -> int:
        """The adalora average rank after allocation: `target_rank`, else two thirds of `rank` (at least 1)."""
        return self.target_rank if self.target_rank is not None else max(1, round(self.rank * 2 / 3))


@dataclass
class AdaLoraSchedule:
    warmup: Union[int, float] = field(
        default=0.1,
        metadata={"help": "steps at the starting ranks before allocation: a count, or a fraction of the run"},
    )
    final: Union[int, float] = field(
        default=0.2, metadata={"help": "last steps trained at the final ranks: a count, or a fraction of the run"}
    )
    interval: int = field(default=1, metadata={"help": "steps between two re-allocations"})
    orth_reg_weight: float = field(
        default=0.5, metadata={"help": "weight of the orthogonality regulariser added to the training loss"}
    )

    def _check(self) -> list[str]:
        errors = []
        for name in ("warmup", "final"):
            value = getattr(self, name)
            if isinstance(value, bool) or (isinstance(value, int) and value < 0):
                errors.append(f"{name}: a count must be an integer >= 0, got {value}")
            elif isinstance(value, float) and not 0.0 <= value < 1.0:
                errors.append(f"{name}: a fraction must be in [0, 1), got {value}")
        if self.interval <= 0:
            errors.append(f"interval: must be a positive integer, got {self.interval}")
        if self.orth_reg_weight < 0:
            errors.append(f"orth_reg_weight: must be >= 0, got {self.orth_reg_weight}")
        return errors

    def steps(self, total_steps: int) -> tuple[int, int]:
        """(warmup steps, final steps) for a run of `total_steps` optimizer steps."""
        count = lambda value: value if isinstance(value, int) else int(value * total_steps)  # noqa: E731
        return count(self.warmup), count(self.final)


def check_adapters(components: dict, quant, relevance) -> list[str]:
    """Recipe-level checks of `components`: soft prompts only on the language decoder (and not with relevance),
    inits that need (or cannot take) 4-bit weights (`quant`: model.quantization, or None)."""
    errors = []
    for name, cfg in components.items():
        where = f"components.{name}"
        if cfg.mode in ("prompt", "prefix") and name != "language":
            errors.append(f"{where}.mode: {cfg.mode} adds virtual tokens to the language decoder; use it there")
        if cfg.mode in ("prompt", "prefix") and relevance.enabled:
            errors.append(f"{where}.mode: {cfg.mode} does not combine with relevance.enabled yet; turn one off")
        if cfg.mode != "lora" or cfg.init not in ("loftq", "pissa"):
            continue
        four_bit = quant is not None and name not in quant.keep_16bit
        if cfg.init == "loftq" and not four_bit:
            why = "model.quantization is not set" if quant is None else f"{name} is in quantization.keep_16bit"
            errors.append(
                f"{where}.init: loftq initialises LoRA from the 4-bit quantisation error, but {why}; "
                f"use init: default or pissa for 16-bit weights"
            )
        if cfg.init == "pissa" and four_bit:
            errors.append(
                f"{where}.init: pissa needs the 16-bit weights of {name}, which model.quantization loads in "
                f"4 bit; use init: loftq or olora, or add {name} to model.quantization.keep_16bit"
            )
    return errors
