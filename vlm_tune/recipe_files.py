"""Recipe files as plain data: YAML read with `base:` inheritance, and dotted `a.b=value` overrides.

Schema-agnostic, like typed_config.py; the recipe schema and its validation live in recipe.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vlm_tune.errors import VlmTuneError


class RecipeError(VlmTuneError, ValueError):
    """A recipe that cannot be used; the message lists every problem found, one per line."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its key path and YAML-parsed value.

    Raises:
        RecipeError: the text has no `=` or an empty key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override '{text}': expected key.path=value, e.g. train.lr=1e-4")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each `a.b=value` override in the plain recipe mapping `raw` (in place) and return it."""
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override '{text}': {'.'.join(keys[: depth + 1])} is {child!r}, not a mapping")
            node = child
        node[keys[-1]] = value
    return raw


def flatten_keys(raw: dict, prefix: str = "") -> dict[str, Any]:
    """Plain recipe data as {dotted key: value}, mappings walked down to their leaves (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _deep_merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`; mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def read_recipe_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file as plain data, merged on top of the file named by its `base:` key (relative to it).

    Raises:
        RecipeError: the file (or a base) is missing, not YAML, not a mapping, or the bases form a cycle.
    """
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found" + (f" (named by base: in {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise RecipeError(f"{path}: base: recipes form a cycle: {' -> '.join(str(p) for p in chain)}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, components, data, train...)")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base: expected the path of another recipe, got {base!r}")
    return _deep_merge(read_recipe_file(path.parent / base, chain + (path.resolve(),)), raw)
