"""`python -m vlm_tune.train RECIPE.yaml [key=value ...]`: fine-tune a VLM as the recipe says.

Runs on `accelerate`, so `accelerate launch -m vlm_tune.train RECIPE.yaml` trains on several GPUs (DDP)
unchanged. Flow: recipe -> model (vlm_tune.model.build) -> data -> the loop below -> checkpoints.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from vlm_tune.best_tracker import BestTracker
from vlm_tune.checkpoint import CheckpointError
from vlm_tune.checkpoint_load import last_finite_checkpoint, load_training_state
from vlm_tune.cli import CommandParser, run_command
from vlm_tune.constants import RELEVANCE_GROUP
from vlm_tune.data.bad_samples import DataError
from vlm_tune.distributed import fsdp_plugin, is_sharded, prepare, state_loader, usable_on_every_process
from vlm_tune.interrupts import agreed_interrupt, catch_interrupts, shielded
from vlm_tune.model.adalora import schedule_rank_allocation
from vlm_tune.progress import lr_text, make_progress
from vlm_tune.recipe import Recipe, load_recipe
from vlm_tune.run_dir import open_run_folder
from vlm_tune.run_log import RunLog
from vlm_tune.train_step import (
    TrainingData,
    TrainingError,
    TrainingPosition,
    TrainingRun,
    TrainingStopped,
    after_step,
    caption_metrics,
    every_process_has_data,
    save_run,
    step_record,
    train_step,
)
from vlm_tune.training_state import capture_rng, preserved_rng

logger = logging.getLogger("vlm_tune.train")
EMPTY_BATCH_LIMIT = 8  # micro-batches in a row without one usable sample before training stops


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------


def _setup_accelerator(recipe: Recipe, run_dir: Path):
    """The Accelerator with the run's trackers; processes that were started but do not form one group are refused."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from vlm_tune.launch import cpu_group, launch_problem
    from vlm_tune.run_log import chosen_trackers, make_trackers

    trackers = make_trackers(chosen_trackers(recipe.train.report_to), run_dir)
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        cpu=cpu_group(torch.cuda.is_available()),  # processes started on a machine without a GPU join over gloo
        log_with=trackers or None,
        fsdp_plugin=fsdp_plugin(recipe),  # None unless launched with an FSDP config (recipes/accelerate/fsdp.yaml)
    )
    problem = launch_problem(accelerator.num_processes)
    if problem is not None:
        raise TrainingError(problem)
    set_seed(recipe.train.seed)
    return accelerator


def _setup_model(recipe: Recipe, accelerator, run_dir: Path, resume_from: Optional[Path]):
    """Build the model with the weights of the checkpoint resumed from, else of train.init_from; write its report."""
    from vlm_tune.model.build import build_model

    init_from = recipe.train.init_from if resume_from is None else None  # a second stage: an earlier run's weights
    try:
        built = build_model(recipe, checkpoint=resume_from or init_from, training=True)
    except CheckpointError as error:
        key = "train.init_from" if init_from is not None else "train.resume"
        raise CheckpointError(f"{key}: {error} (the recipe's components must match the run that saved it)") from None
    if init_from is not None:
        logger.info("Started from the weights of %s", init_from)
    if accelerator.is_main_process:
        print(built.report.table())
        built.report.write(run_dir)
    return built


def _setup_datasets(recipe: Recipe) -> tuple:
    """The training and evaluation sets (None without data.eval): read before the model loads, so that a wrong
    path or column name is reported at once, not after the model has loaded."""
    from vlm_tune.data import build_dataset

    if recipe.data.train is None:
        raise TrainingError(
            "data.train is not set: name a training set, e.g. data.train.path=data/shapes/captions_train.json"
        )
    train_set = build_dataset(recipe.data.train, recipe.data, train=True, seed=recipe.train.seed)
    eval_set = None
    if recipe.data.eval is not None:
        eval_set = build_dataset(recipe.data.eval, recipe.data, train=False, seed=recipe.train.seed)
    return train_set, eval_set


def _setup_loaders(recipe: Recipe, train_set, eval_set, processor, accelerator) -> TrainingData:
    from torch.utils.data import DataLoader

    from vlm_tune.data import build_train_sampler
    from vlm_tune.data.chat_collate import train_collator_for
    from vlm_tune.data.keepalive import needs_dummy_images

    sampler = build_train_sampler(train_set, recipe.data, recipe.train.batch_size, recipe.train.seed)
    busy = needs_dummy_images(recipe, accelerator)  # text-only micro-batches get a dummy image
    collator = train_collator_for(train_set, processor, recipe.data, keep_vision_busy=busy)
    loader_args = {"batch_size": recipe.train.batch_size, "num_workers": recipe.data.num_workers}
    # Its own generator: a loader drawing its worker seed from the global RNG would shift a resumed run's draws.
    generator = torch.Generator().manual_seed(recipe.train.seed)
    train_loader = DataLoader(train_set, sampler=sampler, collate_fn=collator, generator=generator, **loader_args)
    data = TrainingData(train_set, sampler, accelerator.prepare_data_loader(train_loader))
    if eval_set is not None:
        data.eval_set = eval_set
        collator = train_collator_for(eval_set, processor, recipe.data, keep_vision_busy=is_sharded(accelerator))
        eval_loader = DataLoader(eval_set, shuffle=False, collate_fn=collator, **loader_args)
        data.eval_loader = accelerator.prepare_data_loader(eval_loader)
    return data


def _setup_optimizer(groups: list[dict], recipe: Recipe, total_steps: int):
    from transformers import get_scheduler

    from vlm_tune.model.speed import build_optimizer

    optimizer = build_optimizer(groups, recipe.speed, recipe.train.lr)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[recipe.train.schedule]
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=recipe.train.warmup_steps, num_training_steps=total_steps
    )
    start = recipe.relevance.start_step if recipe.relevance.enabled else 0
    if start > 0:  # the relevance group waits (lr 0) until the model reads the visual tokens it is given
        schedule = scheduler.lr_lambdas[0]
        waits = [g.get("name") == RELEVANCE_GROUP for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            [(lambda step, f=schedule: 0.0 if step < start else f(step)) if wait else schedule for wait in waits],
        )
    return optimizer, scheduler


def _resume(checkpoint: Optional[Path], optimizer, scheduler, best: Optional[BestTracker], model) -> TrainingPosition:
    """Where to start: fresh, or the saved position of the checkpoint resumed from (optimizer, scheduler, RNG
    and best-checkpoint states restored; its weights were loaded when the model was built)."""
    if checkpoint is None:
        return TrainingPosition()
    try:
        state = load_training_state(checkpoint, state_loader(optimizer), scheduler, model)  # FSDP: cut to shards
    except CheckpointError as error:
        raise CheckpointError(f"train.resume: {error}") from None
    if best is not None:
        best.restore(state.get("best"))
    logger.info("Resumed from %s (step %d)", checkpoint, state["step"])
    skipped = state.get("nonfinite_skipped", 0)
    return TrainingPosition(state["step"], state["epoch"], state["batches_done"], skipped, state["rng"])


def _announce(recipe: Recipe, data: TrainingData, built, accelerator, total_steps: int, log: RunLog, start: int):
    """Print the start summary and its warnings, write it as the first record, start the trackers (main process)."""
    from vlm_tune.run_summary import tracker_config, training_plan

    plan = training_plan(recipe, data, built.report, accelerator, total_steps, log.run_dir, start)
    if accelerator.is_main_process:
        print("\n".join(plan.lines()), flush=True)
        for warning in plan.warnings:
            logger.warning(warning)
    log.start(tracker_config(recipe, plan))
    log.write(plan.record())


def _setup(recipe: Recipe, show_progress: Optional[bool] = None) -> tuple[TrainingRun, TrainingPosition]:
    """Everything the loop needs, and the position it starts from (fresh, or the checkpoint resumed from)."""
    accelerator = _setup_accelerator(recipe, Path(recipe.train.output_dir))
    folder, resume_from = open_run_folder(recipe, accelerator)
    try:
        run, position = _setup_training(recipe, accelerator, folder.path, resume_from, show_progress)
    except BaseException:
        folder.release()
        raise
    run.folder = folder
    return run, position


def _setup_training(recipe: Recipe, accelerator, run_dir: Path, resume_from: Optional[Path], show_progress):
    """`_setup` once the run folder is locked: data, model, optimizer, position, log and progress."""
    train_set, eval_set = _setup_datasets(recipe)
    built = _setup_model(recipe, accelerator, run_dir, resume_from)
    data = _setup_loaders(recipe, train_set, eval_set, built.processor, accelerator)
    cfg, main = recipe.train, accelerator.is_main_process
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(data.train_loader) / cfg.grad_accum)
    optimizer, scheduler = _setup_optimizer(built.groups, recipe, total_steps)
    schedule_rank_allocation(built.model, total_steps, recipe.train.adalora)  # AdaLoRA only
    model, optimizer = prepare(accelerator, built.model, optimizer)  # DDP, or FSDP with the model's layers as units
    best = BestTracker.from_recipe(cfg)
    position = _resume(resume_from, optimizer, scheduler, best, built.model)
    log = RunLog(run_dir, accelerator, enabled=main)
    _announce(recipe, data, built, accelerator, total_steps, log, position.step)
    progress = make_progress(total_steps, position.step, cfg.log_every, enabled=main, bar=show_progress)
    run = TrainingRun(
        recipe, accelerator, run_dir, model, built.processor, data, optimizer, scheduler, total_steps, log, progress
    )
    run.best, run.report = best, built.report
    run.summary.update(run_dir=str(run_dir), total_steps=total_steps, main_process=main)
    return run, position


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _nothing_usable_message(batches: int, skipped: list[dict], run_dir: Path) -> str:
    """Why training stopped after `batches` micro-batches in a row without one usable sample."""
    latest = skipped[-1] if skipped else {"image_id": None, "reason": "unknown"}  # one of this streak's
    return (
        f"the last {batches} batches in a row had no usable sample (latest: image {latest['image_id']}: "
        f"{latest['reason']}). When every sample fails alike, the processor or the model does not fit the data "
        f"path (a tokenizer without a padding token, a transformers version), rather than the data being bad. "
        f"Every skipped sample is listed in {run_dir / 'bad_samples.jsonl'}"
    )


def _usable(group: list[dict], run: TrainingRun) -> list[dict]:
    """The micro-batches holding a usable sample; the bad samples of all of them go to `run.skipped`."""
    for batch in group:
        run.skipped += batch.pop("skipped", [])
    return usable_on_every_process(group, run.accelerator)  # the others: every sample of them was bad


def _loop(run: TrainingRun, position: TrainingPosition, on_step: Optional[Callable[[int], None]]) -> None:
    """Optimizer steps from `position` to the last one (or the end of train.epochs); `position` moves only
    when a step is complete, so a save on Ctrl-C holds the last complete step."""
    cfg, accelerator, data = run.recipe.train, run.accelerator, run.data
    position.rng = position.rng or capture_rng()
    train_seconds, data_seconds, tokens_seen, empty_batches = 0.0, 0.0, 0, 0
    while position.step < run.total_steps and (cfg.max_steps or position.epoch < cfg.epochs):
        if position.batches_done >= len(data.train_loader):  # the checkpoint was taken at the very end of an epoch
            position.next_epoch()
            continue
        data.train_set.set_epoch(position.epoch)  # caption and prompt draws
        skip = position.batches_done
        loader = accelerator.skip_first_batches(data.train_loader, skip) if skip else data.train_loader
        loader.set_epoch(position.epoch)  # sample order; accelerate would otherwise count its own passes
        micro_batches = iter(loader)
        mark = fetch = time.perf_counter()  # tokens/s counts data loading and steps, not evaluation or saving
        while group := list(itertools.islice(micro_batches, cfg.grad_accum)):  # one optimizer step
            data_seconds += time.perf_counter() - fetch  # waiting for the loader (its workers run ahead)
            usable = _usable(group, run)
            if agreed_interrupt(accelerator):  # several processes: all stop at this boundary
                raise KeyboardInterrupt
            if not every_process_has_data(usable, accelerator):
                position.advance(len(group), steps=0)
                empty_batches += len(group)
                if empty_batches >= EMPTY_BATCH_LIMIT:
                    raise DataError(_nothing_usable_message(empty_batches, run.skipped, run.run_dir))
                fetch = time.perf_counter()
                continue
            empty_batches = 0
            result = train_step(run, usable, position, len(group))
            tokens_seen += result.input_tokens
            train_seconds += time.perf_counter() - mark
            tokens_per_s = tokens_seen / max(train_seconds, 1e-9)
            record = step_record(position, result, run.optimizer, tokens_per_s)
            record["train/seconds"], record["train/data_seconds"] = train_seconds, data_seconds
            run.losses.append(result.loss)  # logged as their mean every train.log_every steps
            window_loss = f"{sum(run.losses) / len(run.losses):.4f}"
            run.progress.set_postfix(
                loss=window_loss, lr=lr_text(run.optimizer.param_groups), tok_s=f"{tokens_per_s:.0f}"
            )
            run.progress.update(1)
            run.summary["loss"] = result.loss
            if result.skipped:
                run.progress.write(f"step {position.step}: {result.skipped}; its update was skipped")
            after_step(run, record, position)
            if on_step is not None:
                on_step(position.step)
            if position.step == run.total_steps or run.stop_reason:
                return
            mark = fetch = time.perf_counter()
        position.next_epoch()  # the epoch ran out before the last step
    if 0 < position.step < run.total_steps:  # train.epochs ended early (wholly bad batches): the last step's jobs
        run.total_steps = position.step
        after_step(run, None, position)


def train(
    recipe: Recipe, on_step: Optional[Callable[[int], None]] = None, show_progress: Optional[bool] = None
) -> dict:
    """Train as the recipe says; return a summary (steps, last loss, eval loss, run folder, early stop).

    Ctrl-C stops training: the last complete step is saved (unless this run saved it already) and the summary
    says `interrupted`; a second Ctrl-C during that save waits for it.

    Args:
        recipe: a validated recipe.
        on_step: called with the step number after every optimizer step (tests use it to simulate a crash).
        show_progress: True: a progress bar; False: plain lines every train.log_every steps; None: a bar
            when stderr is a terminal.
    Raises:
        TrainingStopped: a non-finite loss or gradient norm (the message names the last finite checkpoint).
        TrainingError, DataError, CheckpointError, RunFolderError...: a setup that cannot train (the message
            says the fix).
    """
    run, position = _setup(recipe, show_progress)
    with catch_interrupts(immediate=run.accelerator.num_processes == 1):
        try:
            _first_eval(run, position)
            run.model.train()
            _loop(run, position, on_step)
        except KeyboardInterrupt:
            _save_on_interrupt(run, position)
        except TrainingStopped as error:
            last = last_finite_checkpoint(run.run_dir) if run.main else None
            raise TrainingStopped(
                f"{error}. Training stopped; the last good checkpoint is {last or 'none (no finite save yet)'}. "
                f"Lower train.lr, set train.max_grad_norm, or check the data, then resume with "
                f"train.resume={last or 'auto'} (train.skip_nonfinite_steps=N skips up to N such steps)"
            ) from None
        finally:
            with shielded():  # a Ctrl-C while closing cannot cut the log or the lock short
                run.progress.close()
                run.log.close()
                _save_bad_samples(run.data, run.skipped, run.run_dir, run.main)
                run.folder.release()
    run.summary["step"] = position.step
    if run.stop_reason:
        run.summary["stopped_early"] = run.stop_reason
    return run.summary


def _first_eval(run: TrainingRun, position: TrainingPosition) -> None:
    """Caption metrics of the model before training (train.eval_generate_every, fresh runs)."""
    data, recipe = run.data, run.recipe
    if recipe.train.eval_generate_every and position.step == 0 and data.eval_set is not None and run.generates:
        with preserved_rng():
            scores = caption_metrics(run.model, run.processor, data.eval_set, recipe, run.accelerator)
        run.log.write({"step": 0, **{f"eval/{k}": v for k, v in scores.items()}})  # main process only


def _save_on_interrupt(run: TrainingRun, position: TrainingPosition) -> None:
    """Save the last complete step on Ctrl-C, unless this run saved it already; a second Ctrl-C waits for it."""
    with shielded():
        if position.step in run.saved_steps:
            run.progress.write(f"Interrupted: checkpoint-{position.step} was saved already; exiting")
        elif position.step == 0:
            run.progress.write("Interrupted before the first step: nothing to save")
        else:
            run.progress.write(f"Interrupted: saving checkpoint-{position.step} (the last complete step)")
            save_run(run, position)
    run.summary["interrupted"] = True


def _save_bad_samples(data: TrainingData, skipped: list[dict], run_dir: Path, main: bool) -> None:
    """Write every skipped sample (found when reading the sets, or when loading a batch) to bad_samples.jsonl."""
    from vlm_tune.data import write_bad_samples

    records = [*data.train_set.bad_samples, *(data.eval_set.bad_samples if data.eval_set is not None else []), *skipped]
    if main and records:
        count = write_bad_samples(records, run_dir / "bad_samples.jsonl", append=False)
        logger.warning("%d sample(s) skipped; listed in %s", count, run_dir / "bad_samples.jsonl")


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the process exit code (2: a mistake in the input, 1: training stopped)."""
    parser = CommandParser(prog="python -m vlm_tune.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=1e-4 components.vision.rank=16")
    parser.add_argument(
        "--no-progress", action="store_true", help="plain progress lines every train.log_every steps, no bar"
    )
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def command() -> int:
        summary = train(load_recipe(args.recipe, args.overrides), show_progress=False if args.no_progress else None)
        stopped = f" ({summary['stopped_early']})" if "stopped_early" in summary else ""
        if summary["main_process"]:
            print(f"Done: {summary['step']} steps{stopped}, run folder {summary['run_dir']}")
        return 130 if summary.get("interrupted") else 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
