"""A checkpoint's adapter files: `adapter/` as it ships, and the adapter as it trains where the two differ.

`adapter/` is always a standard PEFT LoRA folder that applies to the original base model
(`PeftModel.from_pretrained(base, folder)`, `merge_and_unload()`):
- lora / dora / rslora: what PEFT saves;
- components with `init: pissa | olora | loftq`: their update B A - B0 A0 as a LoRA of twice the rank
  ([A; A0], [B, -B0]): PEFT's `path_initial_model_for_weight_conversion` conversion, done from the initial
  A0, B0 kept in memory at targeting (so resumed and second-stage runs convert alike);
- adalora: each layer's kept triplets as a LoRA layer of its final rank (a `rank_pattern` entry per layer).
  A LoRA folder rather than PEFT's AdaLoRA one: PEFT's AdaLoRA loader starts every layer at one `init_r`, which
  per-component ranks do not have, and LoRA folders are what merging and serving tools read.
For those variants the checkpoint also holds `adapter_training.safetensors`: the adapter tensors as they train
(PiSSA's A, B on the residual base; AdaLoRA at its starting ranks, with its rank pattern), which resume,
`train.init_from` and evaluation load.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from vlm_tune.checkpoint import CheckpointError
from vlm_tune.model.adalora import adalora_model, as_lora_tensors, rank_allocator
from vlm_tune.model.variants import INITIAL_STATE

ADAPTER = "default"
TRAINING_FILE = "adapter_training.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix in adapter files


def _training_form(peft_model: nn.Module) -> Optional[dict]:
    """What makes the trained adapter differ from the shipped one (saved with it and checked on load), or None."""
    allocator = rank_allocator(peft_model)
    if allocator is not None:
        return {"variant": "adalora", "ranks": {c: len(layers) for c, layers in allocator.layers.items()}}
    initial = getattr(peft_model, INITIAL_STATE, None)
    return {"inits": initial["inits"]} if initial else None


def _adapter_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's trainable parameters by name (LoRA / AdaLoRA matrices, modules_to_save copies)."""
    return {
        name: param
        for name, param in peft_model.named_parameters()
        if param.requires_grad and ("lora_" in name or ".modules_to_save." in name)
    }


def _adapter_tensors(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of `_adapter_parameters`."""
    return {name: param.detach().contiguous().cpu() for name, param in _adapter_parameters(peft_model).items()}


def _peft_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's adapter state dict, without AdaLoRA's resize by rank pattern (which also rewrites the config)."""
    from peft import get_peft_model_state_dict

    config = peft_model.peft_config[ADAPTER]
    adalora = rank_allocator(peft_model) is not None
    saved = config.rank_pattern
    if adalora:
        config.rank_pattern = None
    try:
        return {key: value.detach().float().cpu() for key, value in get_peft_model_state_dict(peft_model).items()}
    finally:
        config.rank_pattern = saved


def _residual_as_lora(peft_model: nn.Module, initial: dict):
    """(LoraConfig, tensors) of B A - B0 A0 for the converted components, the others as PEFT saves them."""
    config = copy.deepcopy(peft_model.peft_config[ADAPTER])
    state = _peft_state(peft_model)
    for name, (lora_a0, lora_b0) in initial["layers"].items():
        key_a, key_b = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        state[key_a] = torch.cat([state[key_a], lora_a0])  # [2r, in]
        state[key_b] = torch.cat([state[key_b], -lora_b0], dim=1)  # [out, 2r]
    factor = 2**0.5 if config.use_rslora else 2.0  # the same scaling at twice the rank
    for key in initial["pattern_keys"]:
        config.rank_pattern[key] *= 2
        config.alpha_pattern[key] *= factor
    config.init_lora_weights = True
    return config, state


def _adalora_as_lora(peft_model: nn.Module):
    """(LoraConfig, tensors): every AdaLoRA layer as a LoRA layer of its final rank."""
    from peft import LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    ada_config = peft_model.peft_config[ADAPTER]
    state = {key: value for key, value in _peft_state(peft_model).items() if "lora_" not in key}
    names, ranks, alphas = [], {}, {}
    for name, (lora_a, lora_b, scaling) in as_lora_tensors(peft_model).items():
        state[f"{PREFIX}{name}.lora_A.weight"], state[f"{PREFIX}{name}.lora_B.weight"] = lora_a, lora_b
        names.append(name)
        ranks[re.escape(name)] = lora_a.shape[0]
        alphas[re.escape(name)] = scaling * lora_a.shape[0]  # LoRA scales by alpha / r
    config = LoraConfig(
        r=max(ranks.values(), default=8),
        lora_alpha=ada_config.lora_alpha,
        target_modules=names or DUMMY_TARGET_MODULES,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        modules_to_save=ada_config.modules_to_save,
        bias="none",
        base_model_name_or_path=ada_config.base_model_name_or_path,
    )
    return config, state


def _write_peft_folder(peft_model: nn.Module, folder: Path, config, state: dict[str, torch.Tensor]) -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) as `save_pretrained` writes it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    base = peft_model.get_base_model()
    config.inference_mode = True
    config.base_model_name_or_path = config.base_model_name_or_path or getattr(base, "name_or_path", None)
    mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    config.save_pretrained(str(folder), auto_mapping_dict=mapping)
    tensors = {key: value.contiguous() for key, value in state.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_adapter(peft_model: nn.Module, folder: str | Path) -> None:
    """Write `folder/adapter/` (the shipped PEFT folder) and, when it differs, `folder/adapter_training.safetensors`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    form = _training_form(peft_model)
    if form is None:
        peft_model.save_pretrained(str(folder / "adapter"))
        return
    if form.get("variant") == "adalora":
        config, state = _adalora_as_lora(peft_model)
        form["rank_pattern"] = rank_allocator(peft_model).rank_pattern
    else:
        config, state = _residual_as_lora(peft_model, getattr(peft_model, INITIAL_STATE))
    _write_peft_folder(peft_model, folder / "adapter", config, state)
    save_file(_adapter_tensors(peft_model), str(folder / TRAINING_FILE), metadata={"form": json.dumps(form)})


def load_training_form(peft_model: nn.Module, checkpoint: Path) -> bool:
    """Load `adapter_training.safetensors` when the model trains in a form of its own; False when it does not.

    Raises:
        CheckpointError: the checkpoint and the recipe disagree on the variant or the inits, or its tensors do
            not fit the model.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = checkpoint / TRAINING_FILE
    form = _training_form(peft_model)
    saved = None
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            saved = json.loads((handle.metadata() or {}).get("form", "null"))
    comparable = {k: v for k, v in (saved or {}).items() if k != "rank_pattern"}
    if (form or None) != (comparable or None):
        raise CheckpointError(
            f"{checkpoint} was trained with {comparable or 'plain LoRA starts'}, but the recipe's components give "
            f"{form or 'plain LoRA starts'}; set components.*.variant / init as in the run that saved it"
        )
    if form is None:
        return False
    state = load_file(str(path))
    expected = _adapter_parameters(peft_model)  # names and shapes only: no copies
    wrong = sorted(set(state) ^ set(expected))
    wrong += [key for key in state if key in expected and state[key].shape != expected[key].shape]
    if wrong:
        raise CheckpointError(f"{path}: tensors that do not fit the model (e.g. {wrong[:3]}); use the run's recipe")
    peft_model.load_state_dict(state, strict=False)
    if "rank_pattern" in saved:
        rank_allocator(peft_model).rank_pattern = dict(saved["rank_pattern"])
        _share_rank_pattern(peft_model)
    return True


def adapter_training_state(model: nn.Module) -> Optional[dict]:
    """What resuming needs besides weights, optimizer and scheduler: AdaLoRA's importance scores (else None)."""
    allocator = rank_allocator(model)
    return allocator.state_dict() if allocator is not None else None


def restore_adapter_training_state(model: nn.Module, state: Optional[dict]) -> None:
    """Put back what `adapter_training_state` returned (nothing to do without AdaLoRA)."""
    allocator = rank_allocator(model)
    if allocator is not None and state is not None:
        allocator.load_state_dict(state)
        _share_rank_pattern(model)


def _share_rank_pattern(model: nn.Module) -> None:
    """PEFT masks by the adapter config's rank pattern after the final allocation: give it the allocator's."""
    allocator = rank_allocator(model)
    adalora_model(model).peft_config[ADAPTER].rank_pattern = dict(allocator.rank_pattern) or None
