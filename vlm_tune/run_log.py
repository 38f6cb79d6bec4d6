"""Run logging: one JSONL line per event in the run folder, the same scalars to accelerate's trackers
(tensorboard, MLflow, W&B), and a loss plot at the end.

One naming scheme everywhere: `train/loss`, `train/lr/<group>`, `train/tokens_per_s`, `train/grad_norm`,
`eval/loss`, `eval/CIDEr-D`... A record's keys with a `/` are its scalars (sent to the trackers); the
others (`step`, `epoch`, `event`, `loss_over_steps`...) stay in log.jsonl.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from vlm_tune.errors import VlmTuneError, disk_error

logger = logging.getLogger("vlm_tune.train")

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}  # name -> pip package
PROJECT = "vlm_tune"  # MLflow experiment / W&B project; the run is named after the run folder


class TrackerError(VlmTuneError):
    """A tracker named in train.report_to that cannot be used (not installed)."""


def chosen_trackers(report_to: Optional[list[str]]) -> list[str]:
    """The trackers to start: train.report_to, or tensorboard when it is installed (report_to null).

    Raises:
        TrackerError: a named tracker is not installed (the message gives the pip command).
    """
    if report_to is None:
        if importlib.util.find_spec("tensorboard") is None:
            logger.info("tensorboard is not installed: logging to log.jsonl only")
            return []
        return ["tensorboard"]
    missing = [name for name in report_to if importlib.util.find_spec(name) is None]
    if missing:
        packages = " ".join(TRACKERS[name] for name in missing)
        raise TrackerError(
            f"train.report_to: {', '.join(missing)} not installed: pip install {packages}, "
            f"or remove it from train.report_to"
        )
    return list(dict.fromkeys(report_to))


def make_trackers(names: list[str], run_dir: Path) -> list:
    """accelerate tracker objects writing into the run folder (pass them as `Accelerator(log_with=...)`).

    tensorboard: RUN/tensorboard. MLflow: the store of MLFLOW_TRACKING_URI, else the local file store
    RUN/mlruns (no server, no network). W&B: files under RUN/wandb; WANDB_MODE=offline keeps them local.
    """
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    makers = {
        "tensorboard": lambda: TensorBoardTracker("tensorboard", run_dir),
        "mlflow": lambda: MLflowTracker(PROJECT, run_name=run_dir.name),
        "wandb": lambda: WandBTracker(PROJECT, name=run_dir.name, dir=str(run_dir)),
    }
    return [makers[name]() for name in names]


def _local_mlflow_store(run_dir: Path) -> None:
    """Point MLflow at RUN/mlruns unless MLFLOW_TRACKING_URI names a store."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores unless told
    mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tracked scalars of a record: keys with a `/`, nested mappings flattened (`train/lr/language`)."""
    found = {}
    for key, value in record.items():
        if "/" not in key:
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub_key, sub_value in items:
            if isinstance(sub_value, (int, float)) and not isinstance(sub_value, bool) and math.isfinite(sub_value):
                found[key if sub_key is None else f"{key}/{sub_key}"] = sub_value
    return found


class RunLogError(VlmTuneError):
    """log.jsonl cannot be written (the message names the file, and a full disk as such)."""


class RunLog:
    """Appends records to `log.jsonl` and sends their scalars to the accelerator's trackers.

    Only the main process writes; other processes pass `enabled=False`.
    """

    def __init__(self, run_dir: str | Path, accelerator=None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.enabled = enabled
        self.path = self.run_dir / "log.jsonl"

    @property
    def _trackers(self) -> list:
        return list(getattr(self.accelerator, "trackers", []) or []) if self.enabled else []

    def start(self, config: dict[str, Any]) -> None:
        """Start the trackers (named in `Accelerator(log_with=...)`) with the run's settings as parameters."""
        log_with = getattr(self.accelerator, "log_with", None) or []
        if not self.enabled or not log_with:
            return
        if any(getattr(tracker, "name", None) == "mlflow" for tracker in log_with):
            _local_mlflow_store(self.run_dir)
        self.accelerator.init_trackers(PROJECT, config=config)
        logger.info("Tracking with %s", ", ".join(tracker.name for tracker in self._trackers))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (it must hold `step`) to log.jsonl, and its scalars to the trackers.

        NaN and infinite numbers are written as null, so every line stays valid JSON.
        """
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as sink:
                sink.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
        except OSError as exc:
            raise RunLogError(f"train.output_dir: cannot write {self.path} ({disk_error(exc)})") from None
        values = scalars(record)
        if values and self._trackers:
            self.accelerator.log(values, step=record["step"])

    def close(self) -> None:
        """Finish the trackers and draw the loss plot (the process group stays, unlike `end_training`)."""
        if not self.enabled:
            return
        for tracker in self._trackers:
            tracker.finish()
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
    train = [(r["step"], r["train/loss"]) for r in records if r.get("train/loss") is not None]
    evals = [(r["step"], r["eval/loss"]) for r in records if r.get("eval/loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="train loss (mean over train.log_every steps)", linewidth=1)
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
