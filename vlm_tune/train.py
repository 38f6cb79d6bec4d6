"""`python -m vlm_tune.train RECIPE.yaml [key=value ...]`: fine-tune a VLM as the recipe says.

Runs on `accelerate`, so `accelerate launch -m vlm_tune.train RECIPE.yaml` trains on several GPUs (DDP)
unchanged. Flow: recipe -> model + targeting (+ relevance) -> data -> the loop below -> checkpoints.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from vlm_tune.checkpoint import CheckpointError, latest_checkpoint, load_training_state, load_weights, save_checkpoint
from vlm_tune.data.bad_samples import DataError
from vlm_tune.errors import VlmTuneError
from vlm_tune.recipe import Recipe, dump_recipe, load_recipe
from vlm_tune.run_log import RunLog

logger = logging.getLogger("vlm_tune.train")
EMPTY_BATCH_LIMIT = 8  # micro-batches in a row without one usable sample before training stops


class TrainingError(VlmTuneError):
    """Training cannot go on (for instance the loss became NaN)."""


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------


def _setup_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    set_seed(recipe.train.seed)
    return accelerator


def _setup_run_dir(recipe: Recipe, accelerator) -> Path:
    run_dir = Path(recipe.train.output_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, run_dir / "recipe.yaml")
    accelerator.wait_for_everyone()
    return run_dir


def _setup_model(recipe: Recipe, accelerator, run_dir: Path):
    """Load the model, apply targeting (+ relevance), and build one optimizer group per component."""
    from vlm_tune.model.load import load_model
    from vlm_tune.model.targeting import apply_targeting, param_groups

    model, processor = load_model(recipe.model, recipe.components)
    model, report = apply_targeting(model, recipe.components)
    groups = param_groups(model, report, recipe.train.lr, recipe.train.weight_decay)
    if recipe.relevance.enabled:
        from vlm_tune.model.components import find_components
        from vlm_tune.relevance import attach_relevance, relevance_row

        component_map = find_components(model.get_base_model(), recipe.components)
        model = attach_relevance(model, recipe.relevance, component_map)
        row, names = relevance_row(model, recipe.relevance, recipe.train.lr)
        report.add_row(row, names)
        named = dict(model.named_parameters())
        groups.append(
            {
                "name": "relevance",
                "params": [named[n] for n in names],
                "lr": row.lr,
                "weight_decay": row.weight_decay if row.weight_decay is not None else recipe.train.weight_decay,
            }
        )
    if recipe.train.init_from:  # a second stage: the weights of an earlier run (relevance modules fresh if it had none)
        try:
            load_weights(model, recipe.train.init_from)
        except CheckpointError as error:
            raise CheckpointError(
                f"train.init_from: {error} (the recipe's components must match the run that saved it)"
            ) from None
        logger.info("Started from the weights of %s", recipe.train.init_from)
    if recipe.train.mixed_precision != "no":  # autocast computes in 16 bit; trained weights stay fp32 masters
        for group in groups:
            for param in group["params"]:
                param.data = param.data.float()
    if accelerator.is_main_process:
        print(report.table())
        (run_dir / "components.txt").write_text(report.table() + "\n")
        (run_dir / "components.json").write_text(json.dumps(report.to_dict(), indent=1))
    return model, processor, groups


def _setup_data(recipe: Recipe, processor, accelerator) -> SimpleNamespace:
    from torch.utils.data import DataLoader

    from vlm_tune.data import build_dataset, build_train_sampler
    from vlm_tune.data.chat_collate import train_collator_for
    from vlm_tune.data.keepalive import vision_side_trains

    if recipe.data.train is None:
        raise TrainingError(
            "data.train is not set: name a training set, e.g. data.train.path=data/shapes/captions_train.json"
        )
    train_set = build_dataset(recipe.data.train, recipe.data, train=True, seed=recipe.train.seed)
    sampler = build_train_sampler(train_set, recipe.data, recipe.train.batch_size, recipe.train.seed)
    busy = accelerator.num_processes > 1 and vision_side_trains(recipe)  # text-only batches get a dummy image
    loader_args = {"batch_size": recipe.train.batch_size, "num_workers": recipe.data.num_workers}
    collator = train_collator_for(train_set, processor, recipe.data, keep_vision_busy=busy)
    train_loader = DataLoader(train_set, sampler=sampler, collate_fn=collator, **loader_args)
    eval_set = eval_loader = None
    if recipe.data.eval is not None:
        eval_set = build_dataset(recipe.data.eval, recipe.data, train=False, seed=recipe.train.seed)
        collator = train_collator_for(eval_set, processor, recipe.data)  # no backward: no DDP wait
        eval_loader = accelerator.prepare_data_loader(
            DataLoader(eval_set, shuffle=False, collate_fn=collator, **loader_args)
        )
    return SimpleNamespace(
        train_set=train_set,
        sampler=sampler,
        train_loader=accelerator.prepare_data_loader(train_loader),
        eval_set=eval_set,
        eval_loader=eval_loader,
    )


def _setup_optimizer(groups: list[dict], recipe: Recipe, total_steps: int):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.train.lr)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[recipe.train.schedule]
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=recipe.train.warmup_steps, num_training_steps=total_steps
    )
    start = recipe.relevance.start_step if recipe.relevance.enabled else 0
    if start > 0:  # the relevance group waits (lr 0) until the model reads the visual tokens it is given
        schedule = scheduler.lr_lambdas[0]
        waits = [g.get("name") == "relevance" for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            [(lambda step, f=schedule: 0.0 if step < start else f(step)) if wait else schedule for wait in waits],
        )
    return optimizer, scheduler


def _resume(recipe: Recipe, run_dir: Path, model, optimizer, scheduler) -> dict:
    """Position to start from: a fresh start, or the state of the checkpoint named by train.resume."""
    start = {"step": 0, "epoch": 0, "batches_done": 0}
    if not recipe.train.resume:
        return start
    checkpoint = latest_checkpoint(run_dir) if recipe.train.resume == "auto" else Path(recipe.train.resume)
    if checkpoint is None:
        logger.info("train.resume=auto: no complete checkpoint in %s, starting fresh", run_dir)
        return start
    load_weights(model, checkpoint)
    state = load_training_state(checkpoint, optimizer, scheduler)
    logger.info("Resumed from %s (step %d)", checkpoint, state["step"])
    return state


# ----------------------------------------------------------------------------------------------
# One step, evaluation
# ----------------------------------------------------------------------------------------------


def _every_process_has_data(group: list[dict], accelerator) -> bool:
    """True when every process has a usable micro-batch for this step (all processes skip a step alike)."""
    if accelerator.num_processes == 1:
        return bool(group)
    flag = torch.tensor(int(bool(group)), device=accelerator.device)
    return bool(accelerator.reduce(flag, "min").item())


def _nothing_usable_message(batches: int, skipped: list[dict], run_dir: Path) -> str:
    """Why training stopped after `batches` micro-batches in a row without one usable sample."""
    latest = skipped[-1] if skipped else {"image_id": None, "reason": "unknown"}  # one of this streak's
    return (
        f"the last {batches} batches in a row had no usable sample (latest: image {latest['image_id']}: "
        f"{latest['reason']}). When every sample fails alike, the processor or the model does not fit the data "
        f"path (a tokenizer without a padding token, a transformers version), rather than the data being bad. "
        f"Every skipped sample is listed in {run_dir / 'bad_samples.jsonl'}"
    )


def _label_tokens(batch: dict) -> int:
    """Tokens that carry loss: labels other than -100, after the one-token shift."""
    return int((batch["labels"][..., 1:] != -100).sum())


def _clip_gradients(optimizer, accelerator, max_grad_norm: float) -> Optional[dict[str, float]]:
    """Clip the model's gradients and the relevance modules' gradients, each to `max_grad_norm`.

    Clipped apart so that spiky gradients of the small scoring modules never scale down the model's update.

    Returns:
        {"model": norm before clipping, "relevance": ...} (relevance only when it trains), or None if disabled.
    """
    if max_grad_norm <= 0:
        return None
    parts = {
        "model": [p for g in optimizer.param_groups if g.get("name") != "relevance" for p in g["params"]],
        "relevance": [p for g in optimizer.param_groups if g.get("name") == "relevance" for p in g["params"]],
    }
    return {part: float(accelerator.clip_grad_norm_(params, max_grad_norm)) for part, params in parts.items() if params}


def _train_step(model, group: list[dict], optimizer, scheduler, accelerator, max_grad_norm: float, step: int):
    """Forward/backward over the micro-batches of one optimizer step, then clip and step.

    The loss is normalised by label tokens over the whole step (all micro-batches, all processes), so a
    micro-batch with more caption tokens weighs more, as if the step were one large batch.

    Returns:
        (loss per label token over all processes, gradient norms (see _clip_gradients) or None,
        input tokens over all processes)
    Raises:
        TrainingError: the loss is NaN or infinite (checked on every process alike, before the update).
    """
    label_tokens = [_label_tokens(batch) for batch in group]
    input_tokens = sum(int(batch["attention_mask"].sum()) for batch in group)
    counts = accelerator.reduce(torch.tensor([sum(label_tokens), input_tokens], device=accelerator.device), "sum")
    step_label_tokens, step_input_tokens = (int(c) for c in counts.tolist())
    loss_sum = torch.zeros((), device=accelerator.device)
    for index, (batch, n_tokens) in enumerate(zip(group, label_tokens)):
        last = index == len(group) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss = model(**batch).loss  # mean over this micro-batch's label tokens
            # DDP averages gradients over processes, hence the factor num_processes.
            accelerator.backward(loss * n_tokens * accelerator.num_processes / max(step_label_tokens, 1))
        loss_sum += loss.detach().float() * n_tokens
    step_loss = (accelerator.reduce(loss_sum, "sum") / max(step_label_tokens, 1)).item()
    if not math.isfinite(step_loss):
        raise TrainingError(f"the loss became {step_loss} at step {step + 1}")
    grad_norm = _clip_gradients(optimizer, accelerator, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, step_input_tokens


@torch.no_grad()
def _eval_loss(model, loader, accelerator) -> float:
    """Mean loss per label token over the evaluation set."""
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)  # [loss sum, label tokens]
    for batch in loader:
        batch.pop("skipped", None)
        if "input_ids" not in batch:  # every sample of it was bad
            continue
        n_tokens = _label_tokens(batch)
        totals += torch.tensor([model(**batch).loss.item() * n_tokens, n_tokens], device=accelerator.device)
    model.train()
    totals = accelerator.reduce(totals, "sum")
    return (totals[0] / totals[1].clamp(min=1)).item()


def _eval_generate(model, processor, data, recipe: Recipe, accelerator) -> dict[str, float]:
    """Caption or VQA metrics (data.eval.task) on the first eval.generate_limit evaluation samples (main process)."""
    from torch.utils.data import Subset

    from vlm_tune.evaluate import generate_captions, score_predictions

    subset = Subset(data.eval_set, range(min(recipe.eval.generate_limit, len(data.eval_set))))
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    with accelerator.autocast():
        rows = generate_captions(unwrapped, processor, subset, recipe.data, recipe.eval, show_progress=False)
    unwrapped.train()
    return score_predictions(rows, recipe.data.eval.task, recipe.eval.use_java)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(recipe: Recipe, on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Train as the recipe says; return a summary (steps, last loss, eval loss, run folder).

    Args:
        recipe: a validated recipe.
        on_step: called with the step number after every optimizer step (tests use it to simulate a crash).
    Raises:
        TrainingError: the loss became NaN/infinite (the last good checkpoint is kept), or bad setup.
    """
    from tqdm.auto import tqdm

    accelerator = _setup_accelerator(recipe)
    run_dir = _setup_run_dir(recipe, accelerator)
    model, processor, groups = _setup_model(recipe, accelerator, run_dir)
    data = _setup_data(recipe, processor, accelerator)
    cfg = recipe.train
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(data.train_loader) / cfg.grad_accum)
    optimizer, scheduler = _setup_optimizer(groups, recipe, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    position = _resume(recipe, run_dir, accelerator.unwrap_model(model), optimizer, scheduler)
    step, epoch, skip = position["step"], position["epoch"], position["batches_done"]
    log = RunLog(run_dir, enabled=accelerator.is_main_process)
    main = accelerator.is_main_process

    def checkpoint(batches_done: int) -> None:
        if main:
            save_checkpoint(
                run_dir,
                step,
                accelerator.unwrap_model(model),
                {"epoch": epoch, "batches_done": batches_done},
                optimizer,
                scheduler,
                keep=cfg.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    summary = {"run_dir": str(run_dir), "total_steps": total_steps}
    progress = tqdm(total=total_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    if cfg.eval_generate_every and step == 0 and data.eval_set is not None and main:
        log.write(
            {
                "step": 0,
                **{f"eval/{k}": v for k, v in _eval_generate(model, processor, data, recipe, accelerator).items()},
            }
        )
    model.train()
    batches_done, train_seconds, tokens_seen, skipped, empty_batches = skip, 0.0, 0, [], 0
    try:
        while step < total_steps:
            if skip >= len(data.train_loader):  # the checkpoint was taken at the very end of an epoch
                epoch, batches_done, skip = epoch + 1, 0, 0
            data.train_set.set_epoch(epoch)  # caption and prompt draws
            loader = accelerator.skip_first_batches(data.train_loader, skip) if skip else data.train_loader
            loader.set_epoch(epoch)  # sample order; accelerate would otherwise count its own passes
            skip = 0
            micro_batches = iter(loader)
            mark = time.perf_counter()  # tokens/s counts data loading and steps, not evaluation or saving
            while group := list(itertools.islice(micro_batches, cfg.grad_accum)):  # one optimizer step
                batches_done, micro_batches_in_step = batches_done + len(group), len(group)
                for batch in group:
                    skipped += batch.pop("skipped", [])
                group = [batch for batch in group if "input_ids" in batch]  # empty: every sample of it was bad
                if not _every_process_has_data(group, accelerator):
                    empty_batches += micro_batches_in_step
                    if empty_batches >= EMPTY_BATCH_LIMIT:
                        raise DataError(_nothing_usable_message(empty_batches, skipped, run_dir))
                    continue
                empty_batches = 0
                loss, grad_norm, step_tokens = _train_step(
                    model, group, optimizer, scheduler, accelerator, cfg.max_grad_norm, step
                )
                tokens_seen += step_tokens
                step += 1
                train_seconds += time.perf_counter() - mark
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                    "tokens_per_s": tokens_seen / max(train_seconds, 1e-9),
                }  # all processes
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm["model"]
                    if "relevance" in grad_norm:
                        record["relevance_grad_norm"] = grad_norm["relevance"]
                progress.update(1)
                progress.set_postfix(
                    loss=f"{loss:.4f}",
                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
                if step % cfg.log_every == 0 or step == total_steps:
                    log.write(record)
                summary["loss"] = loss
                if data.eval_loader is not None and (
                    (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps
                ):
                    summary["eval_loss"] = _eval_loss(model, data.eval_loader, accelerator)
                    log.write({"step": step, "eval_loss": summary["eval_loss"]})
                    progress.write(f"step {step}: eval loss {summary['eval_loss']:.4f}")
                if (
                    cfg.eval_generate_every
                    and data.eval_set is not None
                    and main
                    and (step % cfg.eval_generate_every == 0 or step == total_steps)
                ):
                    scores = _eval_generate(model, processor, data, recipe, accelerator)
                    log.write({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
                    progress.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
                if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps:
                    checkpoint(batches_done)
                if on_step is not None:
                    on_step(step)
                if step == total_steps:
                    break
                mark = time.perf_counter()
            else:  # the epoch ran out before total_steps
                epoch, batches_done = epoch + 1, 0
    except KeyboardInterrupt:
        progress.write(f"Interrupted: saving checkpoint-{step} before exiting")
        checkpoint(batches_done)
        summary["interrupted"] = True
    except TrainingError as error:
        last = latest_checkpoint(run_dir)
        raise TrainingError(
            f"{error}. Training stopped; the last good checkpoint is {last or 'none (no save yet)'}. "
            f"Lower train.lr, set train.max_grad_norm, or check the data, then resume with "
            f"train.resume=auto."
        ) from None
    finally:
        progress.close()
        log.close()
        _save_bad_samples(data, skipped, run_dir, main)
    summary["step"] = step
    return summary


def _save_bad_samples(data, skipped: list[dict], run_dir: Path, main: bool) -> None:
    """Write every skipped sample (found when reading the sets, or when loading a batch) to bad_samples.jsonl."""
    from vlm_tune.data import write_bad_samples

    records = [*data.train_set.bad_samples, *(data.eval_set.bad_samples if data.eval_set is not None else []), *skipped]
    if main and records:
        count = write_bad_samples(records, run_dir / "bad_samples.jsonl", append=False)
        logger.warning("%d sample(s) skipped; listed in %s", count, run_dir / "bad_samples.jsonl")


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m vlm_tune.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=1e-4 components.vision.rank=16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = train(load_recipe(args.recipe, args.overrides))
    except VlmTuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if not isinstance(error, TrainingError) else 1
    print(f"Done: {summary['step']} steps, run folder {summary['run_dir']}")
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
