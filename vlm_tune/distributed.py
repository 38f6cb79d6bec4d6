"""Sharded training: PyTorch FSDP2 through accelerate, with checkpoints in the single-process layout.

`accelerate launch --config_file recipes/accelerate/fsdp.yaml -m vlm_tune.train RECIPE.yaml` turns it on
(accelerate sets ACCELERATE_USE_FSDP and the FSDP_* settings of the config file); otherwise every function
here leaves the run as it was (DDP or one process). What this module adds to accelerate's FSDP2:

- the units: each repeated layer of the model (decoder, vision encoder and cross-attention layers: the
  classes transformers checkpoints layer by layer) and the relevance modules, found on the model, not named
  per recipe; the frozen base, LoRA adapters and fully trained components are sharded alike;
- parameters are gathered in the dtype they are stored in (fp32 for what trains, 16 bit or packed 4-bit for
  the frozen base) and autocast computes in 16 bit, as on one GPU; so 4-bit weights stored in the compute
  dtype (`bnb_4bit_quant_storage`, set by model/load.py) shard like any other weight;
- checkpoints: the trained weights and the optimizer state are gathered into full tensors on the main
  process and written in the layout of a one-process run, so one GPU, `evaluate`, `export` and a resume
  with any number of processes read them; a resume cuts the full optimizer state to each process's shards.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from vlm_tune.errors import VlmTuneError
from vlm_tune.recipe import Recipe

logger = logging.getLogger(__name__)


class ShardingError(VlmTuneError):
    """A setting that FSDP training cannot use (the message names the field or config key and the fix)."""


def fsdp_requested() -> bool:
    """Whether this process was launched with an FSDP accelerate config (`distributed_type: FSDP`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def is_sharded(accelerator) -> bool:
    """Whether this run's model is (to be) sharded by FSDP (its parameters are then DTensors)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


# ----------------------------------------------------------------------------------------------
# Setup: the plugin, the units, prepare
# ----------------------------------------------------------------------------------------------


def _recipe_problems(recipe: Recipe) -> list[str]:
    problems = []
    if recipe.speed.optimizer == "paged_adamw_8bit":
        problems.append(
            "speed.optimizer: paged_adamw_8bit cannot step sharded parameters; use adamw or adamw_fused "
            "(FSDP already splits the optimizer state over the GPUs)"
        )
    if recipe.speed.compile != "none":
        problems.append("speed.compile: layers is not checked under FSDP; set speed.compile: none")
    if recipe.speed.offload_activations:
        problems.append("speed.offload_activations is not checked under FSDP; set speed.offload_activations: false")
    for name, component in recipe.components.items():  # their save paths (training form, soft prompts) are unsharded
        if component.mode in ("prompt", "prefix") or component.variant == "adalora" or component.init != "default":
            problems.append(
                f"components.{name}: mode {component.mode}, variant {component.variant}, init {component.init} "
                "is not supported under FSDP; use plain lora / dora / rslora with init default, or one GPU or DDP"
            )
    if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        problems.append(
            "fsdp_activation_checkpointing (accelerate config): set it to false and use the recipe's "
            "model.gradient_checkpointing (and speed.checkpoint_components) instead"
        )
    if os.environ.get("FSDP_VERSION", "1") != "2":
        problems.append(
            "fsdp_version (accelerate config): vlm_tune trains with FSDP2; set fsdp_version: 2 under fsdp_config "
            "(as recipes/accelerate/fsdp.yaml does)"
        )
    return problems


def fsdp_plugin(recipe: Recipe):
    """The FSDP2 plugin of the accelerate config this process was launched with, or None without FSDP.

    Raises:
        ShardingError: the recipe or the accelerate config asks for something FSDP training cannot do.
    """
    if not fsdp_requested():
        return None
    problems = _recipe_problems(recipe)
    if problems:
        raise ShardingError("cannot train with FSDP as set up: " + "; ".join(problems))
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # No cast at gather: fp32 masters and fp32 relevance modules stay fp32, packed 4-bit storage is never
    # reinterpreted; autocast (train.mixed_precision) computes in 16 bit, as it does on one GPU.
    return FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=MixedPrecisionPolicy())


def layer_classes(model: nn.Module) -> list[str]:
    """Class names of the modules that become FSDP units of their own: the model's repeated layers.

    Those are the layers transformers can checkpoint one by one (decoder, vision encoder and cross-attention
    layers), and the model's `_no_split_modules` outside them (mllama's vision layers are not checkpointed
    layer by layer); and the relevance modules, which compute in fp32 outside the language model.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    names: dict[str, None] = {}
    no_split = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or []}
    layers: list[str] = []  # qualified names of the checkpointable layers
    for name, module in model.named_modules():
        inside = any(name.startswith(layer + ".") for layer in layers)
        if isinstance(module, GradientCheckpointingLayer):
            layers.append(name)
            names[type(module).__name__] = None
        elif type(module).__name__ in no_split and not inside:
            names[type(module).__name__] = None
    relevance = getattr(model, "relevance", None)
    if relevance is not None and any(True for _ in relevance.parameters()):
        names[type(relevance).__name__] = None
    return list(names)


def prepare(accelerator, model: nn.Module, optimizer):
    """`accelerator.prepare(model, optimizer)`; under FSDP first name the units, after it let `generate`
    gather the weights as `forward` does.

    The optimizer's parameter groups (one per component, the relevance group last) keep their names and
    learning rates: accelerate swaps each parameter for its shard, in place.
    """
    if not is_sharded(accelerator):
        return accelerator.prepare(model, optimizer)
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = layer_classes(model)
        logger.info("FSDP units: %s", ", ".join(plugin.transformer_cls_names_to_wrap) or "the whole model")
    model, optimizer = accelerator.prepare(model, optimizer)
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(model, "generate")  # caption metrics: generate gathers the root's weights too
    if accelerator.native_amp:  # accelerate autocasts the forward of every model but an FSDP2 one
        forward = model.forward

        def autocast_forward(*args, **kwargs):
            with accelerator.autocast():
                return forward(*args, **kwargs)

        model.forward = autocast_forward
    return model, optimizer


def peak_gpu_gib(accelerator) -> Optional[float]:
    """The highest `torch.cuda.max_memory_allocated` of the processes, in GiB (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=accelerator.device)
    return float(accelerator.reduce(peak, "max")) if accelerator.num_processes > 1 else float(peak)


def usable_on_every_process(group: list[dict], accelerator) -> list[dict]:
    """The micro-batches of one step that hold `input_ids`; under FSDP with several processes, only at the
    positions where every process has one: each forward and backward all-gathers the weights, so every process
    must run as many (DDP synchronises once per step and needs no such agreement)."""
    usable = ["input_ids" in batch for batch in group]
    if is_sharded(accelerator) and accelerator.num_processes > 1 and group:
        empty = torch.tensor([int(not keep) for keep in usable], device=accelerator.device)
        agreed = [not flag for flag in accelerator.reduce(empty, "max").bool().tolist()]
        if sum(agreed) < sum(usable):
            logger.warning(
                "%d usable micro-batch(es) left out of this step: another process had none at that position",
                sum(usable) - sum(agreed),
            )
        usable = agreed
    return [batch for batch, keep in zip(group, usable) if keep]


def on_any_process(names: list[str], accelerator) -> list[str]:
    """Under FSDP, the names any process found (each one checks only its own shards), so that every process
    decides alike; otherwise `names` (DDP processes hold the same weights)."""
    if not is_sharded(accelerator) or accelerator.num_processes == 1:
        return names
    from accelerate.utils import gather_object

    return list(dict.fromkeys(name for found in gather_object([names]) for name in found))


# ----------------------------------------------------------------------------------------------
# Checkpoints: full state out, shards back in
# ----------------------------------------------------------------------------------------------


@dataclass
class FullState:
    """What a checkpoint needs from a sharded run, gathered into full tensors (on the main process).

    Attributes:
        weights: the trained weights, keyed as `model.state_dict()` (trained parameters, the PEFT
            `modules_to_save` copies, the relevance modules).
        optimizer: the optimizer's state dict as one process would have it (full tensors, same order).
    """

    weights: dict[str, torch.Tensor]
    optimizer: dict


def _full(value, keep: bool):
    """A DTensor gathered (every process takes part) to CPU on the process that keeps it; others get None."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    if not keep:
        return None
    return value.detach().cpu().contiguous() if torch.is_tensor(value) else value


def _saved_key(name: str, trained: set[str]) -> bool:
    return name in trained or ".modules_to_save." in name or name.startswith("relevance.")


def gather_full_state(accelerator, model: nn.Module, optimizer) -> Optional[FullState]:
    """The full trained weights and optimizer state of a sharded run (call it on every process).

    Returns:
        The `FullState` on the main process; None on the others, and None when the run is not sharded.
    """
    if not is_sharded(accelerator):
        return None
    keep = accelerator.is_main_process
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    weights = {name: _full(value, keep) for name, value in model.state_dict().items() if _saved_key(name, trained)}
    sharded = optimizer.state_dict()
    state = {
        index: {key: _full(value, keep) for key, value in sorted(entry.items())}
        for index, entry in sorted(sharded["state"].items())
    }
    if not keep:
        return None
    return FullState(weights, {"state": state, "param_groups": sharded["param_groups"]})


class _ShardingLoader:
    """Stands in for a sharded optimizer when a checkpoint is loaded: cuts the full saved state to this
    process's shards (like the parameters they belong to) before loading it."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def load_state_dict(self, full: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = {}
        for index, entry in full["state"].items():
            param = params[int(index)] if int(index) < len(params) else None  # else load_state_dict says why
            state[index] = {
                key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
                if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape
                else value
                for key, value in entry.items()
            }
        self.optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def state_loader(optimizer) -> Any:
    """What `checkpoint.load_training_state` loads the optimizer state into: the optimizer itself, or under
    FSDP a loader that shards the full saved state first (a checkpoint of any number of processes)."""
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])
    return _ShardingLoader(optimizer) if sharded else optimizer
