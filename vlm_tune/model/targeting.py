"""Turn a per-component policy (frozen / lora / full) into one PEFT model, and report what trains.

One `LoraConfig` covers every LoRA component: explicit `target_modules`, a `rank_pattern` /
`alpha_pattern` entry per component, and `modules_to_save` for `full` components whose modules can be
named alone, so the saved adapter is a standard PEFT folder. Frozen vision towers run under no_grad.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from vlm_tune.errors import VlmTuneError
from vlm_tune.model.components import ComponentMap, find_components
from vlm_tune.recipe import COMPONENT_NAMES, ComponentConfig

ADAPTER = "default"


class TargetingError(VlmTuneError, ValueError):
    """A component policy that cannot be applied to this model (the message names the fix)."""


@dataclass
class ComponentRow:
    """One line of the targeting report."""

    component: str
    mode: str  # frozen | lora | full (or the name of an extra module, e.g. relevance)
    rank: Optional[int]
    alpha: Optional[float]
    modules_wrapped: int  # LoRA-wrapped Linear leaves (lora) or modules trained whole (full)
    trainable_params: int
    total_params: int  # parameters of this component
    share: float  # trainable / total parameters of the whole model
    detected: bool  # found structurally rather than from the family table
    lr: Optional[float]
    weight_decay: Optional[float]
    saved_as: str = ""  # adapter | modules_to_save | requires_grad (saved by the checkpoint, not the adapter)


@dataclass
class TargetingReport:
    """What trains, per component; `param_names` maps component -> trainable names in the returned model."""

    model_type: str
    rows: list[ComponentRow] = field(default_factory=list)
    total_params: int = 0
    param_names: dict[str, list[str]] = field(default_factory=dict)

    def add_row(self, row: ComponentRow, param_names: list[str]) -> None:
        """Append a row (e.g. relevance modules) and the names of its trainable parameters."""
        self.rows.append(row)
        self.param_names[row.component] = list(param_names)

    @property
    def trainable_params(self) -> int:
        return sum(r.trainable_params for r in self.rows)

    def table(self) -> str:
        """The report as a fixed-width text table."""
        head = ("component", "mode", "rank", "alpha", "wrapped", "trainable", "total", "share", "lr", "wd", "saved as")
        lines = [
            (
                r.component + (" *" if r.detected else ""),
                r.mode,
                _fmt(r.rank),
                _fmt(r.alpha),
                str(r.modules_wrapped),
                f"{r.trainable_params:,}",
                f"{r.total_params:,}",
                f"{100 * r.share:.3f}%",
                _fmt(r.lr),
                _fmt(r.weight_decay),
                r.saved_as or "-",
            )
            for r in self.rows
        ]
        share = self.trainable_params / max(self.total_params, 1)
        lines.append(
            (
                "all",
                "",
                "",
                "",
                "",
                f"{self.trainable_params:,}",
                f"{self.total_params:,}",
                f"{100 * share:.3f}%",
                "",
                "",
                "",
            )
        )
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        rule = "-" * sum(widths) + "-" * 2 * (len(widths) - 1)
        notes = f"{self.model_type}" + (" (* = detected structurally)" if any(r.detected for r in self.rows) else "")
        return "\n".join([notes, fmt(head), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])])

    def to_dict(self) -> dict:
        """Plain data (for JSON run records)."""
        return {
            "model_type": self.model_type,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "param_names": {k: list(v) for k, v in self.param_names.items()},
        }


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def param_count(param: torch.Tensor) -> int:
    """Logical parameter count (bitsandbytes packs two 4-bit weights per stored byte)."""
    quant_state = getattr(param, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()


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
        elif any(cmap.component_of(n) == comp for n in quantized):
            errors.append(
                f"components.{comp}: mode full needs 16-bit weights, but {comp} was loaded in 4-bit; "
                f"add {comp} to model.quantization.keep_16bit, or use mode: lora"
            )
    variants = {policy[c].variant for c in wrapped}
    if len(variants) > 1:
        errors.append(
            f"components.*.variant: LoRA components must share one variant (PEFT sets DoRA / rsLoRA for "
            f"the whole adapter), got {', '.join(f'{c}={policy[c].variant}' for c in wrapped)}"
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


def _component_regex(cmap: ComponentMap, comp: str) -> str:
    """A PEFT pattern key matching exactly the leaves inside this component's (disjoint) modules."""
    alternatives = "|".join(re.escape(m) for m in cmap.modules[comp])
    return rf"(?:{alternatives})(?:\..+)?"


# ----------------------------------------------------------------------------------------------
# Runtime behaviour: frozen parts without autograd, gradients into a trainable vision tower
# ----------------------------------------------------------------------------------------------


def _run_without_grad(module: nn.Module) -> None:
    """Make a frozen module's forward build no autograd graph (exception-safe, applied once)."""
    if getattr(module, "_vlm_tune_no_grad", False):
        return
    module.forward = torch.no_grad()(module.forward)
    module._vlm_tune_no_grad = True


def _make_output_require_grad(module: nn.Module, inputs, output):
    """Forward hook: the patch embedding's output requires grad, so re-entrant checkpointing still feeds LoRA."""
    if isinstance(output, torch.Tensor) and torch.is_grad_enabled() and output.is_floating_point():
        output.requires_grad_(True)


def _configure_runtime(model: nn.Module, cmap: ComponentMap, policy: dict[str, ComponentConfig]) -> None:
    mode = {c: policy[c].mode if c in policy else "frozen" for c in COMPONENT_NAMES}
    no_grad = ["vision"] if mode["vision"] == "frozen" else []
    if mode["vision"] == "frozen" and mode["projector"] == "frozen":
        no_grad.append("projector")  # nothing upstream trains, so nothing needs gradients through it
    for comp in no_grad:
        for name in _callable_modules(model, cmap.modules[comp]):
            _run_without_grad(model.get_submodule(name))
    if mode["vision"] != "frozen":
        stems = [
            n
            for n in _callable_modules(model, cmap.modules["vision"])
            if re.search(r"(^|\.)(patch_embed\w*|embeddings)$", n)
        ]
        stems = stems or [
            n
            for n, m in model.named_modules()
            if cmap.component_of(n) == "vision" and re.search(r"(^|\.)(patch_embed\w*|embeddings)$", n)
        ]
        for name in stems[:1]:
            model.get_submodule(name).register_forward_hook(_make_output_require_grad)
    if mode["language"] != "frozen" or mode["cross_attention"] != "frozen":
        model.get_input_embeddings().register_forward_hook(_make_output_require_grad)  # same, for text layers


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


def apply_targeting(model: nn.Module, components: dict[str, ComponentConfig]) -> tuple[nn.Module, TargetingReport]:
    """Apply a per-component policy to a loaded (16-bit or 4-bit) VLM as one PEFT model.

    Args:
        model: a transformers VLM (not yet PEFT-wrapped); bnb Linear4bit leaves are LoRA candidates.
        components: component name -> ComponentConfig (components not listed stay frozen).
    Returns:
        (peft_model, report): a PeftModel (without LoRA layers when no component uses LoRA) and the
        TargetingReport (also printable with `report.table()`).
    Raises:
        TargetingError: unknown component, a non-frozen component this model lacks, targets matching no
            Linear leaf, disagreeing LoRA variants, or `full` on 4-bit weights.
        ComponentError: components cannot be found, or a `modules` regex matches nothing.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.constants import DUMMY_TARGET_MODULES

    if isinstance(model, PeftModel):
        raise TargetingError(
            "apply_targeting expects the base model from load_model, got a PeftModel; "
            "to continue training an adapter, load it through vlm_tune.checkpoint"
        )
    policy = {name: cfg for name, cfg in (components or {}).items()}
    cmap = find_components(model, policy)
    wrapped = _check_policy(cmap, policy, model)
    full = [c for c, cfg in policy.items() if cfg.mode == "full"]
    full_plan = {c: _full_plan(model, cmap, c) for c in full}
    for param in model.parameters():
        param.requires_grad_(False)

    lora = [policy[c] for c in wrapped] or [ComponentConfig()]
    config = LoraConfig(
        r=lora[0].rank,
        lora_alpha=lora[0].alpha,
        lora_dropout=lora[0].dropout,
        bias="none",
        # no LoRA component: PEFT's own "no target" marker keeps a standard PeftModel for modules_to_save
        target_modules=[leaf for c in wrapped for leaf in wrapped[c]] or DUMMY_TARGET_MODULES,
        rank_pattern={_component_regex(cmap, c): policy[c].rank for c in wrapped},
        alpha_pattern={_component_regex(cmap, c): policy[c].alpha for c in wrapped},
        use_dora=lora[0].variant == "dora",
        use_rslora=lora[0].variant == "rslora",
        modules_to_save=[m for c in full if full_plan[c] for m in full_plan[c]] or None,
    )
    with warnings.catch_warnings():  # PEFT calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        result = get_peft_model(model, config, adapter_name=ADAPTER)
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
        saved = {"lora": "adapter", "full": "modules_to_save" if full_plan.get(comp) else "requires_grad"}
        row = ComponentRow(
            component=comp,
            mode=cfg.mode,
            rank=cfg.rank if is_lora else None,
            alpha=cfg.alpha if is_lora else None,
            modules_wrapped=len(wrapped.get(comp, []))
            if is_lora
            else len(full_plan.get(comp) or cmap.modules[comp])
            if cfg.mode == "full"
            else 0,
            trainable_params=trainable_count[comp],
            total_params=total.get(comp, 0),
            share=trainable_count[comp] / max(report.total_params, 1),
            detected=cmap.detected.get(comp, False),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            saved_as=saved.get(cfg.mode, ""),
        )
        report.add_row(row, trainable[comp])
    return report


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
    by_suffix = functools.lru_cache(maxsize=None)(
        lambda name: [k for k in index if k.endswith("." + name)]
    )  # a wrapper may prefix the names
    groups = []
    for row in report.rows:
        names = report.param_names.get(row.component, [])
        if not names:
            continue
        params = []
        for name in names:
            hits = [name] if name in index else by_suffix(name)
            if len(hits) != 1:
                raise TargetingError(
                    f"param_groups: parameter '{name}' of component {row.component} is not in the "
                    f"model (or is ambiguous); pass the model returned by apply_targeting"
                )
            params.append(index[hits[0]])
        groups.append(
            {
                "name": row.component,
                "params": params,
                "lr": row.lr if row.lr is not None else default_lr,
                "weight_decay": row.weight_decay if row.weight_decay is not None else default_weight_decay,
            }
        )
    return groups
