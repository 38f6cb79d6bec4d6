"""Frozen vision features kept across epochs (`speed.vision_cache_gib`), for Qwen2-VL and Qwen2.5-VL.

When the vision tower and its merger (the projector) are frozen and the images reach the model as the same
pixels every epoch, the tower computes the same features each time. The cache replaces the tower's `forward`: per
image it reads a fingerprint of the pixel rows (its grid and two sums), and keeps, in CPU memory, the image's
pixels and merged features. When every image of a call was seen before and its stored pixels equal the new ones
exactly (compared on the device, so a fingerprint clash cannot pass), the stored features are returned and the
tower does not run; otherwise it runs on the whole call and the new images are stored while the cache has room.
The features are those the tower computes (tests/model/test_vision_cache.py); the pixels take about as much
memory as the features (Qwen2.5-VL at 448x448: 2.4 and 1.8 MB per image in bf16).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from vlm_tune.model.patches import ForwardRestorer
from vlm_tune.model.wrapping import base_model

logger = logging.getLogger(__name__)
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class _Entry:
    pixels: torch.Tensor  # [patches, patch dim], CPU
    features: torch.Tensor  # [merged tokens, hidden], CPU


class VisionCache:
    """The tower's replacement `forward`; `hits` and `misses` count calls, `stored_bytes` what is kept."""

    def __init__(self, visual: nn.Module, limit_bytes: float):
        self.visual, self.limit = visual, limit_bytes
        self.original = visual.forward
        self.entries: dict[tuple, _Entry] = {}
        self.hits = self.misses = self.stored_bytes = 0
        self.output_type = None

    def _keys(self, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[list[tuple], list[torch.Tensor]]:
        rows = grid.prod(-1).tolist()  # pixel rows per image
        slices = list(torch.split(pixels, rows))
        weights = torch.linspace(1.0, 2.0, pixels.shape[-1], device=pixels.device, dtype=torch.float64)
        sums = torch.stack([torch.stack([s.double().sum(), (s.double() * weights).sum()]) for s in slices])
        return [(tuple(g), *pair) for g, pair in zip(grid.tolist(), sums.tolist())], slices

    def _cached(self, keys: list[tuple], slices: list[torch.Tensor]):
        entries = [self.entries.get(key) for key in keys]
        if any(entry is None for entry in entries):  # (entries exist only after a miss set output_type)
            return None
        for entry, pixels in zip(entries, slices):
            if not torch.equal(entry.pixels.to(pixels.device, non_blocking=True), pixels):
                return None
        device = slices[0].device
        return torch.cat([entry.features.to(device, non_blocking=True) for entry in entries])

    def __call__(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor = None, **kwargs):
        keys, slices = self._keys(hidden_states, grid_thw)
        features = self._cached(keys, slices)
        if features is not None:
            self.hits += 1
            return self.output_type(last_hidden_state=None, pooler_output=features)
        self.misses += 1
        output = self.original(hidden_states, grid_thw=grid_thw, **kwargs)
        self.output_type = type(output)
        merge = self.visual.spatial_merge_size**2
        split = torch.split(output.pooler_output.detach(), (grid_thw.prod(-1) // merge).tolist())
        for key, pixels, image_features in zip(keys, slices, split):
            size = pixels.nbytes + image_features.nbytes
            if key not in self.entries and self.stored_bytes + size <= self.limit:
                self.entries[key] = _Entry(pixels.detach().cpu(), image_features.cpu())
                self.stored_bytes += size
        return output


class VisionCacheHandle:
    """What `install_vision_cache` installed; `remove()` gives the tower its forward back (the cache is dropped)."""

    def __init__(self, cache: VisionCache, restorer: ForwardRestorer):
        self.cache, self._restorer = cache, restorer

    def remove(self) -> None:
        self._restorer.remove()


def install_vision_cache(model: nn.Module, limit_gib: float) -> VisionCacheHandle:
    """Keep up to `limit_gib` GiB of the frozen Qwen vision tower's per-image features (and pixels) in CPU memory.

    Raises:
        SpeedError: another family, or a vision tower or merger with a trainable parameter.
    """
    from vlm_tune.model.speed import SpeedError, refuse_other_families

    base = base_model(model)
    refuse_other_families(base.config.model_type, FAMILIES, "speed.vision_cache_gib", "0")
    visual = base.model.visual
    if any(param.requires_grad for param in visual.parameters()):
        raise SpeedError(
            "speed.vision_cache_gib needs the vision tower and its merger frozen (components.vision and "
            "components.projector mode: frozen); set speed.vision_cache_gib: 0"
        )
    previous = visual.__dict__.get("forward")
    cache = VisionCache(visual, limit_gib * 2**30)
    visual.forward = cache
    return VisionCacheHandle(cache, ForwardRestorer(visual, previous))
