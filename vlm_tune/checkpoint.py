"""Checkpoint files: atomic save, discovery of the latest complete one, loading weights and training state.

Only reads and writes files; `vlm_tune.model.build.build_model` prepares the model they are loaded into.
Layout of `RUN_DIR/checkpoint-STEP/`:
    adapter/                     standard PEFT folder for the original base (LoRA weights + `modules_to_save`)
    adapter_training.safetensors the adapter as it trains, where adapter/ holds a converted form
                                 (adalora, init pissa / olora / loftq: see vlm_tune/model/adapter_files.py)
    trained.safetensors          other fully trained parameters (full components outside modules_to_save)
    relevance.safetensors        relevance modules (when enabled), written by RelevanceWrapper.save
    relevance.json               the relevance settings they were trained with
    soft_prompt.safetensors      virtual tokens (components.language.mode prompt / prefix), with soft_prompt.json
    training_state.safetensors   optimizer / scheduler / RNG tensors, and
    training_state.json          the rest of those states, and AdaLoRA's importance scores (nothing is pickled)
    recipe.yaml                  the resolved recipe of the run that wrote it
    state.json                   step, epoch, position in the epoch, write order (`serial`)
    COMPLETE                     written last: a folder without it is never used
A checkpoint is written under a temporary name (`.checkpoint-STEP-*`) and renamed when complete; one that
replaces an older folder of the same step moves that one aside first and deletes it last, so a kill at any
moment leaves a complete checkpoint of the step (or of the step before). Pruning renames before it deletes.
"Newest" means written last (`serial`), so an older run's higher step numbers never outrank this run's.
`RUN_DIR/best.json` names the best checkpoint (train.keep_best), which pruning keeps besides the newest ones.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from vlm_tune.errors import VlmTuneError, disk_error
from vlm_tune.training_state import (
    save_training_state,
)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_PATTERN = re.compile(r"^\.checkpoint-(\d+)-")  # staging, replaced or pruned folders
REPLACED_TAG = "-replaced-"  # a complete checkpoint moved aside while its successor is renamed in
COMPLETE_MARKER = "COMPLETE"
BEST_FILE = "best.json"  # in the run folder: {"checkpoint": "checkpoint-N", "step", "metric", "value"}


class CheckpointError(VlmTuneError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


class NonFiniteWeightsError(CheckpointError):
    """The weights to save hold NaN or infinite values; no checkpoint is written."""


def relevance_wrapper_of(model: torch.nn.Module):
    """The relevance wrapper when `model` is one, else None."""
    from vlm_tune.relevance import RelevanceWrapper

    return model if isinstance(model, RelevanceWrapper) else None


def soft_prompt_wrapper_of(model: torch.nn.Module):
    """The soft-prompt wrapper when `model` is one, else None."""
    from vlm_tune.model.soft_prompt import SoftPromptWrapper

    return model if isinstance(model, SoftPromptWrapper) else None


def peft_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The PEFT model itself, or the one inside a relevance or soft-prompt wrapper."""
    from peft import PeftModel

    wrapper = relevance_wrapper_of(model) or soft_prompt_wrapper_of(model)
    peft_model = wrapper.model if wrapper is not None else model
    if not isinstance(peft_model, PeftModel):
        raise CheckpointError(f"{type(model).__name__} holds no PEFT model: apply targeting before saving")
    return peft_model


def _extra_trained_state(peft_model: torch.nn.Module, full: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Trainable parameters that the PEFT adapter folder does not hold (their values from `full` when given)."""
    return {
        name: (param if full is None else full[name]).detach().contiguous().cpu()
        for name, param in peft_model.named_parameters()
        if param.requires_grad and "lora_" not in name and ".modules_to_save." not in name
    }


def _save_weights(model: torch.nn.Module, folder: Path, full: Optional[dict] = None) -> None:
    """Write the adapter, the other trained weights, the relevance modules and soft prompts; `full` (keyed as
    `model.state_dict()`) holds their gathered values when the model is sharded."""
    if full is not None:
        _save_gathered_weights(model, folder, full)
        return
    from vlm_tune.model.adapter_files import save_adapter

    peft_model = peft_model_of(model)
    save_adapter(peft_model, folder)
    extra = _extra_trained_state(peft_model)
    if extra:
        save_file(extra, folder / "trained.safetensors")
    for wrapper in (relevance_wrapper_of(model), soft_prompt_wrapper_of(model)):
        if wrapper is not None:
            wrapper.save(folder)


def _save_gathered_weights(model: torch.nn.Module, folder: Path, full: dict) -> None:
    """`_save_weights` for a sharded (FSDP) model, from the gathered state (adapter variants: untested here)."""
    peft_model = peft_model_of(model)
    wrapper = relevance_wrapper_of(model)
    prefix = "model." if wrapper is not None else ""  # the PEFT model's keys inside the wrapper
    peft_full = {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}
    peft_model.save_pretrained(folder / "adapter", state_dict=peft_full)
    extra = _extra_trained_state(peft_model, peft_full)
    if extra:
        save_file(extra, folder / "trained.safetensors")
    if wrapper is not None:
        wrapper.save(folder, {k.removeprefix("relevance."): v for k, v in full.items() if k.startswith("relevance.")})


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters that hold a NaN or an infinite value (under FSDP: in this process's
    shards, so no process waits on the others)."""
    names = []
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # a DTensor's shard
        if param.requires_grad and not torch.isfinite(local).all():
            names.append(name)
    return names


def _non_finite_to_save(model: torch.nn.Module, full_state: Any) -> list[str]:
    """The weights to save that hold NaN or inf: the model's, or under FSDP the gathered ones (the model holds
    only this process's shards)."""
    if full_state is None:
        return non_finite_parameters(model)
    return [key for key, value in full_state.weights.items() if not torch.isfinite(value).all()]


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    keep: int = 0,
    rng: Optional[dict[str, Any]] = None,
    recipe: Any = None,
    full_state: Any = None,
) -> Path:
    """Write `checkpoint-STEP` atomically, then prune old ones.

    Args:
        output_dir: the run folder.
        step: optimizer steps done.
        model: the unwrapped model (PEFT model, or a relevance wrapper around one).
        state: JSON-serialisable training position (epoch, batches done in the epoch...).
        optimizer, scheduler: saved with the RNG states for an exact resume.
        keep: newest complete checkpoints to keep (0: all).
        rng: the random states to save (`training_state.capture_rng`; None: the current ones).
        recipe: the run's `Recipe`, saved as the checkpoint's recipe.yaml.
        full_state: under FSDP, the `distributed.FullState` gathered from every process: its full weights and
            optimizer state are written instead of the model's and optimizer's shards (same layout).
    Returns:
        The checkpoint folder.
    Raises:
        NonFiniteWeightsError: a trainable parameter holds NaN or inf (nothing is written).
        CheckpointError: the folder cannot be written (the disk is full, no permission...).
    """
    from vlm_tune.model.adapter_files import adapter_training_state

    output_dir, final, staging = Path(output_dir), Path(output_dir) / f"checkpoint-{step}", None
    broken = _non_finite_to_save(model, full_state)
    if broken:
        raise NonFiniteWeightsError(f"{len(broken)} trained tensor(s) hold NaN or inf values, e.g. {broken[0]}")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir))
        _save_weights(model, staging, full_state.weights if full_state is not None else None)
        optimizer_state = full_state.optimizer if full_state is not None else optimizer  # FSDP: gathered
        save_training_state(staging, optimizer_state, scheduler, rng, adapter=adapter_training_state(model))
        if recipe is not None:
            from vlm_tune.recipe import dump_recipe

            dump_recipe(recipe, staging / "recipe.yaml")
        serial = max((checkpoint_serial(p) for p in list_checkpoints(output_dir)), default=0) + 1
        (staging / "state.json").write_text(json.dumps({"step": step, **state, "serial": serial}, indent=1))
        (staging / COMPLETE_MARKER).write_text("ok\n")
        _move_into_place(staging, final)
    except OSError as exc:
        raise CheckpointError(f"cannot write {final}: {disk_error(exc)}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    if keep:
        prune_checkpoints(output_dir, keep)
    return final


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename the finished `staging` folder to `final`; an existing `final` is moved aside first, deleted last."""
    if not final.exists():
        staging.rename(final)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}{REPLACED_TAG}", dir=final.parent))
    aside.rmdir()  # only the unique name is wanted
    final.rename(aside)  # a kill from here on leaves `aside`, which clean_temporary_folders restores
    staging.rename(final)
    shutil.rmtree(aside, ignore_errors=True)


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest (last written) complete checkpoints and the best one; return the deleted.

    Each is renamed to a temporary name first, so a kill while deleting never leaves a partial checkpoint-N.
    """
    best = best_checkpoint(output_dir)
    doomed = [old for old in list_checkpoints(output_dir)[:-keep] if old != best]  # the best is kept besides
    for old in doomed:
        hidden = Path(tempfile.mkdtemp(prefix=f".{old.name}-pruned-", dir=old.parent))
        hidden.rmdir()
        old.rename(hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


def clean_temporary_folders(output_dir: str | Path) -> list[str]:
    """Remove the `.checkpoint-*` folders that killed saves and prunes left behind.

    A complete checkpoint that was moved aside for its replacement, and whose replacement never arrived,
    is renamed back instead. Only the process that holds the run folder's lock may call this.

    Returns:
        One line per folder: what it was and what was done with it.
    """
    output_dir = Path(output_dir)
    done = []
    for child in sorted(output_dir.glob(".checkpoint-*")):
        match = TEMPORARY_PATTERN.match(child.name)
        if match is None or not child.is_dir():
            continue
        final = output_dir / f"checkpoint-{match.group(1)}"
        if REPLACED_TAG in child.name and (child / COMPLETE_MARKER).is_file() and not final.exists():
            child.rename(final)
            done.append(f"{child.name}: restored as {final.name}")
        else:
            shutil.rmtree(child, ignore_errors=True)
            done.append(f"{child.name}: removed")
    return done


def checkpoint_serial(checkpoint: Path) -> int:
    """The write order of a checkpoint (state.json `serial`; 0 for checkpoints written without one)."""
    try:
        return int(json.loads((checkpoint / "state.json").read_text()).get("serial", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was taken at (state.json)."""
    return int(json.loads((checkpoint / "state.json").read_text())["step"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest (first written) first; incomplete or temporary folders
    are skipped. Checkpoints without a write order come first, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((checkpoint_serial(child), int(match.group(1)), child))
    return [path for _, _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest (last written) complete checkpoint of a run folder, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def write_best(output_dir: str | Path, checkpoint: Path, metric: str, value: float) -> None:
    """Name `checkpoint` the run's best in `best.json` (train.keep_best)."""
    record = {"checkpoint": checkpoint.name, "step": int(checkpoint.name.split("-")[1]), "metric": metric}
    (Path(output_dir) / BEST_FILE).write_text(json.dumps({**record, "value": value}, indent=1) + "\n")


def best_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The complete checkpoint that `best.json` of a run folder names, or None."""
    best_file = Path(output_dir) / BEST_FILE
    try:
        folder = Path(output_dir) / json.loads(best_file.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):  # no best.json (keep_best unset) or a garbled one
        return None
    return folder if (folder / COMPLETE_MARKER).is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint folder `path`, the newest complete checkpoint of the run folder `path`, or,
    for `RUN/best`, the best checkpoint of RUN (train.keep_best).

    Raises:
        CheckpointError: naming the path and listing the complete checkpoints next to it.
    """
    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path
    if path.name == "best" and not path.exists():
        best = best_checkpoint(path.parent)
        if best is None:
            raise CheckpointError(
                f"{path.parent} has no best checkpoint ({BEST_FILE}): train with train.keep_best=eval_loss "
                f"(or a caption metric), or name a checkpoint"
            )
        return best
    temporary = TEMPORARY_PATTERN.match(path.name) is not None
    newest = latest_checkpoint(path) if not CHECKPOINT_PATTERN.match(path.name) and not temporary else None
    if newest is not None:
        return newest
    run_folder = path.is_dir() and not CHECKPOINT_PATTERN.match(path.name) and not temporary
    listing = ", ".join(str(p) for p in list_checkpoints(path if run_folder else path.parent)) or "none"
    if not path.exists():
        reason = "does not exist"
    elif temporary:
        reason = "is the temporary folder of a save that did not finish"
    else:
        reason = "is not a complete checkpoint (no COMPLETE marker)"
    raise CheckpointError(f"checkpoint {path} {reason}. Complete checkpoints found there: {listing}")
