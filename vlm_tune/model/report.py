"""The targeting report: what trains, per component (printed as a table, saved as components.txt / .json)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


@dataclass
class ComponentRow:
    """One line of the targeting report."""

    component: str
    mode: str  # frozen | lora | full (or the name of an extra module, e.g. relevance)
    rank: Optional[int]
    alpha: Optional[float]
    modules_wrapped: int  # LoRA-wrapped Linear leaves (lora) or modules trained whole (full)
    trainable_params: int
    total_params: int  # parameters of this component
    share: float  # trainable / total parameters of the whole model
    detected: bool  # found structurally rather than from the family table
    lr: Optional[float]
    weight_decay: Optional[float]
    saved_as: str = ""  # adapter | modules_to_save | requires_grad (saved by the checkpoint, not the adapter)
    target_rank: Optional[int] = None  # adalora: average rank per layer after allocation


@dataclass
class TargetingReport:
    """What trains, per component; `param_names` maps component -> trainable names in the returned model."""

    model_type: str
    rows: list[ComponentRow] = field(default_factory=list)
    total_params: int = 0
    param_names: dict[str, list[str]] = field(default_factory=dict)
    layer_ranks: dict[str, dict[str, int]] = field(default_factory=dict)  # adalora: component -> {layer: rank}

    def add_row(self, row: ComponentRow, param_names: list[str]) -> None:
        """Append a row (e.g. relevance modules) and the names of its trainable parameters."""
        self.rows.append(row)
        self.param_names[row.component] = list(param_names)

    @property
    def trainable_params(self) -> int:
        return sum(r.trainable_params for r in self.rows)

    def table(self) -> str:
        """The report as a fixed-width text table."""
        head = ("component", "mode", "rank", "alpha", "wrapped", "trainable", "total", "share", "lr", "wd", "saved as")
        lines = [
            (
                r.component + (" *" if r.detected else ""),
                r.mode,
                _fmt(r.rank),
                _fmt(r.alpha),
                str(r.modules_wrapped),
                f"{r.trainable_params:,}",
                f"{r.total_params:,}",
                f"{100 * r.share:.3f}%",
                _fmt(r.lr),
                _fmt(r.weight_decay),
                r.saved_as or "-",
            )
            for r in self.rows
        ]
        share = self.trainable_params / max(self.total_params, 1)
        lines.append(
            (
                "all",
                "",
                "",
                "",
                "",
                f"{self.trainable_params:,}",
                f"{self.total_params:,}",
                f"{100 * share:.3f}%",
                "",
                "",
                "",
            )
        )
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        rule = "-" * sum(widths) + "-" * 2 * (len(widths) - 1)
        notes = f"{self.model_type}" + (" (* = detected structurally)" if any(r.detected for r in self.rows) else "")
        table = [notes, fmt(head), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])]
        return "\n".join(table + self._rank_lines())

    def _rank_lines(self) -> list[str]:
        """AdaLoRA: each layer's current rank, per component, with the component's budget."""
        rows = {r.component: r for r in self.rows}
        lines = []
        for component, ranks in self.layer_ranks.items():
            row = rows[component]
            budget = (row.target_rank or 0) * len(ranks)
            lines += [
                "",
                f"{component}: adalora ranks per layer (start {row.rank}, target {row.target_rank}; "
                f"total {sum(ranks.values())}, budget {budget})",
            ]
            width = max(len(name) for name in ranks)
            lines += [f"  {name.ljust(width)}  {rank}" for name, rank in ranks.items()]
        return lines

    def to_dict(self) -> dict:
        """Plain data (for JSON run records)."""
        return {
            "model_type": self.model_type,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "param_names": {k: list(v) for k, v in self.param_names.items()},
            "layer_ranks": {k: dict(v) for k, v in self.layer_ranks.items()},
        }

    def write(self, run_dir) -> None:
        """Write the report into a run folder as components.txt (the table) and components.json (`to_dict`)."""
        run_dir = Path(run_dir)
        (run_dir / "components.txt").write_text(self.table() + "\n")
        (run_dir / "components.json").write_text(json.dumps(self.to_dict(), indent=1))


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def param_count(param: torch.Tensor) -> int:
    """Logical parameter count (bitsandbytes packs two 4-bit weights per stored byte)."""
    quant_state = getattr(param, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()
