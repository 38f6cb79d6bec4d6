"""Which modules of a vision-language model form its vision, projector, cross_attention and language parts.

Known families are read from a table (`FAMILIES`); other architectures are detected structurally
(detect.py: what consumes `pixel_values`, what owns the text embedding, what sits between them,
cross-attention blocks by class or name). A recipe's `components.<name>.modules` regexes override both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from vlm_tune.errors import VlmTuneError
from vlm_tune.model.detect import detect_components, inside, shallowest
from vlm_tune.recipe import COMPONENT_NAMES, ComponentConfig


class ComponentError(VlmTuneError, ValueError):
    """The components of a model cannot be found, or a recipe names modules that do not exist."""


@dataclass(frozen=True)
class FamilyLayout:
    """Regexes (full match over module / parameter names) of the parts forming each component of one family."""

    vision: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    cross_attention: tuple[str, ...] = ()
    language: tuple[str, ...] = ()
    params: tuple[tuple[str, str], ...] = ()  # (component, regex) for loose parameters outside these modules
    never_lora: tuple[str, ...] = ()  # regexes (searched) of Linear leaves that LoRA must not wrap
    vision_feature_layer: bool = False  # llava-style: vision layers after config.vision_feature_layer are unused


_M = r"(?:model\.)?"  # transformers 5 nests the parts under `model.`; older checkpoints' classes did not
_LM_HEAD = r"(?:language_model\.)?lm_head"
_LLAVA = FamilyLayout(
    vision=(_M + "vision_tower",),
    projector=(_M + "multi_modal_projector",),
    language=(_M + "language_model", _LM_HEAD),
    params=(("projector", _M + "image_newline"),),
    vision_feature_layer=True,
)
_IDEFICS = FamilyLayout(
    vision=(_M + "vision_model",), projector=(_M + "connector",), language=(_M + "text_model", _LM_HEAD)
)
_QWEN_VL = FamilyLayout(
    vision=(_M + "visual",), projector=(_M + r"visual\.merger",), language=(_M + "language_model", _LM_HEAD)
)
_SIGLIP_VLM = FamilyLayout(
    vision=(_M + "vision_tower",),
    projector=(_M + "multi_modal_projector",),
    language=(_M + "language_model", _LM_HEAD),
    never_lora=(r"vision_tower\.(vision_model\.)?head\.",),
)  # pooling head, unused by the VLM
_BLIP2 = FamilyLayout(
    vision=("vision_model",),
    projector=("qformer", "language_projection"),
    language=("language_model", "lm_head"),
    params=(("projector", "query_tokens"),),
)

FAMILIES: dict[str, FamilyLayout] = {
    "llava": _LLAVA,
    "llava_next": _LLAVA,
    "llava_onevision": _LLAVA,
    "llava_next_video": _LLAVA,
    "idefics2": _IDEFICS,
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "mllama": FamilyLayout(
        vision=(_M + "vision_model",),
        projector=(_M + "multi_modal_projector",),
        cross_attention=(_M + r"language_model\.(?:model\.)?layers\.\d+\.cross_attn",),
        language=(_M + "language_model", _LM_HEAD),
        params=(("cross_attention", _M + r"language_model\.(?:model\.)?layers\.\d+\.cross_attn_(?:attn|mlp)_gate"),),
    ),
    "paligemma": _SIGLIP_VLM,
    "gemma3": _SIGLIP_VLM,
    "blip-2": _BLIP2,
    "instructblip": _BLIP2,
}

_ATTENTION_SEGMENT = re.compile(r"attn|attention", re.IGNORECASE)
_ATTENTION_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv", "qkv_proj", "query", "key", "value", "out_proj"}
_NEVER_LORA = re.compile(
    r"(^|\.)(patch_embed\w*|embeddings?|\w*pos\w*_emb\w*|position\w*)\.|"  # embeddings
    r"(^|\.)(gate|router)$"
)  # MoE routers / gating scalars
_TARGET_KINDS = ("attention", "mlp")


@dataclass
class ComponentMap:
    """Where each component lives in one model.

    `modules` lists, per component, disjoint module names covering it (a module that contains another
    component's module is replaced by its children, e.g. Qwen's `visual` minus `visual.merger`);
    `params` lists loose parameters owned by a component; `detected` is True for components found
    structurally rather than from the family table or the recipe.
    """

    model_type: str
    modules: dict[str, list[str]]
    detected: dict[str, bool]
    params: dict[str, list[str]] = field(default_factory=dict)
    linear_leaves: list[str] = field(default_factory=list)  # every nn.Linear / bnb Linear4bit leaf LoRA may wrap
    never_lora: list[str] = field(default_factory=list)  # Linear leaves excluded from LoRA (unused or unsafe)
    containers: dict[str, str] = field(default_factory=dict)  # split module -> component of its own parameters

    def __post_init__(self):
        self._owner = {name: comp for comp, names in self.modules.items() for name in names}
        self._owner.update({name: comp for name, comp in self.containers.items() if name not in self._owner})
        self._param_owner = {name: comp for comp, names in self.params.items() for name in names}

    def found(self) -> list[str]:
        """Names of the components present in this model, in canonical order."""
        return [c for c in COMPONENT_NAMES if self.modules.get(c) or self.params.get(c)]

    def component_of(self, name: str) -> Optional[str]:
        """The component owning a module or parameter name (of the base model), or None."""
        if name in self._param_owner:
            return self._param_owner[name]
        parts = name.split(".")
        for depth in range(len(parts), 0, -1):  # the longest owning prefix wins (`visual.merger` over `visual`)
            owner = self._owner.get(".".join(parts[:depth]))
            if owner is not None:
                return owner
        return None

    def lora_candidates(self, component: str, targets: list[str]) -> list[str]:
        """Full names of the Linear leaves of `component` that LoRA may wrap for these targets.

        Args:
            component: one of COMPONENT_NAMES.
            targets: kinds (`attention`: leaves inside attention blocks; `mlp`: every other Linear) or
                leaf names / regexes, matched in full against the leaf name or a dotted suffix of its path.
                `lm_head` is wrapped only when named explicitly.
        Returns:
            Sorted-by-model-order list of module names.
        """
        never = set(self.never_lora)
        chosen = []
        for name in self.linear_leaves:
            if self.component_of(name) != component:
                continue
            explicit = any(t not in _TARGET_KINDS and _matches_name(t, name) for t in targets)
            kind = linear_kind(name)
            if explicit or (kind in targets and name not in never and not name.endswith("lm_head")):
                chosen.append(name)
        return chosen


def linear_kind(name: str) -> str:
    """`attention` for a Linear leaf inside an attention block (or named like q/k/v/o), else `mlp`."""
    *path, leaf = name.split(".")
    if leaf in _ATTENTION_LEAVES or any(_ATTENTION_SEGMENT.search(part) for part in path):
        return "attention"
    return "mlp"


def _matches_name(pattern: str, name: str) -> bool:
    try:
        return bool(re.fullmatch(pattern, name.rsplit(".", 1)[-1]) or re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name))
    except re.error:
        return pattern == name


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ComponentError(f"{where}: '{pattern}' is not a valid regex ({exc})") from None


def _resolve(regexes: tuple[str, ...] | list[str], names: list[str], where: str) -> dict[str, list[str]]:
    """Regex -> shallowest module names it fully matches."""
    return {rx: shallowest([n for n in names if _compile(rx, where).fullmatch(n)]) for rx in regexes}


# ----------------------------------------------------------------------------------------------
# The public entry point.
# ----------------------------------------------------------------------------------------------


def _split_containers(roots: dict[str, list[str]], named: dict[str, nn.Module]) -> tuple[dict, dict]:
    """Replace every root holding another component's root by its children, so the lists are disjoint."""
    all_roots = {r: c for c, rs in roots.items() for r in rs}
    modules: dict[str, list[str]] = {c: [] for c in roots}
    containers: dict[str, str] = {}

    def expand(name: str, comp: str) -> None:
        inner = [r for r in all_roots if r != name and inside(r, name)]
        if not inner:
            modules[comp].append(name)
            return
        containers[name] = comp
        for child, _ in named[name].named_children():
            full = f"{name}.{child}" if name else child
            if full not in all_roots:
                expand(full, comp)

    for comp, rs in roots.items():
        for root in rs:
            expand(root, comp)
    return modules, containers


def _unused_vision_layers(model: nn.Module, vision: list[str], named: dict[str, nn.Module]) -> list[str]:
    """Encoder layers after llava's `vision_feature_layer`: computed but never read, so LoRA there gets no gradient."""
    chosen = getattr(model.config, "vision_feature_layer", None)
    layers = [n for n in named if any(inside(n, v) for v in vision) and re.search(r"encoder\.layers?\.\d+$", n)]
    if chosen is None or not layers:
        return []
    chosen = chosen if isinstance(chosen, (list, tuple)) else [chosen]
    used = max(k if k >= 0 else len(layers) + 1 + k for k in chosen)  # hidden_states[0]: the embedding output
    return [name for n in layers[used:] for name in named if inside(name, n)]


def _family_roots(model: nn.Module, family: Optional[FamilyLayout], names: list[str]) -> tuple[dict, dict]:
    """Component -> root module names, and component -> loose parameter names, from the family table."""
    roots: dict[str, list[str]] = {c: [] for c in COMPONENT_NAMES}
    params: dict[str, list[str]] = {c: [] for c in COMPONENT_NAMES}
    if family is None:
        return roots, params
    for comp in COMPONENT_NAMES:
        roots[comp] = shallowest([n for ns in _resolve(getattr(family, comp), names, comp).values() for n in ns])
    param_names = [n for n, _ in model.named_parameters()]
    for comp, rx in family.params:
        params[comp] += [p for p in param_names if re.fullmatch(rx, p)]
    return roots, params


def _apply_recipe_modules(recipe_components, names: list[str], model_type: str, roots, params, detected) -> None:
    """Let the recipe's `components.<name>.modules` regexes define their components (updates the three maps).

    Raises:
        ComponentError: a regex matches no module, or two components of the recipe claim one module.
    """
    recipe_claims: dict[str, str] = {}
    for comp, cfg in (recipe_components or {}).items():
        if cfg is None or not cfg.modules:
            continue
        where = f"components.{comp}.modules"
        resolved = _resolve(cfg.modules, names, where)
        empty = [rx for rx, hits in resolved.items() if not hits]
        if empty:
            top = ", ".join(n for n in names if n.count(".") <= 1)
            raise ComponentError(
                f"{where}: {', '.join(repr(r) for r in empty)} matches no module of this "
                f"{model_type} model (regexes match whole module names; names here include: {top})"
            )
        roots[comp] = shallowest([n for hits in resolved.values() for n in hits])
        detected[comp], params[comp] = False, []
        for root in roots[comp]:
            if recipe_claims.setdefault(root, comp) != comp:
                raise ComponentError(
                    f"module '{root}' of {model_type} is claimed by both {recipe_claims[root]} and "
                    f"{comp} in components.*.modules; each module belongs to one component"
                )
        for other in COMPONENT_NAMES:  # what the recipe claims leaves the other components
            if other != comp:
                roots[other] = [r for r in roots[other] if r not in roots[comp]]


def _check_roots(roots: dict[str, list[str]], model_type: str, named: dict[str, nn.Module]) -> None:
    """Each module belongs to one component, and the vision and language components exist.

    Raises:
        ComponentError: naming the module claimed twice, or how to name the missing components.
    """
    claimed: dict[str, str] = {}
    for comp in COMPONENT_NAMES:
        for root in roots[comp]:
            if root in claimed:
                raise ComponentError(
                    f"module '{root}' of {model_type} is claimed by both {claimed[root]} and {comp}; "
                    f"set components.<name>.modules so each module belongs to one component"
                )
            claimed[root] = comp
    missing = [c for c in ("vision", "language") if not roots[c]]
    if missing:
        top = ", ".join(f"{n} ({type(m).__name__})" for n, m in named.items() if n and n.count(".") <= 1)
        raise ComponentError(
            f"cannot find the {' and '.join(missing)} component(s) of this {model_type} model (not in the family "
            f"table {sorted(FAMILIES)} and not detected structurally). Name them in the recipe, e.g. "
            f"components.vision.modules: ['model\\.vision_tower'] and components.language.modules: "
            f"['model\\.language_model', 'lm_head']. Top-level modules: {top}"
        )


def _lora_leaves(model: nn.Module, named: dict, family: Optional[FamilyLayout], vision: list[str]):
    """(every nn.Linear leaf LoRA may wrap, the ones it must not: embeddings, routers, unused layers)."""
    leaves = [
        n
        for n, m in named.items()
        if isinstance(m, nn.Linear)
        and not list(m.children())
        and not isinstance(named.get(n.rsplit(".", 1)[0] if "." in n else ""), nn.MultiheadAttention)
    ]
    never = [
        n
        for n in leaves
        if _NEVER_LORA.search(n) or any(re.search(rx, n) for rx in (family.never_lora if family else ()))
    ]
    if family is not None and family.vision_feature_layer:
        never += [n for n in _unused_vision_layers(model, vision, named) if n in leaves]
    return leaves, sorted(set(never), key=leaves.index)


def find_components(model: nn.Module, recipe_components: Optional[dict[str, ComponentConfig]] = None) -> ComponentMap:
    """Locate the vision, projector, cross_attention and language parts of a (transformers) VLM.

    Args:
        model: the loaded model (a PEFT wrapper is unwrapped).
        recipe_components: the recipe's policies; their `modules` regexes define or override a component.
    Returns:
        A ComponentMap with disjoint module lists per component.
    Raises:
        ComponentError: a `modules` regex matches nothing, two components claim one module, or the vision
            tower / language model cannot be found (the message explains how to name them).
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    named = dict(model.named_modules())
    names = [n for n in named if n]
    family = FAMILIES.get(model_type)
    roots, params = _family_roots(model, family, names)
    detected = {c: False for c in COMPONENT_NAMES}
    if not roots["vision"] or not roots["language"]:  # not in the table, or the table is stale for this version
        guess = detect_components(model, named)
        for comp in COMPONENT_NAMES:
            if not roots[comp] and guess.modules[comp]:
                roots[comp], detected[comp], params[comp] = guess.modules[comp], True, guess.params[comp]
    _apply_recipe_modules(recipe_components, names, model_type, roots, params, detected)
    _check_roots(roots, model_type, named)
    modules, containers = _split_containers(roots, named)
    leaves, never = _lora_leaves(model, named, family, modules["vision"] or roots["vision"])
    return ComponentMap(
        model_type=model_type,
        modules=modules,
        detected=detected,
        params=params,
        linear_leaves=leaves,
        never_lora=never,
        containers=containers,
    )
