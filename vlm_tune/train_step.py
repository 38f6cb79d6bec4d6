"""One optimizer step of the training loop, and the work after it: log, eval loss, caption metrics, save.

The loss of a step is normalised by its label tokens over all micro-batches and processes, so a micro-batch
with more caption tokens weighs more, as if the step were one large batch. After a step, `after_step` runs
each of the other jobs when its cadence (`due`) falls on the step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from vlm_tune.best_tracker import BestTracker
from vlm_tune.constants import IGNORE_INDEX, RELEVANCE_GROUP
from vlm_tune.distributed import is_sharded, peak_gpu_gib
from vlm_tune.errors import VlmTuneError
from vlm_tune.interrupts import deferred
from vlm_tune.model.adalora import write_layer_ranks
from vlm_tune.recipe import Recipe
from vlm_tune.run_log import RunLog
from vlm_tune.training_state import capture_rng, preserved_rng


class TrainingError(VlmTuneError):
    """Training cannot start as set up (the message names the recipe key and the fix)."""


class TrainingStopped(TrainingError):
    """Training had to stop (for instance the loss became NaN); exit code 1, since the input may be fine."""

    exit_code = 1


@dataclass
class TrainingData:
    """The training set and loader, and the evaluation set and loader (None without data.eval)."""

    train_set: Any
    sampler: Any
    train_loader: Any
    eval_set: Any = None
    eval_loader: Any = None


@dataclass
class TrainingPosition:
    """Where training stands: optimizer steps done, the epoch, micro-batches done in that epoch, steps skipped
    for a non-finite loss or gradient norm, and the random states as they were when it last moved (what a
    checkpoint saves, so that a resume draws exactly what the uninterrupted run drew)."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    nonfinite_skipped: int = 0
    rng: Optional[dict] = field(default=None, repr=False)

    def advance(self, batches: int, steps: int = 1) -> None:
        """Count `batches` more micro-batches of this epoch, and `steps` more optimizer steps, as done."""
        self.step += steps
        self.batches_done += batches
        self.rng = capture_rng()

    def next_epoch(self) -> None:
        """Move to the start of the next epoch."""
        self.epoch, self.batches_done = self.epoch + 1, 0
        self.rng = capture_rng()

    def saved(self) -> dict:
        """The position as a checkpoint's state.json holds it (the step is saved apart)."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, "nonfinite_skipped": self.nonfinite_skipped}


@dataclass
class StepResult:
    """One optimizer step: its loss, gradient norms (see clip_gradients), input tokens over all processes,
    and why its update was skipped (None when it was applied)."""

    loss: float
    grad_norm: dict[str, float]
    input_tokens: int
    skipped: Optional[str] = None


@dataclass
class TrainingRun:
    """What the loop and its after-step work share."""

    recipe: Recipe
    accelerator: Any
    run_dir: Path
    model: Any
    processor: Any
    data: TrainingData
    optimizer: Any
    scheduler: Any
    total_steps: int
    log: RunLog
    progress: Any
    summary: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # bad samples met in batches
    saved_steps: set[int] = field(default_factory=set)  # checkpoints this run wrote
    folder: Any = None  # the locked run folder (vlm_tune.run_dir.RunFolder)
    best: Optional[BestTracker] = None  # train.keep_best / early_stopping_patience
    losses: list[float] = field(default_factory=list)  # losses of the steps since the last log line
    stop_reason: Optional[str] = None  # set when early stopping ends the run before the last step
    report: Any = None  # the targeting report (rewritten at each save while AdaLoRA re-allocates ranks)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def generates(self) -> bool:
        """Whether this process generates captions: the main one; under FSDP every one (each step gathers)."""
        return self.main or is_sharded(self.accelerator)


def every_process_has_data(group: list[dict], accelerator) -> bool:
    """True when every process has a usable micro-batch for this step (all processes skip a step alike)."""
    if accelerator.num_processes == 1:
        return bool(group)
    empty = torch.tensor(int(not group), device=accelerator.device)
    return not bool(accelerator.reduce(empty, "max").item())  # accelerate reduces by sum, mean or max only


def label_tokens(batch: dict) -> int:
    """Tokens that carry loss: labels other than IGNORE_INDEX, after the one-token shift."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def clip_gradients(optimizer, accelerator, max_grad_norm: float) -> dict[str, float]:
    """Clip the model's gradients and the relevance modules' gradients, each to `max_grad_norm`.

    Clipped apart so that spiky gradients of the small scoring modules never scale down the model's update.
    `max_grad_norm` 0 measures the norms without clipping (the non-finite check needs them).

    Returns:
        {"model": norm before clipping, "relevance": ...} (relevance only when it trains).
    """
    limit = max_grad_norm if max_grad_norm > 0 else math.inf
    parts = {
        "model": [p for g in optimizer.param_groups if g.get("name") != RELEVANCE_GROUP for p in g["params"]],
        RELEVANCE_GROUP: [p for g in optimizer.param_groups if g.get("name") == RELEVANCE_GROUP for p in g["params"]],
    }
    return {part: float(accelerator.clip_grad_norm_(params, limit)) for part, params in parts.items() if params}


def _non_finite(loss: float, grad_norm: dict[str, float], accelerator) -> Optional[str]:
    """What is not finite in this step (the same verdict on every process), or None.

    Under fp16 the gradient scaler skips steps with inf gradients itself, so only the loss is checked then.
    """
    if not math.isfinite(loss):  # reduced over the processes already
        return f"the loss became {loss}"
    if accelerator.scaler is not None:
        return None
    bad = {part: norm for part, norm in grad_norm.items() if not math.isfinite(norm)}
    anywhere = bool(bad)
    if accelerator.num_processes > 1:  # the norms agree after DDP's all-reduce; make the decision agree too
        anywhere = bool(accelerator.reduce(torch.tensor(float(anywhere), device=accelerator.device), "max").item())
    if not anywhere:
        return None
    part, norm = next(iter(bad.items()), ("model", "non-finite on another process"))
    return f"the {part} gradient norm became {norm}"


def train_step(run: TrainingRun, group: list[dict], position: TrainingPosition, n_batches: int) -> StepResult:
    """Forward/backward over the micro-batches of one optimizer step, then check, clip, step and move `position`.

    The update and the move of `position` (by `n_batches` micro-batches and one step) happen together, with
    Ctrl-C held off, so a checkpoint always holds the state after a whole step. A non-finite loss or gradient
    norm never reaches the weights: the update is skipped (up to train.skip_nonfinite_steps times; the step
    still counts) or training stops.

    Raises:
        TrainingStopped: a non-finite loss or gradient norm beyond train.skip_nonfinite_steps (checked on every
            process alike, before the update).
    """
    from vlm_tune.model.adalora import allocate_ranks, orthogonality_penalty

    model, optimizer, scheduler, accelerator = run.model, run.optimizer, run.scheduler, run.accelerator
    cfg = run.recipe.train
    tokens_per_batch = [label_tokens(batch) for batch in group]
    input_tokens = sum(int(batch["attention_mask"].sum()) for batch in group)
    counts = accelerator.reduce(torch.tensor([sum(tokens_per_batch), input_tokens], device=accelerator.device), "sum")
    step_label_tokens, step_input_tokens = (int(c) for c in counts.tolist())
    loss_sum = torch.zeros((), device=accelerator.device)
    for index, (batch, n_tokens) in enumerate(zip(group, tokens_per_batch)):
        last = index == len(group) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss = model(**batch).loss  # mean over this micro-batch's label tokens
            penalty = orthogonality_penalty(model)  # AdaLoRA's regulariser (0.0 for other variants), not logged
            # DDP averages gradients over processes, hence the factor num_processes.
            accelerator.backward((loss + penalty) * n_tokens * accelerator.num_processes / max(step_label_tokens, 1))
        loss_sum += loss.detach().float() * n_tokens
    step_loss = (accelerator.reduce(loss_sum, "sum") / max(step_label_tokens, 1)).item()
    grad_norm = clip_gradients(optimizer, accelerator, cfg.max_grad_norm)
    skipped = _non_finite(step_loss, grad_norm, accelerator)
    if skipped is not None and position.nonfinite_skipped >= cfg.skip_nonfinite_steps:
        optimizer.zero_grad(set_to_none=True)
        raise TrainingStopped(
            f"{skipped} at step {position.step + 1} (before its update; skipped so far: "
            f"{position.nonfinite_skipped}, train.skip_nonfinite_steps={cfg.skip_nonfinite_steps})"
        )
    with deferred():  # the update and the position it leads to go together
        if skipped is None:
            optimizer.step()
            allocate_ranks(model, position.step + 1)  # AdaLoRA: after the optimizer step, before zero_grad (PEFT)
            scheduler.step()
        else:
            position.nonfinite_skipped += 1
        optimizer.zero_grad(set_to_none=True)
        position.advance(n_batches)
    return StepResult(step_loss, grad_norm, step_input_tokens, skipped)


@torch.no_grad()
def eval_loss(model, loader, accelerator) -> float:
    """Mean loss per label token over the evaluation set."""
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)  # [loss sum, label tokens]
    for batch in loader:
        batch.pop("skipped", None)
        if not every_process_has_data([batch] if "input_ids" in batch else [], accelerator):
            continue  # every sample of it was bad (on some process: under FSDP all forward together)
        n_tokens = label_tokens(batch)
        totals += torch.tensor([model(**batch).loss.item() * n_tokens, n_tokens], device=accelerator.device)
    model.train()
    totals = accelerator.reduce(totals, "sum")
    return (totals[0] / totals[1].clamp(min=1)).item()


def caption_metrics(model, processor, eval_set, recipe: Recipe, accelerator) -> dict[str, float]:
    """Caption or VQA metrics (data.eval.task) on the first eval.generate_limit evaluation samples.

    Runs on the main process; under FSDP on every process (each generation step gathers the weights), the main
    one scoring. Returns the scores ({} on the other processes).
    """
    from torch.utils.data import Subset

    from vlm_tune.captioning import generate_captions, score_predictions

    subset = Subset(eval_set, range(min(recipe.eval.generate_limit, len(eval_set))))
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    sharded = is_sharded(accelerator)
    with accelerator.autocast():
        rows = generate_captions(
            unwrapped, processor, subset, recipe.data, recipe.eval, show_progress=False, synced=sharded
        )
    unwrapped.train()
    if not accelerator.is_main_process:
        return {}
    return score_predictions(rows, recipe.data.eval.task, recipe.eval.use_java)


def step_record(position: TrainingPosition, result: StepResult, optimizer, tokens_per_s: float) -> dict:
    """The log line of one optimizer step (all processes); `after_step` replaces the loss by the window's mean."""
    record = {
        "step": position.step,
        "epoch": position.epoch,
        "train/loss": result.loss,
        "train/lr": {g["name"]: g["lr"] for g in optimizer.param_groups},  # the lr of the next step
        "train/tokens_per_s": tokens_per_s,  # running average over the run
        "train/grad_norm": result.grad_norm.get("model"),
    }
    if RELEVANCE_GROUP in result.grad_norm:
        record["train/relevance_grad_norm"] = result.grad_norm[RELEVANCE_GROUP]
    if result.skipped is not None:
        record["skipped"] = f"{result.skipped}: update skipped"
        record["nonfinite_skipped"] = position.nonfinite_skipped
    return record


def due(every: int, step: int, total: int) -> bool:
    """True when a cadence of `every` steps falls on `step`; the last step (`total`) always counts.

    `every` 0 means only at the last step.
    """
    return step == total or (every > 0 and step % every == 0)


def save_run(run: TrainingRun, position: TrainingPosition) -> None:
    """Write `checkpoint-STEP` of the run (main process; every process waits for it); Ctrl-C waits for it.
    Under FSDP every process first gathers the full weights and optimizer state with the others.

    Raises:
        TrainingStopped: the weights hold NaN or inf values (checked on every process; nothing is written).
    """
    from vlm_tune.checkpoint import non_finite_parameters, save_checkpoint
    from vlm_tune.distributed import gather_full_state, on_any_process

    model = run.accelerator.unwrap_model(run.model)
    broken = on_any_process(non_finite_parameters(model), run.accelerator)  # FSDP: each process checks its shards
    if broken:
        raise TrainingStopped(
            f"after step {position.step} {len(broken)} trained tensor(s) hold NaN or inf values (e.g. {broken[0]}), "
            f"so checkpoint-{position.step} was not written"
        )
    if position.step in run.saved_steps:  # never replace a complete checkpoint of this run
        return
    state = position.saved()
    if run.best is not None:
        state["best"] = run.best.state()
    with deferred():
        full_state = gather_full_state(run.accelerator, model, run.optimizer)  # None unless FSDP
        if run.main:
            folder = save_checkpoint(
                run.run_dir,
                position.step,
                model,
                state,
                run.optimizer,
                run.scheduler,
                keep=run.recipe.train.keep_checkpoints,
                rng=position.rng,
                recipe=run.recipe,
                full_state=full_state,
            )
            write_layer_ranks(model, run.report, run.run_dir, folder)
        run.saved_steps.add(position.step)
        run.accelerator.wait_for_everyone()


def _log_window(run: TrainingRun, record: dict) -> None:
    """Log the step's record with `train/loss` the mean over the steps since the last log line."""
    step = record["step"]
    first = step - len(run.losses) + 1
    finite = [loss for loss in run.losses if math.isfinite(loss)]  # a skipped step's NaN loss stays out
    mean = sum(finite) / len(finite) if finite else None
    record = {**record, "train/loss": mean, "loss_over_steps": [first, step]}
    if torch.cuda.is_available():  # a collective, so only here: every process logs at the same steps
        record["train/gpu_peak_gib"] = peak_gpu_gib(run.accelerator)  # the largest of the processes
    run.losses.clear()
    run.log.write(record)


def _evaluate(run: TrainingRun, step: int) -> dict[str, float]:
    """The eval loss and caption metrics due at this step ({"eval_loss": ..., "CIDEr-D": ...}; {} if none)."""
    cfg, total = run.recipe.train, run.total_steps
    scores: dict[str, float] = {}
    if run.data.eval_loader is not None and due(cfg.eval_every, step, total):
        with preserved_rng():  # evaluating never changes what training draws next
            scores["eval_loss"] = eval_loss(run.model, run.data.eval_loader, run.accelerator)
        run.summary["eval_loss"] = scores["eval_loss"]
        run.log.write({"step": step, "eval/loss": scores["eval_loss"]})
        run.progress.write(f"step {step}: eval loss {scores['eval_loss']:.4f}")
    captions_due = cfg.eval_generate_every and due(cfg.eval_generate_every, step, total)  # 0: never
    if captions_due and run.data.eval_set is not None:
        metrics = {}
        if run.generates:  # the main process (under FSDP every process), the others waiting for its scores
            with preserved_rng():
                metrics = caption_metrics(run.model, run.processor, run.data.eval_set, run.recipe, run.accelerator)
        if run.main:
            run.log.write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
            run.progress.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        scores.update(_shared_scores(metrics, run.accelerator) if run.best is not None else metrics)
    return scores


def _shared_scores(scores: dict[str, float], accelerator) -> dict[str, float]:
    """The main process's scores on every process (caption metrics are computed on the main one only)."""
    if accelerator.num_processes == 1:
        return scores
    from accelerate.utils import broadcast_object_list

    shared = [scores]
    broadcast_object_list(shared, from_process=0)
    return shared[0]


def after_step(run: TrainingRun, record: Optional[dict], position: TrainingPosition) -> None:
    """Log, evaluate (eval loss, caption metrics), keep the best, save, and stop early, each when due
    (`record` None: the step was logged already)."""
    from vlm_tune.checkpoint import write_best

    cfg, step, total = run.recipe.train, position.step, run.total_steps
    if record is not None and due(cfg.log_every, step, total):
        _log_window(run, record)
    scores = _evaluate(run, step)
    improved = False
    if run.best is not None and scores:
        improved = run.best.update(step, scores)  # the same scores on every process: they decide alike
        if run.best.exhausted and step < total:
            run.stop_reason = f"early stopping: {run.best.describe()}"
    if due(cfg.save_every, step, total) or (improved and run.best.keep) or run.stop_reason:
        save_run(run, position)
    if improved and run.best.keep and run.main:
        write_best(run.run_dir, run.run_dir / f"checkpoint-{step}", run.best.metric, run.best.value)
    if run.stop_reason:
        run.log.write({"step": step, "event": "early_stop", "reason": run.stop_reason})
        run.progress.write(f"step {step}: {run.stop_reason}; stopping")
