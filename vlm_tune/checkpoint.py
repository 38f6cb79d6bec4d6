"""Checkpoint files: atomic save, discovery of the latest complete one, loading weights and training state.

Only reads and writes files; `vlm_tune.model.build.build_model` prepares the model they are loaded into.
Layout of `RUN_DIR/checkpoint-STEP/`:
    adapter/                 standard PEFT folder for the original base (LoRA weights + `modules_to_save` copies)
    adapter_training.safetensors  the adapter as it trains, where adapter/ holds a converted form
                             (adalora, init pissa / olora / loftq: see vlm_tune/model/adapter_files.py)
    trained.safetensors      other fully trained parameters (full components outside modules_to_save)
    relevance.safetensors    relevance modules (when enabled), written by RelevanceWrapper.save
    relevance.json           the relevance settings they were trained with
    soft_prompt.safetensors  virtual tokens (components.language.mode prompt / prefix), with soft_prompt.json
    training_state.pt        optimizer, scheduler, RNG states (resume only)
    state.json               step, epoch, position in the epoch, losses so far
    COMPLETE                 written last: a folder without it is never used
A checkpoint is written under a temporary name and renamed when complete, so a kill during a save
never leaves a folder that looks complete and is not. `RUN_DIR/best.json` names the best checkpoint
(train.keep_best), which pruning keeps besides the newest ones.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlm_tune.errors import VlmTuneError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "COMPLETE"
BEST_FILE = "best.json"  # in the run folder: {"checkpoint": "checkpoint-N", "step", "metric", "value"}


class CheckpointError(VlmTuneError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def _relevance_wrapper(model: torch.nn.Module):
    """The relevance wrapper when `model` is one, else None."""
    from vlm_tune.relevance import RelevanceWrapper

    return model if isinstance(model, RelevanceWrapper) else None


def _soft_prompt_wrapper(model: torch.nn.Module):
    """The soft-prompt wrapper when `model` is one, else None."""
    from vlm_tune.model.soft_prompt import optional_wrapper

    return optional_wrapper(model)


def _peft_model(model: torch.nn.Module) -> torch.nn.Module:
    """The PEFT model itself, or the one inside a relevance or soft-prompt wrapper."""
    from peft import PeftModel

    wrapper = _relevance_wrapper(model) or _soft_prompt_wrapper(model)
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
    from vlm_tune.model.adapter_files import save_adapter

    peft_model = _peft_model(model)
    save_adapter(peft_model, folder)
    extra = _extra_trained_state(peft_model)
    if extra:
        save_file(extra, folder / "trained.safetensors")
    for wrapper in (_relevance_wrapper(model), _soft_prompt_wrapper(model)):
        if wrapper is not None:
            wrapper.save(folder)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    keep: int = 0,
) -> Path:
    """Write `checkpoint-STEP` atomically and prune old ones.

    Args:
        output_dir: the run folder.
        step: optimizer steps done.
        model: the unwrapped model (PEFT model, or a relevance wrapper around one).
        state: JSON-serialisable training position (epoch, batches done in the epoch, losses...).
        optimizer, scheduler: saved with the RNG states for an exact resume.
        keep: newest complete checkpoints to keep (0: all).
    Returns:
        The checkpoint folder.
    """
    from vlm_tune.model.adapter_files import adapter_training_state

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir))
    try:
        _save_weights(model, staging)
        training_state = {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        training_state["adapter"] = adapter_training_state(model)  # AdaLoRA's importance scores (else None)
        torch.save(training_state, staging / "training_state.pt")
        (staging / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        (staging / COMPLETE_MARKER).write_text("ok\n")
        if final.exists():  # a re-save of the same step (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if keep:
        best = best_checkpoint(output_dir)
        for old in list_checkpoints(output_dir)[:-keep]:
            if old != best:  # the best checkpoint is kept besides the newest `keep`
                shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first (incomplete or temporary folders are skipped)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run folder, or None."""
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
    newest = latest_checkpoint(path) if not CHECKPOINT_PATTERN.match(path.name) else None
    if newest is not None:
        return newest
    nearby = list_checkpoints(path if path.is_dir() and not CHECKPOINT_PATTERN.match(path.name) else path.parent)
    listing = ", ".join(str(p) for p in nearby) or "none"
    reason = "does not exist" if not path.exists() else "is not a complete checkpoint (no COMPLETE marker)"
    raise CheckpointError(f"checkpoint {path} {reason}. Complete checkpoints found there: {listing}")


def load_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint's adapter, fully trained parts and relevance modules into a prepared model.

    `model` must already carry the same targeting (and relevance wrapper) as the run that saved it;
    `checkpoint` is a checkpoint folder or a run folder (its newest complete checkpoint).

    Raises:
        CheckpointError: the checkpoint is missing or incomplete, a parameter of it has no place in the model,
            or it holds relevance modules that the model lacks or that do not fit.
    """
    from peft import set_peft_model_state_dict

    from vlm_tune.model.adapter_files import load_training_form
    from vlm_tune.relevance import RELEVANCE_FILE, RelevanceError

    checkpoint = resolve_checkpoint(checkpoint)
    peft_model = _peft_model(model)
    if not load_training_form(peft_model, checkpoint):  # adapter/ is then the form the model trains in
        adapter_file = checkpoint / "adapter" / "adapter_model.safetensors"
        result = set_peft_model_state_dict(peft_model, load_file(adapter_file))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise CheckpointError(f"{adapter_file}: weights with no place in the model: {unexpected[:5]}")
    extra_file = checkpoint / "trained.safetensors"
    if extra_file.is_file():
        missing_unexpected = peft_model.load_state_dict(load_file(extra_file), strict=False)
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
    _load_soft_prompt(model, checkpoint)


def _load_soft_prompt(model: torch.nn.Module, checkpoint: Path) -> None:
    """Virtual tokens of the checkpoint into a soft-prompt wrapper (both present, or neither)."""
    from vlm_tune.model.soft_prompt import SOFT_PROMPT_FILE, SoftPromptError

    wrapper = _soft_prompt_wrapper(model)
    if wrapper is None and (checkpoint / SOFT_PROMPT_FILE).is_file():
        raise CheckpointError(f"{checkpoint} holds a soft prompt: set components.language.mode as in its run")
    if wrapper is not None:
        try:
            wrapper.load(checkpoint)
        except SoftPromptError as error:
            raise CheckpointError(str(error)) from None


def load_training_state(
    checkpoint: str | Path, optimizer: Any = None, scheduler: Any = None, model: Optional[torch.nn.Module] = None
) -> dict:
    """Restore optimizer, scheduler, RNG states (and the model's AdaLoRA scores); return the position (state.json)."""
    from vlm_tune.model.adapter_files import restore_adapter_training_state

    checkpoint = resolve_checkpoint(checkpoint)
    training_state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=False)
    if optimizer is not None and training_state["optimizer"] is not None:
        optimizer.load_state_dict(training_state["optimizer"])
    if scheduler is not None and training_state["scheduler"] is not None:
        scheduler.load_state_dict(training_state["scheduler"])
    if model is not None:
        restore_adapter_training_state(model, training_state.get("adapter"))
    rng = training_state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((checkpoint / "state.json").read_text())
