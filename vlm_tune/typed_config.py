"""Typed configuration from plain data: check values against dataclass annotations, collecting every error.

Schema-agnostic: `build_dataclass(cls, raw, path, errors)` walks a dataclass's type hints (int, float, str,
bool, Literal, Optional/Union, list, dict, nested dataclasses), reports unknown keys with a suggestion (a key
renamed from another tool, the same key one section down, or a close match), and then runs the dataclass's
own `_check()` for combinations of fields. The recipe schema lives in recipe.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


_YAML11_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, tp: Any, path: str, errors: list[str], renamed: Mapping[str, str]) -> Any:
    """Check `value` against the annotation `tp`; return the typed value (or None after an error)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:  # a mapping for an optional section reports its own problems, with their paths
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _convert(value, arg, path, errors, renamed)
        for arg in (a for a in args if a is not type(None)):  # first member that accepts the value
            trial: list[str] = []
            converted = _convert(value, arg, path, trial, renamed)
            if not trial:
                return converted
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return None
        return [_convert(item, typing.get_args(tp)[0], f"{path}[{i}]", errors, renamed) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        value_type = typing.get_args(tp)[1]
        return {
            key: _convert(item if item is not None else {}, value_type, f"{path}.{key}", errors, renamed)
            for key, item in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path, errors, renamed)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"recipe schema: unsupported annotation {tp!r} at {path}")  # a bug in the schema


def _unknown_key_hint(cls: type, key: str, prefix: str, renamed: Mapping[str, str]) -> str:
    """What to write instead of the unknown `key` of `cls`: a renamed key, the key of a section, a close match."""
    known = [f.name for f in dataclasses.fields(cls)]
    if key in renamed:  # "train.lr", or "lr" in the train section itself
        target = renamed[key]
        local = target.rsplit(".", 1)[-1]
        here = prefix + local if local.split(":")[0] in known else target
        return f" (a Hugging Face name; here it is {here})"
    hints = typing.get_type_hints(cls)
    sections = [
        f"{prefix}{f.name}.{key}"
        for f in dataclasses.fields(cls)
        if (section := _section_type(hints[f.name])) is not None
        and key in {g.name for g in dataclasses.fields(section)}
    ]
    if sections:
        return f" (did you mean {' or '.join(sections)}?)"
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(known)}"


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _section_type(tp: Any) -> Optional[type]:
    """The dataclass of a nested section annotation (`Section` or `Optional[Section]`), else None."""
    candidates = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def build_dataclass(
    cls: type, raw: Any, path: str, errors: list[str], renamed: Optional[Mapping[str, str]] = None
) -> Any:
    """An instance of `cls` from the mapping `raw`; problems are appended to `errors` as 'dotted.path: message'.

    `renamed` maps keys of other tools (e.g. `learning_rate`) to what to write instead (`train.lr`); an unknown
    key found there is reported with that suggestion, at any depth.
    """
    renamed = renamed or {}
    prefix = f"{path}." if path else ""
    if not isinstance(raw, dict):
        errors.append(f"{path or 'recipe'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in known:
            errors.append(f"{prefix}{key}: unknown key{_unknown_key_hint(cls, str(key), prefix, renamed)}")
    kwargs = {}
    for name in known:
        if name in raw:
            n_before = len(errors)
            value = _convert(raw[name], hints[name], prefix + name, errors, renamed)
            if len(errors) == n_before or isinstance(value, dict) or dataclasses.is_dataclass(value):
                kwargs[name] = value  # nested sections stay, so their siblings' checks still run
    instance = cls(**kwargs)
    if hasattr(instance, "_check"):
        errors.extend(prefix + message for message in instance._check())
    return instance
