"""Structural detection of a VLM's components, for architectures outside the family table.

The vision tower is the biggest module fed `pixel_values` (or named like one); the language model is the
shallowest ancestor of the text embedding that holds no vision tower (plus the output head outside it); the
projector is what has parameters beside the two under their common ancestor (else a merger inside the vision
tower); cross-attention blocks are found by name or class inside the language model.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

from vlm_tune.recipe import COMPONENT_NAMES

_CROSS_ATTENTION_NAMES = ("cross_attn", "crossattention", "cross_attention")
_MERGER = re.compile(r"merger|projector|connector|adapter")  # a projector inside the vision tower


def inside(name: str, root: str) -> bool:
    """True when module `name` is `root` or lies inside it ("" is the model itself)."""
    return root == "" or name == root or name.startswith(root + ".")


def shallowest(names: list[str]) -> list[str]:
    """Drop names that lie inside another name of the list (order kept)."""
    kept: list[str] = []
    for name in sorted(names, key=lambda n: n.count(".")):
        if not any(name == k or name.startswith(k + ".") for k in kept):
            kept.append(name)
    return sorted(kept, key=names.index)


@dataclass
class DetectedLayout:
    """Module names per component and loose parameter names per component, [] where nothing was found."""

    modules: dict[str, list[str]]
    params: dict[str, list[str]]


def _takes_pixel_values(module: nn.Module) -> bool:
    try:
        return "pixel_values" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _name_of(named: dict[str, nn.Module], module: Optional[nn.Module]) -> Optional[str]:
    return next((n for n, m in named.items() if m is module), None) if module is not None else None


def _vision_tower(named: dict[str, nn.Module], embed_name: str) -> list[str]:
    """The biggest module fed pixel_values or named like a vision tower (Qwen-style towers take patches)."""
    candidates = shallowest(
        [
            n
            for n, m in named.items()
            if n
            and not inside(embed_name, n)
            and (_takes_pixel_values(m) or re.search(r"vision|visual", type(m).__name__, re.IGNORECASE))
        ]
    )
    return sorted(candidates, key=lambda n: -sum(p.numel() for p in named[n].parameters()))[:1]


def _language_model(embed_name: str, vision: list[str], head: Optional[str]) -> list[str]:
    """The shallowest ancestor of the text embedding without the vision tower, and the output head outside it."""
    parts = embed_name.split(".")
    ancestors = [".".join(parts[:depth]) for depth in range(1, len(parts))]  # shallow to deep
    language = [a for a in ancestors if not any(inside(v, a) for v in vision)][:1]
    if language and head and not inside(head, language[0]):
        language.append(head)
    return language


def _projector(named: dict[str, nn.Module], vision: list[str], language: list[str]) -> tuple[list[str], list[str]]:
    """Modules with parameters beside vision and language under their common ancestor (else a merger inside the
    vision tower), and that ancestor's own parameters (image_newline, query_tokens)."""
    common = ".".join(p for p, q in zip(vision[0].split("."), language[0].split(".")) if p == q)
    common = common if common in named and inside(vision[0], common) and inside(language[0], common) else ""
    prefix = common + "." if common else ""
    siblings = [prefix + child for child, _ in named[common].named_children()]
    modules = [
        s
        for s in siblings
        if not any(inside(t, s) for t in vision + language) and any(True for _ in named[s].parameters())
    ]
    if not modules:  # projector living inside the vision tower (Qwen-style merger)
        modules = [
            f"{vision[0]}.{n}"
            for n, m in named[vision[0]].named_children()
            if re.search(r"merger|projector|connector|adapter", n)
            and any(isinstance(x, nn.Linear) for x in m.modules())
        ]
    return modules, [prefix + p for p, _ in named[common].named_parameters(recurse=False)]


def _cross_attention(named: dict[str, nn.Module], language_root: str) -> tuple[list[str], list[str]]:
    """Cross-attention blocks inside the language model (by name, else by class), and the parameters of its
    blocks named cross-something (mllama's tanh gates)."""
    inner = [n for n in named if inside(n, language_root) and n != language_root]
    cross = [n for n in inner if n.rsplit(".", 1)[-1] in _CROSS_ATTENTION_NAMES]
    cross = cross or [n for n in inner if type(named[n]).__name__.lower().endswith("crossattention")]
    params = [f"{n}.{p}" for n in inner for p, _ in named[n].named_parameters(recurse=False) if cross and "cross" in p]
    return shallowest(cross), params


def detect_components(model: nn.Module, named: dict[str, nn.Module]) -> DetectedLayout:
    """Find the components of `model` by structure; `named` is `dict(model.named_modules())`."""
    layout = DetectedLayout({c: [] for c in COMPONENT_NAMES}, {c: [] for c in COMPONENT_NAMES})
    embed_name = _name_of(named, model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None)
    if embed_name is None:
        return layout
    vision = _vision_tower(named, embed_name)
    head = _name_of(named, model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)
    language = _language_model(embed_name, vision, head)
    if not language:
        return layout
    layout.modules["vision"], layout.modules["language"] = vision, language
    if vision:
        layout.modules["projector"], layout.params["projector"] = _projector(named, vision, language)
        layout.modules["cross_attention"], layout.params["cross_attention"] = _cross_attention(named, language[0])
    return layout
