"""What a training run will do, said before it starts: the start summary and the warnings about the recipe.

`training_plan` counts examples, batches, steps and parameters; `plan_warnings` names settings that will not
do what they seem to (a run that is all warmup, epochs that max_steps overrides, LoRA settings on a component
that does not train with LoRA). train.py prints both and writes them as the `{"event": "start"}` record.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_tune.data.bad_samples import reason_kind
from vlm_tune.recipe import ComponentConfig, Recipe
from vlm_tune.recipe_files import flatten_keys


@dataclass
class TrainingPlan:
    """The numbers of the start summary (all per run, `micro_batches_per_epoch` per process)."""

    examples: dict[str, dict]  # "train" / "eval" -> {"used": N, "skipped": {reason: count}}
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: float  # passes over data.train the steps make (fractional with max_steps)
    world_size: int
    batch_per_device: int
    grad_accum: int
    effective_batch: int  # samples per optimizer step, all processes
    trainable_params: int
    total_params: int
    precision: str
    devices: str
    checkpoints: str
    start_step: int = 0
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The `{"event": "start", ...}` record of log.jsonl."""
        return {"event": "start", "step": self.start_step, **dataclasses.asdict(self)}

    def lines(self) -> list[str]:
        """The printed block."""
        examples = [f"{name} {_examples_text(counts)}" for name, counts in self.examples.items()]
        epochs = f"{self.epochs:g}" if self.epochs == int(self.epochs) else f"{self.epochs:.2f}"
        resumed = f", resuming at step {self.start_step}" if self.start_step else ""
        share = 100 * self.trainable_params / max(self.total_params, 1)
        return [
            "Training plan",
            f"  examples      {'; '.join(examples)}",
            f"  steps         {self.total_steps} optimizer steps{resumed}: {epochs} epoch(s) of "
            f"{self.steps_per_epoch} steps, {self.micro_batches_per_epoch} micro-batches per epoch and process",
            f"  batch         {self.batch_per_device} per device x {self.grad_accum} accumulated x "
            f"{self.world_size} process(es) = {self.effective_batch} samples per step",
            f"  parameters    {self.trainable_params:,} trainable of {self.total_params:,} ({share:.2f}%)",
            f"  precision     {self.precision}",
            f"  devices       {self.devices}",
            f"  checkpoints   {self.checkpoints}",
        ]


def _examples_text(counts: dict) -> str:
    skipped = counts["skipped"]
    if not skipped:
        return f"{counts['used']} (none skipped)"
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
    return f"{counts['used']} ({sum(skipped.values())} skipped: {reasons})"


def example_counts(dataset) -> dict:
    """{"used": samples, "skipped": {reason kind: count}} of a CaptionDataset (skips found while reading it)."""
    return {"used": len(dataset), "skipped": dict(Counter(reason_kind(r["reason"]) for r in dataset.bad_samples))}


def _precision(recipe: Recipe) -> str:
    autocast = recipe.train.mixed_precision
    text = f"{autocast} autocast, trained weights in fp32" if autocast != "no" else "no autocast"
    text += f"; model weights {recipe.model.dtype}"
    quant = recipe.model.quantization
    if quant is not None:
        text += f", 4-bit {quant.quant_type} except {', '.join(quant.keep_16bit) or 'nothing'}"
    return text


def _checkpoints(recipe: Recipe, run_dir: Path) -> str:
    cfg = recipe.train
    when = f"every {cfg.save_every} steps and at the end" if cfg.save_every else "at the end"
    kept = f"the newest {cfg.keep_checkpoints} kept" if cfg.keep_checkpoints else "all kept"
    best = f", and the best by {cfg.keep_best}" if cfg.keep_best else ""
    return f"{run_dir}/checkpoint-N, {when}; {kept}{best}"


def training_plan(
    recipe: Recipe, data, report, accelerator, total_steps: int, run_dir: Path, start_step: int = 0
) -> TrainingPlan:
    """The start summary of a set-up run (data: TrainingData; report: the TargetingReport)."""
    cfg = recipe.train
    micro_batches = len(data.train_loader)
    steps_per_epoch = math.ceil(micro_batches / cfg.grad_accum)
    examples = {"train": example_counts(data.train_set)}
    if data.eval_set is not None:
        examples["eval"] = example_counts(data.eval_set)
    world = accelerator.num_processes
    devices = f"{world} x {accelerator.device.type} ({accelerator.distributed_type.value})"
    plan = TrainingPlan(
        examples=examples,
        micro_batches_per_epoch=micro_batches,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=total_steps / steps_per_epoch,
        world_size=world,
        batch_per_device=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        effective_batch=cfg.batch_size * cfg.grad_accum * world,
        trainable_params=report.trainable_params,
        total_params=report.total_params,
        precision=_precision(recipe),
        devices=devices if world > 1 else str(accelerator.device),
        checkpoints=_checkpoints(recipe, run_dir),
        start_step=start_step,
    )
    plan.warnings = plan_warnings(recipe, plan)
    return plan


LORA_SETTINGS = ("rank", "alpha", "dropout", "targets", "variant")


def ineffective_settings(recipe: Recipe) -> list[str]:
    """Component settings that change nothing: LoRA settings on a full or frozen component, an lr on a frozen one."""
    defaults = ComponentConfig()
    found = []
    for name, component in recipe.components.items():
        unused = [key for key in LORA_SETTINGS if component.mode != "lora"]
        unused += ["lr", "weight_decay"] if component.mode == "frozen" else []
        changed = [key for key in unused if getattr(component, key) != getattr(defaults, key)]
        if changed:
            keys = ", ".join(f"components.{name}.{key}" for key in changed)
            found.append(f"{keys}: no effect, components.{name}.mode is {component.mode}")
    return found


def plan_warnings(recipe: Recipe, plan: TrainingPlan) -> list[str]:
    """One line per setting that will not do what it seems to."""
    cfg = recipe.train
    warnings = []
    if cfg.warmup_steps and cfg.warmup_steps >= plan.total_steps:
        warnings.append(
            f"train.warmup_steps ({cfg.warmup_steps}) is not below the {plan.total_steps} optimizer steps: the whole "
            f"run is warmup and the lr never reaches train.lr; lower train.warmup_steps"
        )
    if cfg.max_steps is not None and cfg.epochs != 1 and math.ceil(plan.epochs) != cfg.epochs:  # 1: the default
        warnings.append(
            f"train.epochs ({cfg.epochs}) is ignored: train.max_steps ({cfg.max_steps}) sets the length, "
            f"{plan.epochs:.2f} epoch(s) of {plan.steps_per_epoch} steps"
        )
    warnings += ineffective_settings(recipe)
    watched = cfg.keep_best or ("eval_loss" if cfg.early_stopping_patience else None)
    if watched == "METEOR" and not _java(recipe.eval.use_java):
        warnings.append("train.keep_best: METEOR needs Java (see eval.use_java); without it no checkpoint is the best")
    if watched == "eval_loss" and not cfg.eval_every:
        warnings.append(
            "train.keep_best / early_stopping_patience: the eval loss is computed only at the last step "
            "(train.eval_every is 0); set train.eval_every"
        )
    return warnings


def _java(use_java) -> bool:
    from vlm_tune.metrics import java_available

    return java_available() if use_java is None else use_java


def tracker_config(recipe: Recipe, plan: TrainingPlan) -> dict[str, Any]:
    """The run's settings as flat parameters for the trackers (`train.lr`, `plan.effective_batch`...): str, int,
    float or bool values (lists and nulls as text)."""
    flat = {
        key: value if isinstance(value, (str, int, float, bool)) else str(value)
        for key, value in flatten_keys(recipe.to_dict()).items()
    }
    for key in ("total_steps", "world_size", "effective_batch", "trainable_params"):
        flat[f"plan.{key}"] = getattr(plan, key)
    return flat
