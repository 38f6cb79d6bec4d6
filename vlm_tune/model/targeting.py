"""Turn a per-component policy (frozen / lora / full) into one PEFT model, and report what trains.

One `LoraConfig` covers every LoRA component: explicit `target_modules`, a `rank_pattern` /
`alpha_pattern` entry per component, and `modules_to_save` for `full` components whose modules can be
named alone, so the saved adapter is a standard PEFT folder. Frozen vision towers run under no_grad.
"""

from __future__ import annotations

import re
import warnings
from typing import Optional

from torch import nn

from vlm_tune.errors import VlmTuneError
from vlm_tune.model.components import ComponentMap, find_components
from vlm_tune.model.patches import require_grad_on_output, run_without_grad
from vlm_tune.model.report import ComponentRow, TargetingReport, param_count
from vlm_tune.model.variants import adapter_config, prepare_layers
from vlm_tune.recipe import COMPONENT_NAMES, ComponentConfig

ADAPTER = "default"


class TargetingError(VlmTuneError, ValueError):
    """A component policy that cannot be applied to this model (the message names the fix)."""


_PEFT_SEGMENTS = re.compile(
    rf"\.(?:lora_[A-Za-z_]+|modules_to_save)\.{ADAPTER}(?=\.|$)|\.(?:base_layer|original_module)(?=\.|$)"
)


def base_name(peft_name: str) -> str:
    """The base-model name of a parameter or module of the PEFT model.

    `...q_proj.lora_A.default.weight` -> `...q_proj.weight`.
    """
    return _PEFT_SEGMENTS.sub("", peft_name.removeprefix("base_model.model."))


# ----------------------------------------------------------------------------------------------
# Checks and planning
# ----------------------------------------------------------------------------------------------


def _check_policy(cmap: ComponentMap, policy: dict[str, ComponentConfig], model: nn.Module) -> dict[str, list[str]]:
    """Validate the policy against the model; return component -> LoRA leaves for lora components."""
    errors = [
        f"components.{n}: unknown component, expected one of {list(COMPONENT_NAMES)}"
        for n in policy
        if n not in COMPONENT_NAMES
    ]
    found = cmap.found()
    wrapped: dict[str, list[str]] = {}
    quantized = {n for n, p in model.named_parameters() if getattr(p, "quant_state", None) is not None}
    for comp, cfg in policy.items():
        if comp not in COMPONENT_NAMES or cfg.mode == "frozen":
            continue
        if comp not in found:
            errors.append(
                f"components.{comp}: mode {cfg.mode}, but this {cmap.model_type} model has no {comp} "
                f"component (components found: {', '.join(found)}). Set components.{comp}.mode: frozen, "
                f"or define it with components.{comp}.modules: [regex, ...]"
            )
            continue
        if cfg.mode == "lora":
            wrapped[comp] = cmap.lora_candidates(comp, list(cfg.targets))
            if not wrapped[comp]:
                leaves = [n for n in cmap.linear_leaves if cmap.component_of(n) == comp][:8]
                errors.append(
                    f"components.{comp}.targets: {list(cfg.targets)} match no nn.Linear leaf of {comp} in "
                    f"this {cmap.model_type} model (its Linear leaves: {leaves or 'none'}). "
                    f"Use mode: full, or name leaves / regexes in targets"
                )
        elif cfg.mode == "full" and any(cmap.component_of(n) == comp for n in quantized):
            errors.append(
                f"components.{comp}: mode full needs 16-bit weights, but {comp} was loaded in 4-bit; "
                f"add {comp} to model.quantization.keep_16bit, or use mode: lora"
            )
    variants = {policy[c].variant for c in wrapped}
    if len(variants) > 1:
        errors.append(
            f"components.*.variant: LoRA components must share one variant (PEFT sets DoRA / rsLoRA / AdaLoRA "
            f"for the whole adapter), got {', '.join(f'{c}={policy[c].variant}' for c in wrapped)}"
        )
    if errors:
        raise TargetingError(
            f"cannot apply the component policy to this {cmap.model_type} model:\n"
            + "\n".join(f"  - {e}" for e in errors)
        )
    return wrapped


def _callable_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Replace ModuleList / ModuleDict entries (never called themselves) by their items."""
    named = dict(model.named_modules())
    out = []
    for name in names:
        if isinstance(named[name], (nn.ModuleList, nn.ModuleDict)):
            out += _callable_modules(model, [f"{name}.{child}" for child, _ in named[name].named_children()])
        else:
            out.append(name)
    return out


def _full_plan(model: nn.Module, cmap: ComponentMap, comp: str) -> Optional[list[str]]:
    """Module names for `modules_to_save`, or None when the component needs plain requires_grad instead.

    requires_grad is used when a parameter of the component lies outside its listed modules (loose
    parameters, e.g. BLIP-2 query_tokens) or is tied to a parameter of another module (copying would untie).
    """
    modules = [
        m
        for m in _callable_modules(model, cmap.modules[comp])
        if any(True for _ in model.get_submodule(m).parameters())
    ]
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    for names in by_tensor.values():
        if cmap.component_of(names[0]) != comp:
            continue
        homes = {next((m for m in modules if n == m or n.startswith(m + ".")), None) for n in names}
        if None in homes or len(homes) > 1:
            return None
    return modules


def component_regex(cmap: ComponentMap, comp: str) -> str:
    """A PEFT pattern key matching exactly the leaves inside this component's (disjoint) modules."""
    alternatives = "|".join(re.escape(m) for m in cmap.modules[comp])
    return rf"(?:{alternatives})(?:\..+)?"


# ----------------------------------------------------------------------------------------------
# Runtime behaviour: frozen parts without autograd, gradients into a trainable vision tower
# ----------------------------------------------------------------------------------------------


_STEM = re.compile(r"(^|\.)(patch_embed\w*|embeddings)$")  # a vision tower's first module


def _vision_stem(model: nn.Module, cmap: ComponentMap) -> Optional[str]:
    """The vision tower's patch embedding (the first module of its listed ones named so, else of all its modules)."""
    stems = [n for n in _callable_modules(model, cmap.modules["vision"]) if _STEM.search(n)]
    stems = stems or [n for n, _ in model.named_modules() if cmap.component_of(n) == "vision" and _STEM.search(n)]
    return stems[0] if stems else None


def _configure_runtime(model: nn.Module, cmap: ComponentMap, policy: dict[str, ComponentConfig]) -> None:
    """Apply the patches the policy calls for: no autograd in frozen parts, gradients into trainable ones."""
    mode = {c: policy.get(c, ComponentConfig()).mode for c in COMPONENT_NAMES}
    no_grad = ["vision"] if mode["vision"] == "frozen" else []
    if mode["vision"] == "frozen" and mode["projector"] == "frozen":
        no_grad.append("projector")  # nothing upstream trains, so nothing needs gradients through it
    for comp in no_grad:
        for name in _callable_modules(model, cmap.modules[comp]):
            run_without_grad(model.get_submodule(name))
    if mode["vision"] != "frozen":
        stem = _vision_stem(model, cmap)
        if stem is not None:
            require_grad_on_output(model.get_submodule(stem))
    if mode["language"] != "frozen" or mode["cross_attention"] != "frozen":
        require_grad_on_output(model.get_input_embeddings())  # same, for text layers


def _set_dropout(peft_model: nn.Module, cmap: ComponentMap, policy: dict[str, ComponentConfig]) -> None:
    """Per-component LoRA dropout (LoraConfig has one value; dropout only acts in training, so the saved
    adapter is unaffected)."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_dropout:
            rate = policy[cmap.component_of(base_name(name))].dropout
            module.lora_dropout[ADAPTER] = nn.Dropout(rate) if rate > 0 else nn.Identity()


# ----------------------------------------------------------------------------------------------
# The public entry points
# ----------------------------------------------------------------------------------------------


def apply_targeting(
    model: nn.Module, components: dict[str, ComponentConfig], component_map: Optional[ComponentMap] = None
) -> tuple[nn.Module, TargetingReport]:
    """Apply a per-component policy to a loaded (16-bit or 4-bit) VLM as one PEFT model.

    Args:
        model: a transformers VLM (not yet PEFT-wrapped); bnb Linear4bit leaves are LoRA candidates.
        components: component name -> ComponentConfig (components not listed stay frozen).
        component_map: the model's components when already found (`build_model` finds them once, at load);
            None finds them here.
    Returns:
        (peft_model, report): a PeftModel (without LoRA layers when no component uses LoRA) and the
        TargetingReport (also printable with `report.table()`).
    Raises:
        TargetingError: unknown component, a non-frozen component this model lacks, targets matching no
            Linear leaf, disagreeing LoRA variants, or `full` on 4-bit weights.
        ComponentError: components cannot be found, or a `modules` regex matches nothing.
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise TargetingError(
            "apply_targeting expects the base model from load_model, got a PeftModel; to continue training "
            "an adapter, build the model with vlm_tune.model.build.build_model(recipe, checkpoint=...)"
        )
    policy = dict(components or {})
    cmap = component_map if component_map is not None else find_components(model, policy)
    wrapped = _check_policy(cmap, policy, model)
    full_plan = {c: _full_plan(model, cmap, c) for c, cfg in policy.items() if cfg.mode == "full"}
    for param in model.parameters():
        param.requires_grad_(False)
    with warnings.catch_warnings():  # PEFT calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        result = get_peft_model(model, adapter_config(cmap, policy, wrapped, full_plan), adapter_name=ADAPTER)
    prepare_layers(result, cmap, policy, wrapped)
    _check_wrapping(result, cmap, policy, wrapped, full_plan)
    _set_dropout(result, cmap, policy)
    for name, param in result.named_parameters():
        comp = cmap.component_of(base_name(name))
        if comp in full_plan and full_plan[comp] is None:
            param.requires_grad_(True)
    _configure_runtime(model, cmap, policy)
    return result, _build_report(result, cmap, policy, wrapped, full_plan)


def _check_wrapping(peft_model, cmap, policy, wrapped, full_plan) -> None:
    """Make sure PEFT's name matching wrapped exactly the planned leaves with the planned ranks."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    expected = {leaf: policy[c].rank for c, leaves in wrapped.items() for leaf in leaves}
    got = {base_name(n): m.r[ADAPTER] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    saved = {base_name(n) for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    planned = {m for plan in full_plan.values() if plan for m in plan}
    if got != expected or saved != planned:
        wrong = sorted(set(got.items()) ^ set(expected.items()))[:5] + sorted(saved ^ planned)[:5]
        raise TargetingError(
            f"internal error: PEFT wrapped different modules than planned for this "
            f"{cmap.model_type} model (e.g. {wrong}); please report it with the model type"
        )


def _build_report(model, cmap, policy, wrapped, full_plan) -> TargetingReport:
    """Count total and trainable parameters per component; one row per component the model has."""
    total: dict[Optional[str], int] = {}
    trainable: dict[str, list[str]] = {c: [] for c in COMPONENT_NAMES}
    trainable_count: dict[str, int] = {c: 0 for c in COMPONENT_NAMES}
    for name, param in model.named_parameters():
        comp = cmap.component_of(base_name(name))
        if f".modules_to_save.{ADAPTER}." not in name:  # the trained copy; its frozen original counts once
            total[comp] = total.get(comp, 0) + param_count(param)
        if param.requires_grad:
            if comp is None:
                raise TargetingError(f"internal error: parameter {name} trains but belongs to no component")
            trainable[comp].append(name)
            trainable_count[comp] += param_count(param)
    report = TargetingReport(model_type=cmap.model_type, total_params=sum(total.values()))
    for comp in COMPONENT_NAMES:
        cfg = policy.get(comp, ComponentConfig())
        if comp not in cmap.found():
            continue
        is_lora = cfg.mode == "lora"
        row = ComponentRow(
            component=comp,
            mode=cfg.mode,
            rank=cfg.rank if is_lora else None,
            alpha=cfg.alpha if is_lora else None,
            target_rank=cfg.adalora_target_rank if is_lora and cfg.variant == "adalora" else None,
            modules_wrapped=_modules_wrapped(cmap, cfg.mode, comp, wrapped, full_plan),
            trainable_params=trainable_count[comp],
            total_params=total.get(comp, 0),
            share=trainable_count[comp] / max(report.total_params, 1),
            detected=cmap.detected.get(comp, False),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            saved_as=_saved_as(cfg.mode, full_plan.get(comp)),
        )
        report.add_row(row, trainable[comp])
    return report


def _modules_wrapped(cmap: ComponentMap, mode: str, comp: str, wrapped: dict, full_plan: dict) -> int:
    """LoRA-wrapped leaves (lora), modules trained whole (full), or 0 (frozen)."""
    if mode == "lora":
        return len(wrapped.get(comp, []))
    if mode == "full":
        return len(full_plan.get(comp) or cmap.modules[comp])
    return 0


def _saved_as(mode: str, plan: Optional[list[str]]) -> str:
    """Where a checkpoint keeps the component's trained weights."""
    if mode == "lora":
        return "adapter"
    if mode == "full":
        return "modules_to_save" if plan else "requires_grad"
    return ""


def param_groups(
    model: nn.Module, report: TargetingReport, default_lr: float, default_weight_decay: float
) -> list[dict]:
    """AdamW parameter groups, one per report row with trainable parameters.

    Args:
        model: the model returned by apply_targeting (or a wrapper around it, e.g. relevance).
        report: its TargetingReport (rows added with `add_row` included).
        default_lr / default_weight_decay: used where a row has no lr / weight_decay of its own.
    Returns:
        [{"name", "params", "lr", "weight_decay"}, ...]
    Raises:
        TargetingError: a reported parameter name is not in the model.
    """
    index = dict(model.named_parameters())
    prefixes = [""]  # a wrapper (relevance) prefixes the names of the model it wraps

    def lookup(name: str, component: str) -> nn.Parameter:
        for prefix in prefixes:
            if prefix + name in index:
                return index[prefix + name]
        hits = [k for k in index if k.endswith("." + name)]
        if len(hits) != 1:
            raise TargetingError(
                f"param_groups: parameter '{name}' of component {component} is not in the "
                f"model (or is ambiguous); pass the model returned by apply_targeting"
            )
        prefixes.append(hits[0][: -len(name)])
        return index[hits[0]]

    groups = []
    for row in report.rows:
        names = report.param_names.get(row.component, [])
        if not names:
            continue
        params = [lookup(name, row.component) for name in names]
        groups.append(
            {
                "name": row.component,
                "params": params,
                "lr": row.lr if row.lr is not None else default_lr,
                "weight_decay": row.weight_decay if row.weight_decay is not None else default_weight_decay,
            }
        )
    return groups
