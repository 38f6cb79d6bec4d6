"""Optimizer, scheduler and RNG states as plain files: tensors in safetensors, everything else in JSON.

Nothing here is pickled, so resuming from a checkpoint someone else wrote cannot run code hidden in it
(unpickling `training_state.pt` with `torch.load(weights_only=False)` could). The encoding is a small
tagged JSON: a tensor becomes `{"__tensor__": key}` (its data in the safetensors file), a tuple
`{"__tuple__": [...]}`, a dict with keys that are not strings `{"__dict__": [[key, value], ...]}`, a NumPy
array `{"__ndarray__": [...], "dtype": ...}`. Decoding builds only dicts, lists, tuples, numbers, strings,
tensors and arrays.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSORS_FILE = "training_state.safetensors"
STATE_FILE = "training_state.json"
PICKLED_FILE = "training_state.pt"  # written by vlm_tune before the safetensors + JSON format; never loaded
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")


class TrainingStateError(ValueError):
    """A training state file that does not decode (damaged, or not written by vlm_tune)."""


def capture_rng() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) random states, as copies."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the random states that `capture_rng` took."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (an evaluation) without changing the random states that follow it."""
    rng = capture_rng()
    try:
        yield
    finally:
        restore_rng(rng)


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON data; its tensors move into `tensors` under the keys the JSON names."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not any(tag in value for tag in _TAGS):
            return {key: _encode(item, tensors) for key, item in value.items()}
        return {"__dict__": [[_encode(key, tensors), _encode(item, tensors)] for key, item in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"the training state holds a {type(value).__name__}, which has no plain-file form")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        if value["__tensor__"] not in tensors:
            raise TrainingStateError(f"tensor {value['__tensor__']!r} is missing from {TENSORS_FILE}")
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(item, tensors) for item in value["__tuple__"])
    if "__dict__" in value:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in value["__dict__"]}
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
    return {key: _decode(item, tensors) for key, item in value.items()}


def save_training_state(
    folder: Path, optimizer: Any, scheduler: Any, rng: Optional[dict[str, Any]], adapter: Optional[dict] = None
) -> None:
    """Write `training_state.safetensors` + `training_state.json` into `folder`.

    Args:
        folder: the checkpoint folder being written.
        optimizer, scheduler: their `state_dict()` is saved (None: not saved); `optimizer` may be that state
            dict already (FSDP: the full state gathered from every process's shards).
        rng: random states from `capture_rng` (None: the current ones).
        adapter: the adapter's own training state (AdaLoRA's importance scores; None: none).
    """
    state = {
        "optimizer": optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng if rng is not None else capture_rng(),
        "adapter": adapter,
    }
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors)
    save_file(tensors, folder / TENSORS_FILE)
    (folder / STATE_FILE).write_text(json.dumps(encoded))


def read_training_state(folder: Path) -> dict[str, Any]:
    """The training states of a checkpoint folder (`{"optimizer", "scheduler", "rng", "adapter"}`; "adapter" may
    be absent in older checkpoints).

    Raises:
        TrainingStateError: a file is missing or does not decode.
    """
    missing = [name for name in (TENSORS_FILE, STATE_FILE) if not (folder / name).is_file()]
    if missing:
        raise TrainingStateError(f"{' and '.join(missing)} missing")
    try:
        tensors = load_file(folder / TENSORS_FILE)
        encoded = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError, SafetensorError) as exc:  # a damaged or truncated file
        raise TrainingStateError(f"damaged training state ({type(exc).__name__}: {exc})") from None
    state = _decode(encoded, tensors)
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise TrainingStateError(f"{STATE_FILE} lacks the optimizer, scheduler or RNG state")
    return state
