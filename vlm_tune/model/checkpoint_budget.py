"""Checkpointing chosen for an activation budget (`speed.activation_budget_gib`).

Full checkpointing recomputes every layer's forward in backward; no checkpointing keeps every layer's saved
activations. With a budget, the first training forward first runs a probe of the same batch with the candidate
layers' checkpointing off (those `model.gradient_checkpointing` and `speed.checkpoint_components` /
`checkpoint_every` chose). The probe records, per layer, the bytes of the tensors autograd saves for backward
(model weights excluded), and the bytes of the layer's input: what a checkpointed layer keeps instead. It keeps
each layer's saved tensors only until that layer ends and never runs backward, so it needs one layer's
activations at a time. Checkpointing then goes back on for the layers that save the most beyond their input, one
at a time, until the saved activations fit the budget; the rest skip the recompute. The choice holds for the run:
later batches longer than the first save more, so leave a margin. The probe runs under a forked RNG, so
dropout draws are those of a run without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm_tune.model.wrapping import base_model

logger = logging.getLogger(__name__)
GIB = 2**30


@dataclass
class SavedBytes:
    """What the probe measured: per candidate layer, its saved activations and its input; the rest of the model."""

    layers: list[int] = field(default_factory=list)  # saved bytes per layer, in model order
    inputs: list[int] = field(default_factory=list)  # the bytes a checkpointed layer keeps instead
    other: int = 0  # saved outside the candidate layers (embeddings, projector, loss)


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class _Probe:
    """Counts the storages autograd saves, by layer. A layer's saved tensors are held until the layer ends, the
    others until the probe ends, so no storage is counted twice and no address is reused while counted."""

    def __init__(self, model: nn.Module, layers: list[nn.Module]):
        self.weights = {_storage(p)[0] for p in model.parameters()} | {_storage(b)[0] for b in model.buffers()}
        self.bytes = SavedBytes([0] * len(layers), [0] * len(layers))
        self.current, self.held, self.held_outside, self.seen = None, [], [], set()

    def pack(self, tensor: torch.Tensor):
        pointer, size = _storage(tensor)
        if pointer in self.weights or pointer in self.seen or size == 0:
            return None
        self.seen.add(pointer)
        if self.current is None:
            self.held_outside.append(tensor)
            self.bytes.other += size
        else:
            self.held.append(tensor)
            self.bytes.layers[self.current] += size
        return None  # no backward runs on the probe

    def enter(self, index: int, args, kwargs) -> None:
        first = args[0] if args else kwargs.get("hidden_states")
        self.bytes.inputs[index] = _storage(first)[1] if isinstance(first, torch.Tensor) else 0
        self.current = index

    def leave(self) -> None:
        for tensor in self.held:
            self.seen.discard(_storage(tensor)[0])
        self.held, self.current = [], None


def measure_saved_bytes(model: nn.Module, layers: list[nn.Module], args, kwargs) -> SavedBytes:
    """One forward of `model(*args, **kwargs)` with the layers' checkpointing off, counting saved activations."""
    probe = _Probe(model, layers)
    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, k, i=index: probe.enter(i, a, k), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o: probe.leave()))
    flags = [layer.gradient_checkpointing for layer in layers]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        for layer in layers:
            layer.gradient_checkpointing = False
        with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda x: x):
            model(*args, **kwargs)
    finally:
        for layer, flag in zip(layers, flags):
            layer.gradient_checkpointing = flag
        for handle in handles:
            handle.remove()
    return probe.bytes


def choose_checkpointed(saved: SavedBytes, budget_bytes: float) -> tuple[list[bool], int]:
    """Which layers recompute: the fewest, largest savings first, that bring the saved bytes under the budget.

    Returns:
        (checkpointed per layer, the saved bytes with that choice).
    """
    total = saved.other + sum(saved.layers)
    chosen = [False] * len(saved.layers)
    for index in sorted(range(len(chosen)), key=lambda i: saved.layers[i] - saved.inputs[i], reverse=True):
        if total <= budget_bytes or saved.layers[index] <= saved.inputs[index]:
            break
        chosen[index] = True
        total -= saved.layers[index] - saved.inputs[index]
    return chosen, total


def candidate_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost layers whose checkpointing is on (transformers' GradientCheckpointingLayer), in model order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers, names = [], []
    for name, module in base_model(model).named_modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            if not any(name.startswith(outer + ".") for outer in names):
                layers.append(module)
                names.append(name)
    return layers


class BudgetHandle:
    """The first-forward hook of `install_activation_budget`; `remove()` takes it off (before it ran, or after)."""

    def __init__(self):
        self.hook, self.checkpointed, self.saved_gib = None, None, None

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def install_activation_budget(model: nn.Module, budget_gib: float) -> BudgetHandle:
    """On the first training forward with gradients, probe that batch and keep checkpointing on only for the
    layers `choose_checkpointed` picks for `budget_gib` of saved activations (a log line says how many)."""
    base = base_model(model)
    layers = candidate_layers(model)
    handle = BudgetHandle()

    def before(module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()) or handle.hook is None:
            return None
        handle.remove()  # once, and not again inside the probe's own forward
        saved = measure_saved_bytes(module, layers, args, kwargs)
        chosen, total = choose_checkpointed(saved, budget_gib * GIB)
        for layer, on in zip(layers, chosen):
            layer.gradient_checkpointing = on
        handle.checkpointed, handle.saved_gib = sum(chosen), total / GIB
        log = logger.warning if total > budget_gib * GIB else logger.info
        log(
            "speed.activation_budget_gib %.2f: checkpointing %d of %d layers; the first batch saves %.2f GiB "
            "of activations (%.2f GiB with every layer checkpointed, %.2f GiB with none)",
            budget_gib,
            sum(chosen),
            len(layers),
            total / GIB,
            (saved.other + sum(saved.inputs)) / GIB,
            (saved.other + sum(saved.layers)) / GIB,
        )
        return None

    handle.hook = base.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
    return handle
