"""Loading a checkpoint: its weights into a prepared model (naming what does not fit, a LoRA rank by component),
its training state (safetensors + JSON, never unpickled), and which checkpoints hold only finite weights.

`vlm_tune.checkpoint` writes and finds checkpoints; `vlm_tune.model.build.build_model` prepares the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vlm_tune.checkpoint import (
    CheckpointError,
    list_checkpoints,
    peft_model_of,
    relevance_wrapper_of,
    resolve_checkpoint,
    soft_prompt_wrapper_of,
)
from vlm_tune.training_state import PICKLED_FILE, TrainingStateError, read_training_state, restore_rng


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
    `checkpoint` is a checkpoint folder, a run folder (its newest complete checkpoint) or an adapter export;
    `components` (the model's ComponentMap) lets errors name the component.

    Raises:
        CheckpointError: the checkpoint is missing or incomplete, a parameter of it has no place in the model
            or another shape (a LoRA rank: naming the component and both ranks), or it holds relevance
            modules that the model lacks or that do not fit.
    """
    from peft import set_peft_model_state_dict

    from vlm_tune.exported import weights_folder  # an adapter export holds the same weight files
    from vlm_tune.model.adapter_files import load_training_form
    from vlm_tune.relevance import RELEVANCE_FILE, RelevanceError

    checkpoint = weights_folder(checkpoint)
    peft_model = peft_model_of(model)
    if not load_training_form(peft_model, checkpoint):  # adapter/ is then the form the model trains in
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
        wrapper = relevance_wrapper_of(model)
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

    wrapper = soft_prompt_wrapper_of(model)
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
    """Restore optimizer, scheduler, RNG states (and `model`'s AdaLoRA scores); return the saved position
    (state.json).

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
    if model is not None:
        from vlm_tune.model.adapter_files import restore_adapter_training_state

        restore_adapter_training_state(model, training_state.get("adapter"))
    restore_rng(training_state["rng"])
    state = json.loads((checkpoint / "state.json").read_text())
    state["rng"] = training_state["rng"]
    return state
