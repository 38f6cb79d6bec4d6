"""AdaLoRA with one rank budget per component: PEFT's RankAllocator, run on each component's layers alone.

PEFT's AdaLoRA trains one adapter whose RankAllocator shares one budget over every layer it wraps, and
starts every layer at one `init_r`. Here the adapter is still PEFT's (its SVD layers, its
`update_and_allocate` schedule), but each component's layers start at that component's `rank`, and the
allocator PEFT calls is a `ComponentRankAllocator`: one PEFT `RankAllocator` per component, each seeing only
that component's parameters and aiming at that component's `target_rank`. So a vision encoder at rank 32 ->
16 and a decoder at 12 -> 8 re-allocate independently, by PEFT's own importance scores.

The training loop calls `orthogonality_penalty` (added to each micro-batch's loss) and `allocate_ranks` (after
the optimizer step, before zero_grad), both no-ops for other variants.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from vlm_tune.errors import VlmTuneError

ADAPTER = "default"
PLACEHOLDER_STEPS = 1_000_000  # AdaLoraConfig needs a run length at creation; training sets the real one


class AdaLoraScheduleError(VlmTuneError, ValueError):
    """A rank-allocation schedule that does not fit the run (the message names train.adalora's fields)."""


class _Parameters:
    """The named parameters of one component's AdaLoRA layers, shaped like a model for PEFT's RankAllocator."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        self._named = named

    def named_parameters(self):
        return iter(self._named)

    def fill_missing_grads(self) -> None:
        """A parameter that got no gradient this step scores as one whose gradient is zero."""
        for _, param in self._named:
            if param.grad is None:
                param.grad = torch.zeros_like(param)


class ComponentRankAllocator:
    """PEFT's `RankAllocator` once per component (what `AdaLoraModel.update_and_allocate` calls).

    Attributes:
        allocators: component -> (PEFT RankAllocator with that component's target rank, its parameters).
        layers: component -> its AdaLoRA layers (base-model module name -> layer).
        rank_pattern: lora_E parameter name -> kept triplets (one bool per starting rank), once allocated.
        orth_reg_weight: weight of the orthogonality regulariser (train.adalora.orth_reg_weight).
    """

    def __init__(self, model: nn.Module, peft_config, layers: dict[str, dict[str, nn.Module]], targets: dict):
        from peft.tuners.adalora.layer import RankAllocator

        self.layers = layers
        self.allocators: dict[str, tuple[Any, _Parameters]] = {}
        named = dict(model.named_parameters())
        for component, component_layers in layers.items():
            params = [
                (f"{layer}.{kind}.{ADAPTER}", named[f"{layer}.{kind}.{ADAPTER}"])
                for layer in component_layers
                for kind in ("lora_A", "lora_B", "lora_E")
            ]
            config = copy.copy(peft_config)
            config.target_r = targets[component]
            view = _Parameters(params)
            self.allocators[component] = (RankAllocator(view, config, ADAPTER), view)
        self.rank_pattern: dict[str, list[bool]] = {}
        self.orth_reg_weight = 0.0

    def update_and_allocate(self, model, global_step: int, force_mask: bool = False):
        """PEFT's `RankAllocator.update_and_allocate`, per component; returns (None, the merged rank pattern
        when some component re-allocated at this step, else None)."""
        changed = False
        for allocator, params in self.allocators.values():
            config = allocator.peft_config
            if global_step < config.total_step - config.tfinal:
                params.fill_missing_grads()
                allocator.update_ipt(params)
            budget, mask_now = allocator.budget_schedule(global_step)
            if (mask_now or force_mask) and budget < allocator.init_bgt:  # kthvalue needs something to cut
                self.rank_pattern.update(allocator.mask_to_budget(params, budget))
                changed = True
        return None, (dict(self.rank_pattern) if changed else None)

    def reset_ipt(self) -> None:
        for allocator, _ in self.allocators.values():
            allocator.reset_ipt()

    def mask_using_rank_pattern(self, model, rank_pattern) -> None:
        """Keep the pruned triplets at zero after the final allocation (PEFT masks instead of resizing)."""
        allocator, _ = next(iter(self.allocators.values()))
        allocator.mask_using_rank_pattern(model, rank_pattern)

    def set_schedule(self, total_steps: int, warmup: int, final: int, interval: int) -> None:
        for allocator, _ in self.allocators.values():
            config = allocator.peft_config
            config.total_step, config.tinit, config.tfinal, config.deltaT = total_steps, warmup, final, interval

    def state_dict(self) -> dict:
        """Importance scores and the rank pattern (what an exact resume needs besides weights and optimizer)."""
        scores = {
            component: {key: dict(getattr(allocator, key)) for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
            for component, (allocator, _) in self.allocators.items()
        }
        return {"scores": scores, "rank_pattern": dict(self.rank_pattern)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s scores (read on the CPU) onto each parameter's device, and the rank pattern."""
        for component, (allocator, params) in self.allocators.items():
            devices = {name: param.device for name, param in params.named_parameters()}
            for key, values in state["scores"].get(component, {}).items():
                setattr(allocator, key, {name: score.to(devices[name]) for name, score in values.items()})
        self.rank_pattern = dict(state["rank_pattern"])


def attach_rank_allocation(peft_model, layers: dict[str, dict[str, nn.Module]], policy: dict) -> None:
    """Start each component's AdaLoRA layers at its own rank and alpha, and give PEFT a per-component allocator.

    Args:
        peft_model: a PeftModel of type AdaLoRA (every layer at the config's `init_r`).
        layers: component -> {base-model module name: its AdaLoRA layer}.
        policy: component -> ComponentConfig (rank, alpha, target rank).
    """
    ada = peft_model.base_model
    config = ada.peft_config[ADAPTER]
    for component, component_layers in layers.items():
        cfg = policy[component]
        for layer in component_layers.values():
            if layer.r[ADAPTER] != cfg.rank or layer.scaling[ADAPTER] != cfg.alpha:
                layer.update_layer(ADAPTER, cfg.rank, cfg.alpha, config=config)
    targets = {component: policy[component].adalora_target_rank for component in layers}
    ada.rankallocator = ComponentRankAllocator(ada.model, config, layers, targets)


def rank_allocator(model: nn.Module) -> Optional[ComponentRankAllocator]:
    """The per-component allocator of an AdaLoRA model (under DDP, relevance or soft-prompt wrappers), else None."""
    allocator = getattr(adalora_model(model), "rankallocator", None)
    return allocator if isinstance(allocator, ComponentRankAllocator) else None


def schedule_rank_allocation(model: nn.Module, total_steps: int, schedule) -> None:
    """Give an AdaLoRA model the run's length and the recipe's schedule (no-op for other models).

    Args:
        model: the built model. total_steps: optimizer steps of the run.
        schedule: the recipe's train.adalora (AdaLoraSchedule).
    Raises:
        AdaLoraScheduleError: warmup + final leave no step to allocate in.
    """
    allocator = rank_allocator(model)
    if allocator is None:
        return
    warmup, final = schedule.steps(total_steps)
    if warmup >= total_steps - final:
        raise AdaLoraScheduleError(
            f"train.adalora: warmup ({warmup} steps) and final ({final} steps) leave no step to re-allocate ranks "
            f"in a run of {total_steps} steps; lower train.adalora.warmup / final, or train longer"
        )
    config = adalora_model(model).peft_config[ADAPTER]
    config.total_step, config.tinit, config.tfinal, config.deltaT = total_steps, warmup, final, schedule.interval
    config.orth_reg_weight = 0.0  # the loop adds the regulariser itself (in training only, not in eval losses)
    allocator.set_schedule(total_steps, warmup, final, schedule.interval)
    allocator.orth_reg_weight = schedule.orth_reg_weight


def adalora_model(model: nn.Module):
    """The PEFT tuner (an AdaLoraModel for AdaLoRA) inside `model`, or None."""
    from peft import PeftModel

    for _ in range(4):  # DDP -> wrapper -> PeftModel
        if isinstance(model, PeftModel):
            return model.base_model
        model = getattr(model, "module", None) or getattr(model, "model", None)
    return None


def orthogonality_penalty(model: nn.Module):
    """AdaLoRA's regulariser: weight x mean over A and B matrices of ||AA^T - I||_F and ||B^T B - I||_F.

    Returns 0.0 for models without per-component rank allocation, or with weight 0.
    """
    allocator = rank_allocator(model)
    if allocator is None or not allocator.orth_reg_weight:
        return 0.0
    norms = []
    for layers in allocator.layers.values():
        for layer in layers.values():
            lora_a, lora_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]  # [r, in], [out, r]
            for gram in (lora_a @ lora_a.T, lora_b.T @ lora_b):  # [r, r]
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                norms.append(torch.linalg.matrix_norm(gram - eye))
    return allocator.orth_reg_weight * torch.stack(norms).mean()


def allocate_ranks(model: nn.Module, step: int) -> None:
    """PEFT's `update_and_allocate(step)` for AdaLoRA models (after the optimizer step, before zero_grad)."""
    if rank_allocator(model) is not None:
        with torch.no_grad():
            adalora_model(model).update_and_allocate(step)


def kept_triplets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model layer name -> [r] bool: the triplets an AdaLoRA layer keeps (all of them before allocation)."""
    allocator = rank_allocator(model)
    if allocator is None:
        return {}
    kept = {}
    for layers in allocator.layers.values():
        for name, layer in layers.items():
            pattern = allocator.rank_pattern.get(f"{name}.lora_E.{ADAPTER}")
            rank = layer.r[ADAPTER]
            kept[name] = torch.tensor(pattern, dtype=torch.bool) if pattern else torch.ones(rank, dtype=torch.bool)
    return kept


def layer_ranks(model: nn.Module) -> dict[str, dict[str, int]]:
    """Component -> {layer: its current rank} of an AdaLoRA model ({} for others)."""
    allocator = rank_allocator(model)
    if allocator is None:
        return {}
    kept = kept_triplets(model)
    return {
        component: {name: int(kept[name].sum()) for name in layers} for component, layers in allocator.layers.items()
    }


def as_lora_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Each AdaLoRA layer as a plain LoRA update: name -> (A [r', in], B [out, r'], scaling), r' = kept triplets.

    AdaLoRA's update B (A * E) alpha / ranknum equals LoRA's B' A' scaling with A' = (A * E)[kept],
    B' = B[:, kept] and scaling = alpha / ranknum; layers that kept no triplet are left out.
    """
    allocator = rank_allocator(model)
    out = {}
    for name, keep in kept_triplets(model).items():
        layer = next(layers[name] for layers in allocator.layers.values() if name in layers)
        if not keep.any():
            continue
        with torch.no_grad():
            weights = layer.lora_A[ADAPTER] * layer.lora_E[ADAPTER]  # [r, in]
            keep = keep.to(weights.device)
            scaling = float(layer.scaling[ADAPTER] / (layer.ranknum[ADAPTER] + 1e-5))
            out[name] = (weights[keep].float().cpu(), layer.lora_B[ADAPTER][:, keep].float().cpu(), scaling)
    return out


def write_layer_ranks(model: nn.Module, report, run_dir, checkpoint=None) -> None:
    """AdaLoRA: the run folder's components.txt / components.json show each layer's rank as of this save, and
    the checkpoint folder gets its own components.txt (the ranks its weights hold: export reads it); no-op for
    other variants."""
    ranks = layer_ranks(model)
    if ranks and report is not None:
        report.layer_ranks = ranks
        report.write(run_dir)
        if checkpoint is not None:
            (Path(checkpoint) / "components.txt").write_text(report.table() + "\n")
