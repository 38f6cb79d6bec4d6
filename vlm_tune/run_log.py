"""Run logging: one JSONL line per event in the run folder, tensorboard when installed, a loss plot at the end."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from vlm_tune.errors import VlmTuneError, disk_error

logger = logging.getLogger("vlm_tune.train")


class RunLogError(VlmTuneError):
    """log.jsonl cannot be written (the message names the file, and a full disk as such)."""


class RunLog:
    """Appends metrics to `log.jsonl` and mirrors scalars to tensorboard (when it is installed).

    Only the main process should create one; other processes pass `enabled=False`.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "log.jsonl"
        self._writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                logger.info("tensorboard is not installed: logging to %s only", self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (it must hold `step`) to log.jsonl and tensorboard.

        NaN and infinite numbers are written as null, so every line stays valid JSON.
        """
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as sink:
                sink.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
        except OSError as exc:
            raise RunLogError(f"train.output_dir: cannot write {self.path} ({disk_error(exc)})") from None
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, record["step"])
                elif isinstance(value, dict):
                    for sub_key, sub_value in value.items():
                        if isinstance(sub_value, (int, float)):
                            self._writer.add_scalar(f"{key}/{sub_key}", sub_value, record["step"])

    def close(self) -> None:
        """Flush tensorboard and draw the loss plot."""
        if not self.enabled:
            return
        if self._writer is not None:
            self._writer.close()
        plot_losses(self.path, self.run_dir / "loss.png")


def _finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float (also inside dicts and lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return value


def read_log(path: str | Path) -> list[dict]:
    """All records of a log.jsonl file (an empty list if it does not exist).

    A last line cut short (the process was killed while writing it) is left out.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # an empty line, or one a kill cut short
    return records


def trim_log(path: str | Path, last_step: int) -> None:
    """Keep only the records of steps up to `last_step` (a resumed run logs the later steps again)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_log(path) if isinstance(r, dict) and r.get("step", 0) <= last_step]
    staging = path.with_name(path.name + ".tmp")
    staging.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    os.replace(staging, path)  # atomic: a kill leaves the old log or the trimmed one


def plot_losses(log_path: str | Path, png_path: str | Path) -> Optional[Path]:
    """Plot training and eval loss against the step into a PNG; None when there is nothing to plot."""
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (per label token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return Path(png_path)
