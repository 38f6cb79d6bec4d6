"""Checkpointed layers' inputs held in CPU memory (`speed.offload_activations`).

With activation checkpointing, what stays on the GPU between a layer's forward and its backward is the layer's
input (the hidden states it recomputes from): `layers x batch x tokens x hidden` bytes, for Qwen2.5-VL-7B at
batch 4 and 444 tokens 0.33 GiB. Offloading copies each such input into pinned CPU memory during the forward
and back before the layer's recompute. The copies run on the compute stream, so they cost time (PCIe bandwidth),
and they free exactly that memory. The result is the same tensor, so losses and gradients do not change.

Our own hooks rather than transformers' `activation_checkpointing_enable(offload=True)`: transformers 5.17 has
none, and torch's `save_on_cpu` copies every saved tensor (older versions block on each copy).
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_tune.model.wrapping import base_model

MIN_OFFLOAD_BYTES = 1 << 20  # smaller inputs (masks, positions) are not worth a copy


class _Offloaded:
    """A saved tensor's CPU copy and the device it goes back to."""

    def __init__(self, tensor: torch.Tensor):
        self.device = tensor.device
        pinned = tensor.is_cuda  # pinned memory lets the copies run without blocking the CPU
        self.copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
        self.copy.copy_(tensor, non_blocking=pinned)


def _pack(tensor: torch.Tensor):
    if isinstance(tensor, nn.Parameter) or tensor.layout != torch.strided:
        return tensor
    if tensor.numel() * tensor.element_size() < MIN_OFFLOAD_BYTES:
        return tensor
    return _Offloaded(tensor)


def _unpack(packed):
    if isinstance(packed, _Offloaded):
        return packed.copy.to(packed.device, non_blocking=packed.copy.is_pinned())
    return packed


class OffloadingCheckpoint:
    """A layer's checkpoint function whose saved inputs go to CPU memory (the recompute's saves are its own)."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.packed = 0  # tensors offloaded so far (tests and logs read it)
        self.hooked_outside = False  # set by compile.py: the caller enters `hooks()` around the compiled forward

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context that offloads what is saved inside it (counted in `packed`)."""

        def pack(tensor):
            packed = _pack(tensor)
            self.packed += isinstance(packed, _Offloaded)
            return packed

        return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)

    def __call__(self, function, *args, **kwargs):
        if self.hooked_outside:
            return self.checkpoint(function, *args, **kwargs)
        with self.hooks():
            return self.checkpoint(function, *args, **kwargs)


class OffloadedInputs:
    """What `offload_checkpoint_inputs` installed; `remove()` gives each layer its checkpoint function back."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers

    @property
    def packed(self) -> int:
        """Tensors offloaded so far, over all layers."""
        return sum(layer._gradient_checkpointing_func.packed for layer in self.layers)

    def remove(self) -> None:
        for layer in self.layers:
            layer._gradient_checkpointing_func = layer._gradient_checkpointing_func.checkpoint
        self.layers = []


def offload_checkpoint_inputs(model: nn.Module) -> OffloadedInputs:
    """Hold the saved inputs of every checkpointed layer (transformers' GradientCheckpointingLayer) in CPU memory.

    Acts on the layers that checkpoint now (after `checkpoint_layers`); a layer that does not checkpoint keeps
    its activations on the GPU as before.
    Returns:
        The handle (`.remove()` undoes it; `.packed` counts the offloaded tensors).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = []
    for module in base_model(model).modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            previous = module._gradient_checkpointing_func
            if not isinstance(previous, OffloadingCheckpoint):
                module._gradient_checkpointing_func = OffloadingCheckpoint(previous)
                layers.append(module)
    return OffloadedInputs(layers)
