"""The recipe's `speed` section applied to a targeted model: liger-kernel, loss, padding tiles, vision states,
vision attention, checkpointing (and offloading its inputs), compilation, optimizer.

Each lever computes what the plain path computes (tests/model/test_model_speed.py compares losses and
gradients); benchmarks/gpu.py measures what each one buys on a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm_tune.errors import VlmTuneError
from vlm_tune.model.components import ComponentMap
from vlm_tune.model.wrapping import base_model
from vlm_tune.recipe import ModelConfig, SpeedConfig

logger = logging.getLogger(__name__)


class SpeedError(VlmTuneError, ValueError):
    """A speed setting that cannot be used here (the message names the field and the fix)."""


def refuse_other_families(model_type: str, families, setting: str, off: str) -> None:
    """Raise SpeedError when `setting` is not checked on `model_type` (the message lists `families`)."""
    if model_type not in families:
        raise SpeedError(
            f"{setting} is not checked on {model_type} models (valid: {', '.join(families)}); set {setting}: {off}"
        )


@dataclass
class SpeedPatches:
    """What `apply_speed` installed; `remove()` returns the model to its own paths."""

    handles: list = field(default_factory=list)
    checkpointed: dict[str, int] = field(default_factory=dict)  # component -> layers that recompute
    offloaded: int = 0  # checkpointed layers whose inputs wait in CPU memory (speed.offload_activations)
    compiled: dict[str, int] = field(default_factory=dict)  # component -> layers compiled (speed.compile)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def checkpoint_layers(model: nn.Module, cmap: ComponentMap, components: list[str], every: int) -> dict[str, int]:
    """Keep activation checkpointing on only for every `every`-th layer of the named components.

    Acts on the layers `model.gradient_checkpointing` switched on (transformers' GradientCheckpointingLayer);
    layers are counted per component in model order, the first of each component included.
    Returns:
        component -> number of layers left checkpointed.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    seen: dict[str, int] = {}
    kept: dict[str, int] = {}
    for name, module in base_model(model).named_modules():
        if not isinstance(module, GradientCheckpointingLayer) or not module.gradient_checkpointing:
            continue
        component = cmap.component_of(name) or "other"
        position = seen.get(component, 0)
        seen[component] = position + 1
        module.gradient_checkpointing = component in components and position % every == 0
        kept[component] = kept.get(component, 0) + int(module.gradient_checkpointing)
    return kept


class _InputCasts:
    """What `keep_lora_inputs_16bit` changed; `remove()` gives each LoRA layer its own setting back."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.before = [layer.__dict__.get("cast_input_dtype_enabled") for layer in layers]
        for layer in layers:
            layer.cast_input_dtype_enabled = False

    def remove(self) -> None:
        for layer, before in zip(self.layers, self.before):
            if before is None:
                layer.__dict__.pop("cast_input_dtype_enabled", None)
            else:
                layer.cast_input_dtype_enabled = before
        self.layers = []


def keep_lora_inputs_16bit(model: nn.Module) -> _InputCasts:
    """`speed.lora_input: autocast`: PEFT's plain LoRA layers stop casting their input to the fp32 trained weights.

    Under autocast the product casts that input back to 16 bit, so the cast only costs an activation-sized copy
    per layer (and one in its backward). DoRA and other variants keep the cast: they compute outside autocast's ops.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not getattr(m, "lora_variant", None)]
    return _InputCasts(layers)


def _mllama_levers(model: nn.Module, speed: SpeedConfig) -> list:
    """mllama's own levers: padding tiles skip the projector, the vision encoders keep only what is read, the
    padding mask is read before the vision tower."""
    from vlm_tune.model.decoder_mask import install_early_padding_read
    from vlm_tune.model.tiles import install_padding_tile_drop
    from vlm_tune.model.vision_states import keep_needed_vision_states

    handles = []
    if speed.padding_tiles == "drop":
        handles.append(install_padding_tile_drop(model))
    if speed.vision_states == "needed":
        handles.append(keep_needed_vision_states(model))
    if speed.padding_read == "early":
        handles.append(install_early_padding_read(model))
    return handles


def apply_speed(
    model: nn.Module, speed: SpeedConfig, model_cfg: ModelConfig, cmap: ComponentMap, autocast: bool = False
) -> SpeedPatches:
    """Install the recipe's speed levers on the model `apply_targeting` returned.

    Args:
        model: the targeted (PEFT) model.
        speed: the recipe's `speed` section; model_cfg: its `model` section (gradient_checkpointing).
        cmap: the model's components (from `find_components`).
        autocast: training runs under mixed precision (train.mixed_precision other than no).
    Returns:
        The installed patches.
    """
    from vlm_tune.model.loss import install_chunked_loss

    patches = SpeedPatches()
    if speed.liger_kernel:  # first: its refusals leave nothing installed
        from vlm_tune.model.liger import install_liger_kernels

        patches.handles.append(install_liger_kernels(model, cmap))
    if autocast and speed.lora_input == "autocast":
        patches.handles.append(keep_lora_inputs_16bit(model))
    if speed.padding_free:
        from vlm_tune.model.padding_free import install_padding_free

        patches.handles.append(install_padding_free(model))
    if speed.vision_cache_gib > 0:
        from vlm_tune.model.vision_cache import install_vision_cache

        patches.handles.append(install_vision_cache(model, speed.vision_cache_gib))
    if speed.loss == "chunked":
        patches.handles.append(install_chunked_loss(model, speed.loss_chunk_tokens))
    if cmap.model_type == "mllama":
        patches.handles += _mllama_levers(model, speed)
    if speed.vision_attention == "batched":
        from vlm_tune.model.vision_attention import install_batched_vision_attention

        patches.handles += install_batched_vision_attention(model)
    if model_cfg.gradient_checkpointing:
        patches.checkpointed = checkpoint_layers(model, cmap, speed.checkpoint_components, speed.checkpoint_every)
        logger.info("Activation checkpointing on %s layers", patches.checkpointed or "no")
    if model_cfg.gradient_checkpointing and speed.activation_budget_gib is not None:
        from vlm_tune.model.checkpoint_budget import install_activation_budget

        patches.handles.append(install_activation_budget(model, speed.activation_budget_gib))
    if model_cfg.gradient_checkpointing and speed.offload_activations:
        from vlm_tune.model.offload import offload_checkpoint_inputs

        handle = offload_checkpoint_inputs(model)
        patches.handles.append(handle)
        patches.offloaded = len(handle.layers)
        logger.info("Inputs of %d checkpointed layers held in CPU memory", patches.offloaded)
    if speed.compile == "layers":
        from vlm_tune.model.compile import compile_layers

        handle, patches.compiled = compile_layers(model, cmap, speed.compile_components, speed.compile_mode)
        patches.handles.append(handle)
        logger.info("torch.compile (%s) on %s layers", speed.compile_mode, patches.compiled or "no")
    return patches


def build_optimizer(groups: list[dict], speed: SpeedConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer `speed.optimizer` names, over the parameter groups of `param_groups`.

    Raises:
        SpeedError: paged_adamw_8bit without bitsandbytes.
    """
    groups = [group for group in groups if group["params"]]
    if speed.optimizer == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SpeedError(
                "speed.optimizer: paged_adamw_8bit needs bitsandbytes (pip install bitsandbytes), "
                "or set speed.optimizer: adamw_fused"
            ) from None
        return bnb.optim.PagedAdamW8bit(groups, lr=lr)
    if speed.optimizer == "adamw_fused":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr)
