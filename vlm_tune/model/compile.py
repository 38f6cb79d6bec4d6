"""Regional compilation (`speed.compile: layers`): torch.compile on each repeated transformer block.

A training step of a large VLM launches thousands of small kernels (LoRA's products, norms, rotary embeddings,
4-bit dequantisation, casts); compiling fuses them. Compiling the whole model takes long and breaks on its
data-dependent parts (image scattering, padding-tile drop, the chunked loss); one repeated block is small,
traces cleanly, and the layers of one class share one compiled graph, so compile time stays short.

The blocks are the model's repeated layers (the classes FSDP shards one by one, `layer_classes`) of the
components on the gradient path: a frozen vision tower in front of everything that trains runs as it is.
Each block's `forward` is replaced by an instance attribute that runs the compiled forward in training with
gradients, and the block's own forward otherwise (evaluation, `generate` with its cache). Parameters stay where
they are, so state dicts, checkpoints and exports keep their keys. With transformers' activation checkpointing,
the recompute runs the compiled forward again (transformers >= 5.23 checkpoints inside `forward`, so the
checkpoint is traced into the graph; older versions checkpoint around it).

What stays eager: PEFT's DoRA layers cache their weight norm in a dict, which Dynamo cannot trace inside a
checkpointed region (and breaks its graph outside one), so DoRA gains little (a warning says so); Qwen's vision
blocks read sequence lengths from a tensor (a graph break). Either way the result is the eager one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vlm_tune.constants import COMPONENT_NAMES
from vlm_tune.model.components import ComponentMap
from vlm_tune.model.patches import ForwardRestorer
from vlm_tune.model.wrapping import base_model

logger = logging.getLogger(__name__)


def _checkpoints_inside_forward() -> bool:
    """transformers >= 5.23 checkpoints inside a layer's `forward` (earlier versions around `__call__`)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return "__call__" not in GradientCheckpointingLayer.__dict__


_CHECKPOINTS_INSIDE_FORWARD = _checkpoints_inside_forward()


class _TrainingForward:
    """A block's forward: compiled in training with gradients, the block's own forward otherwise."""

    def __init__(self, module: nn.Module, mode: str):
        from vlm_tune.model.offload import OffloadingCheckpoint

        self.module = module
        self.eager = module.forward  # the class's forward, bound to this block
        self.compiled = torch.compile(self.eager, mode=mode)
        self.offload = module.__dict__.get("_gradient_checkpointing_func")
        if not (_CHECKPOINTS_INSIDE_FORWARD and isinstance(self.offload, OffloadingCheckpoint)):
            self.offload = None
        else:  # Dynamo cannot trace the offload hooks: they go around the compiled forward
            self.offload.hooked_outside = True

    def __call__(self, *args, **kwargs):
        if self.module.training and torch.is_grad_enabled():
            if self.offload is not None:
                with self.offload.hooks():
                    return self.compiled(*args, **kwargs)
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)


class CompiledLayers:
    """What `compile_layers` installed; `remove()` gives each block the forward it had before."""

    def __init__(self, modules: list[nn.Module], restorers: list[ForwardRestorer]):
        self.modules, self._restorers = modules, restorers

    def remove(self) -> None:
        for module in self.modules:
            if module.forward.offload is not None:  # the offload hooks go back inside the checkpoint function
                module.forward.offload.hooked_outside = False
        for restorer in self._restorers:
            restorer.remove()
        self.modules, self._restorers = [], []


def _on_gradient_path(base: nn.Module, cmap: ComponentMap) -> set[str]:
    """Components at or after the first one (in data-flow order) holding a trainable parameter."""
    trains = {cmap.component_of(name) for name, param in base.named_parameters() if param.requires_grad}
    first = next((i for i, name in enumerate(COMPONENT_NAMES) if name in trains), len(COMPONENT_NAMES))
    return set(COMPONENT_NAMES[first:])


def repeated_blocks(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each repeated layer of the transformers model `base`, outermost only, in model order."""
    from vlm_tune.distributed import layer_classes

    classes = set(layer_classes(base))
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in base.named_modules():
        if type(module).__name__ in classes and not any(name.startswith(outer + ".") for outer, _ in blocks):
            blocks.append((name, module))
    return blocks


def compile_layers(
    model: nn.Module, cmap: ComponentMap, components: list[str], mode: str = "default"
) -> tuple[CompiledLayers, dict[str, int]]:
    """torch.compile every repeated block of the named components that lies on the gradient path.

    Args:
        model: the targeted (PEFT) model. cmap: its components.
        components: `speed.compile_components`. mode: `speed.compile_mode` (torch.compile's mode).
    Returns:
        (the handle, component -> number of compiled blocks).
    """
    base = base_model(model)
    wanted = set(components) & _on_gradient_path(base, cmap)
    compiled, restorers, counts = [], [], {}
    for name, module in repeated_blocks(base):
        component = cmap.component_of(name) or "other"
        previous = module.__dict__.get("forward")
        if component not in wanted or isinstance(previous, _TrainingForward):
            continue
        module.forward = _TrainingForward(module, mode)
        compiled.append(module)
        restorers.append(ForwardRestorer(module, previous))
        counts[component] = counts.get(component, 0) + 1
    if any(len(getattr(layer, "lora_magnitude_vector", ())) for module in compiled for layer in module.modules()):
        logger.warning("speed.compile: PEFT's DoRA layers break torch.compile's graphs; expect little speed-up")
    return CompiledLayers(compiled, restorers), counts
