"""Checkpoint files: atomic save, discovery of the latest complete one, loading weights and training state.

Only reads and writes files; `vlm_tune.model.build.build_model` prepares the model they are loaded into.
Layout of `RUN_DIR/checkpoint-STEP/`:
    adapter/                     standard PEFT folder (LoRA weights + `modules_to_save` copies)
    trained.safetensors          other fully trained parameters (full components outside modules_to_save)
    relevance.safetensors        relevance modules (when enabled), written by RelevanceWrapper.save
    relevance.json               the relevance settings they were trained with
    training_state.safetensors   optimizer / scheduler / RNG tensors, and
    training_state.json          the rest of those states (vlm_tune.training_state: nothing is pickled)
    recipe.yaml                  the resolved recipe of the run that wrote it
    state.json                   step, epoch, position in the epoch, write order (`serial`)
    COMPLETE                     written last: a folder without it is never used
A checkpoint is written under a temporary name (`.checkpoint-STEP-*`) and renamed when complete; one that
replaces an older folder of the same step moves that one aside first and deletes it last, so a kill at any
moment leaves a complete checkpoint of the step (or of the step before). Pruning renames before it deletes.
"Newest" means written last (`serial`), so an older run's higher step numbers never outrank this run's.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlm_tune.errors import VlmTuneError, disk_error
from vlm_tune.training_state import (
    PICKLED_FILE,
    TrainingStateError,
    read_training_state,
    restore_rng,
    save_training_state,
)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_PATTERN = re.compile(r"^\.checkpoint-(\d+)-")  # staging, replaced or pruned folders
REPLACED_TAG = "-replaced-"  # a complete checkpoint moved aside while its successor is renamed in
COMPLETE_MARKER = "COMPLETE"


class CheckpointError(VlmTuneError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


class NonFiniteWeightsError(CheckpointError):
    """The weights to save hold NaN or infinite values; no checkpoint is written."""


def _relevance_wrapper(model: torch.nn.Module):
    """The relevance wrapper when `model` is one, else None."""
    from vlm_tune.relevance import RelevanceWrapper

    return model if isinstance(model, RelevanceWrapper) else None


def _peft_model(model: torch.nn.Module) -> torch.nn.Module:
    """The PEFT model itself, or the one inside a relevance wrapper."""
    from peft import PeftModel

    wrapper = _relevance_wrapper(model)
    peft_model = wrapper.model if wrapper is not None else model
    if not isinstance(peft_model, PeftModel):
        raise CheckpointError(f"{type(model).__name__} holds no PEFT model: apply targeting before saving")
    return peft_model


def _extra_trained_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters that the PEFT adapter folder does not hold."""
    return {
        name: param.detach().contiguous().cpu()
        for name, param in peft_model.named_parameters()
        if param.requires_grad and "lora_" not in name and ".modules_to_save." not in name
    }


def _save_weights(model: torch.nn.Module, folder: Path) -> None:
    peft_model = _peft_model(model)
    peft_model.save_pretrained(folder / "adapter")
    extra = _extra_trained_state(peft_model)
    if extra:
        save_file(extra, folder / "trained.safetensors")
    wrapper = _relevance_wrapper(model)
    if wrapper is not None:
        wrapper.save(folder)


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters that hold a NaN or an infinite value."""
    return [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


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
    Returns:
        The checkpoint folder.
    Raises:
        NonFiniteWeightsError: a trainable parameter holds NaN or inf (nothing is written).
        CheckpointError: the folder cannot be written (the disk is full, no permission...).
    """
    output_dir = Path(output_dir)
    broken = non_finite_parameters(model)
    if broken:
        raise NonFiniteWeightsError(f"{len(broken)} trained tensor(s) hold NaN or inf values, e.g. {broken[0]}")
    final = output_dir / f"checkpoint-{step}"
    staging = None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir))
        _save_weights(model, staging)
        save_training_state(staging, optimizer, scheduler, rng)
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
    """Delete all but the `keep` newest (last written) complete checkpoints; return the deleted ones.

    Each is renamed to a temporary name first, so a kill while deleting never leaves a partial checkpoint-N.
    """
    doomed = list_checkpoints(output_dir)[:-keep]
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


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint folder `path`, or the newest complete checkpoint of the run folder `path`.

    Raises:
        CheckpointError: naming the path and listing the complete checkpoints next to it.
    """
    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path
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


def checkpoint_is_finite(checkpoint: Path) -> bool:
    """True when every weight file of the checkpoint holds only finite values."""
    files = [checkpoint / "adapter" / "adapter_model.safetensors", *checkpoint.glob("*.safetensors")]
    files = [f for f in files if f.is_file() and f.name != "training_state.safetensors"]
    try:
        return all(torch.isfinite(t).all() for f in files for t in load_file(f).values() if t.is_floating_point())
    except (OSError, SafetensorError):
        return False


def last_finite_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint whose weights are all finite, or None."""
    return next((c for c in reversed(list_checkpoints(output_dir)) if checkpoint_is_finite(c)), None)


LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def _rank_mismatch(file: Path, tensors: dict, peft_model, components) -> Optional[str]:
    """The first LoRA weight whose rank differs from the model's, as a message naming the component."""
    params = dict(peft_model.named_parameters())
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            continue
        part = match.group("part")
        target = params.get(key.replace(f".lora_{part}.", f".lora_{part}.{peft_model.active_adapter}."))
        if target is None or target.shape == tensor.shape:
            continue
        rank_dim = 0 if part == "A" else 1  # lora_A: [rank, in], lora_B: [out, rank]
        saved, wanted = tensor.shape[rank_dim], target.shape[rank_dim]
        component = components.component_of(match.group("module")) if components is not None else None
        who = f"components.{component}" if component else f"module {match.group('module')}"
        fix = f"set components.{component}.rank={saved}" if component else f"set the rank of its component to {saved}"
        return f"{file}: {who} was trained with LoRA rank {saved}, the recipe gives it rank {wanted}; {fix}"
    return None


def _load_state(load, file: Path, tensors: dict) -> Any:
    """Run `load(tensors)`; a tensor that does not fit the model becomes a CheckpointError naming it."""
    try:
        return load(tensors)
    except RuntimeError as exc:  # torch's "size mismatch for NAME: copying a param with shape ..."
        lines = [line.strip() for line in str(exc).splitlines() if "mismatch" in line] or [str(exc)]
        raise CheckpointError(f"{file}: does not fit the recipe's model: {lines[0]}") from None


def load_weights(model: torch.nn.Module, checkpoint: str | Path, components: Any = None) -> None:
    """Load a checkpoint's adapter, fully trained parts and relevance modules into a prepared model.

    `model` must already carry the same targeting (and relevance wrapper) as the run that saved it;
    `checkpoint` is a checkpoint folder or a run folder (its newest complete checkpoint); `components`
    (the model's ComponentMap) lets errors name the component.

    Raises:
        CheckpointError: the checkpoint is missing or incomplete, a parameter of it has no place in the model
            or another shape (a LoRA rank: naming the component and both ranks), or it holds relevance
            modules that the model lacks or that do not fit.
    """
    from peft import set_peft_model_state_dict

    from vlm_tune.relevance import RELEVANCE_FILE, RelevanceError

    checkpoint = resolve_checkpoint(checkpoint)
    peft_model = _peft_model(model)
    adapter_file = checkpoint / "adapter" / "adapter_model.safetensors"
    adapter = load_file(adapter_file)
    mismatch = _rank_mismatch(adapter_file, adapter, peft_model, components)
    if mismatch:
        raise CheckpointError(mismatch)
    result = _load_state(lambda t: set_peft_model_state_dict(peft_model, t), adapter_file, adapter)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"{adapter_file}: weights with no place in the model: {unexpected[:5]}")
    extra_file = checkpoint / "trained.safetensors"
    if extra_file.is_file():
        extra = load_file(extra_file)
        missing_unexpected = _load_state(lambda t: peft_model.load_state_dict(t, strict=False), extra_file, extra)
        if missing_unexpected.unexpected_keys:
            raise CheckpointError(
                f"{extra_file}: weights with no place in the model: {missing_unexpected.unexpected_keys[:5]}"
            )
    if (checkpoint / RELEVANCE_FILE).is_file():
        wrapper = _relevance_wrapper(model)
        if wrapper is None:
            raise CheckpointError(f"{checkpoint} holds relevance modules: set relevance.enabled=true to load it")
        try:
            wrapper.load(checkpoint)
        except RelevanceError as error:  # weights of another relevance method / size
            raise CheckpointError(str(error)) from None


def load_training_state(checkpoint: str | Path, optimizer: Any = None, scheduler: Any = None) -> dict:
    """Restore optimizer, scheduler and RNG states; return the saved position (state.json).

    Nothing is unpickled: the states are read from safetensors + JSON (vlm_tune.training_state).

    Raises:
        CheckpointError: the checkpoint has only a pickled training_state.pt (written by an earlier
            vlm_tune; refused, since unpickling it could run code), or its training state is damaged.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    try:
        training_state = read_training_state(checkpoint)
    except TrainingStateError as error:
        if (checkpoint / PICKLED_FILE).is_file():
            raise CheckpointError(
                f"{checkpoint}: its optimizer state is a pickled {PICKLED_FILE} (an earlier vlm_tune wrote it); "
                f"it is not loaded, since unpickling a file can run code hidden in it. Continue from its weights "
                f"with train.init_from={checkpoint} (fresh optimizer and schedule) instead of train.resume"
            ) from None
        raise CheckpointError(f"{checkpoint}: cannot resume from it: {error}") from None
    if optimizer is not None and training_state["optimizer"] is not None:
        optimizer.load_state_dict(training_state["optimizer"])
    if scheduler is not None and training_state["scheduler"] is not None:
        scheduler.load_state_dict(training_state["scheduler"])
    restore_rng(training_state["rng"])
    state = json.loads((checkpoint / "state.json").read_text())
    state["rng"] = training_state["rng"]
    return state
