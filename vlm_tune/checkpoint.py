"""Checkpoints: atomic save, discovery of the latest complete one, restore for resume and for inference.

Layout of `RUN_DIR/checkpoint-STEP/`:
    adapter/                 standard PEFT folder (LoRA weights + `modules_to_save` copies)
    trained.safetensors      other fully trained parameters (full components outside modules_to_save)
    relevance.safetensors    relevance modules (when enabled)
    training_state.pt        optimizer, scheduler, RNG states (resume only)
    state.json               step, epoch, position in the epoch, losses so far
    COMPLETE                 written last: a folder without it is never used
A checkpoint is written under a temporary name and renamed when complete, so a kill during a save
never leaves a folder that looks complete and is not.
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


class CheckpointError(VlmTuneError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def _peft_model(model: torch.nn.Module) -> torch.nn.Module:
    """The PEFT model itself, or the one inside a relevance wrapper."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model
    for child in model.children():
        if isinstance(child, PeftModel):
            return child
    raise CheckpointError(f"{type(model).__name__} holds no PEFT model: apply targeting before saving")


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
    relevance = getattr(model, "relevance", None)
    if relevance is not None:
        from vlm_tune.relevance import RELEVANCE_FILE

        save_file(
            {k: v.detach().contiguous().cpu() for k, v in relevance.state_dict().items()}, folder / RELEVANCE_FILE
        )  # the file load_relevance reads


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
        torch.save(training_state, staging / "training_state.pt")
        (staging / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        (staging / COMPLETE_MARKER).write_text("ok\n")
        if final.exists():  # a re-save of the same step (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
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


def resolve_checkpoint(path: str | Path) -> Path:
    """Check that `path` is a complete checkpoint folder.

    Raises:
        CheckpointError: naming the path and listing the complete checkpoints next to it.
    """
    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path
    nearby = list_checkpoints(path if path.is_dir() and not CHECKPOINT_PATTERN.match(path.name) else path.parent)
    listing = ", ".join(str(p) for p in nearby) or "none"
    reason = "does not exist" if not path.exists() else "is not a complete checkpoint (no COMPLETE marker)"
    raise CheckpointError(f"checkpoint {path} {reason}. Complete checkpoints found there: {listing}")


def load_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint's adapter, fully trained parts and relevance modules into a prepared model.

    `model` must already carry the same targeting (and relevance wrapper) as the run that saved it.

    Raises:
        CheckpointError: a parameter of the checkpoint has no place in the model.
    """
    from peft import set_peft_model_state_dict

    checkpoint = resolve_checkpoint(checkpoint)
    peft_model = _peft_model(model)
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
    from vlm_tune.relevance import RELEVANCE_FILE, load_relevance

    relevance_file = checkpoint / RELEVANCE_FILE
    if relevance_file.is_file():
        if getattr(model, "relevance", None) is None:
            raise CheckpointError(f"{checkpoint} holds relevance modules: set relevance.enabled=true to load it")

        try:
            load_relevance(model, checkpoint)
        except ValueError as error:  # weights of another relevance method / size
            raise CheckpointError(f"{relevance_file}: {error}") from None


def load_training_state(checkpoint: str | Path, optimizer: Any = None, scheduler: Any = None) -> dict:
    """Restore optimizer, scheduler and RNG states; return the saved position (state.json)."""
    checkpoint = resolve_checkpoint(checkpoint)
    training_state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=False)
    if optimizer is not None and training_state["optimizer"] is not None:
        optimizer.load_state_dict(training_state["optimizer"])
    if scheduler is not None and training_state["scheduler"] is not None:
        scheduler.load_state_dict(training_state["scheduler"])
    rng = training_state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((checkpoint / "state.json").read_text())


def load_for_inference(recipe, checkpoint: str | Path | None = None):
    """Load the recipe's base model with a checkpoint's trained weights, ready for generation.

    Args:
        recipe: the `Recipe` of the run (same model, components and relevance settings).
        checkpoint: a `checkpoint-N` folder, or None for the base model.
    Returns:
        (model, processor), the model in eval mode.
    Raises:
        CheckpointError: the checkpoint is missing or incomplete.
    """
    from vlm_tune.model.load import load_model
    from vlm_tune.model.targeting import apply_targeting

    if checkpoint is not None:
        checkpoint = resolve_checkpoint(checkpoint)
    model, processor = load_model(recipe.model, recipe.components)
    if checkpoint is None:
        return model.eval(), processor
    model, _ = apply_targeting(model, recipe.components)
    if recipe.relevance.enabled:
        from vlm_tune.model.components import find_components
        from vlm_tune.relevance import attach_relevance

        model = attach_relevance(model, recipe.relevance, find_components(model.get_base_model(), recipe.components))
    load_weights(model, checkpoint)
    return model.eval(), processor
