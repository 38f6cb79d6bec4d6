"""Qwen2-VL / Qwen2.5-VL vision attention in a few batched calls (`speed.vision_attention: batched`).

The vision tower of these families attends within segments of one flat sequence: each image in full-attention
blocks, each window of 8 x 8 patches in Qwen2.5-VL's window blocks. Without flash-attn, transformers runs one
`scaled_dot_product_attention` per segment: for four 448 px images that is 64 windows x 28 blocks, about 1,800
small calls per forward, and each block first reads the segment lengths back from the GPU (a sync). The step is
then bound by the CPU launching kernels: a profile of Qwen2.5-VL-7B QLoRA showed the GPU busy 17% of the time.

Here the segments of one length are stacked into one batch, `[segments, heads, length, dim]`, so a block makes one
call per distinct length (one, when every window is whole), and the lengths are read once per forward (they are
cached for the `cu_seqlens` tensor the tower passes to all its blocks). Each segment still attends only within
itself, so the output is the same; tests/model/test_vision_attention.py compares outputs and gradients.

Only blocks running on sdpa are patched: eager is the user's explicit choice, flash-attn is varlen already.
"""

from __future__ import annotations

import sys
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from vlm_tune.model.patches import ForwardRestorer
from vlm_tune.model.wrapping import base_model

# The vision attention classes with the segment loop (qwen2_vl: VisionAttention, qwen2_5_vl: its own).
SEGMENTED_ATTENTION = {"qwen2_vl": "VisionAttention", "qwen2_5_vl": "Qwen2_5_VLVisionAttention"}


class _SegmentPlan:
    """How to batch the segments of one `cu_seqlens`: per distinct length, the token index of its segments."""

    def __init__(self, cu_seqlens: torch.Tensor):
        bounds = cu_seqlens.tolist()  # the one read-back per forward and tensor
        starts_by_length: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                starts_by_length.setdefault(end - start, []).append(start)
        self.groups = []  # (length, segments, token index [segments * length] or None when one group covers all)
        whole = len(starts_by_length) == 1 and bounds[0] == 0
        for length, starts in starts_by_length.items():
            index = None
            if not whole:
                offsets = torch.tensor(starts, device=cu_seqlens.device)[:, None]
                index = (offsets + torch.arange(length, device=cu_seqlens.device)).reshape(-1)
            self.groups.append((length, len(starts), index))


_plans: dict[int, tuple[weakref.ref, _SegmentPlan]] = {}  # id(cu_seqlens) -> (its weak reference, plan)


def _plan_for(cu_seqlens: torch.Tensor) -> _SegmentPlan:
    entry = _plans.get(id(cu_seqlens))
    if entry is not None and entry[0]() is cu_seqlens:
        return entry[1]
    plan = _SegmentPlan(cu_seqlens)
    for key in [key for key, (ref, _) in _plans.items() if ref() is None]:  # tensors of earlier forwards
        del _plans[key]
    _plans[id(cu_seqlens)] = (weakref.ref(cu_seqlens), plan)
    return plan


def segment_attention(query, key, value, plan: _SegmentPlan, scaling: float) -> torch.Tensor:
    """Attention within each segment, one sdpa call per segment length.

    Args:
        query, key, value: [T, H, d], the segments laid end to end.
    Returns:
        [T, H, d].
    """
    heads, dim = query.shape[1:]
    output = None
    for length, segments, index in plan.groups:
        picked = [t if index is None else t.index_select(0, index) for t in (query, key, value)]  # [S * L, H, d]
        q, k, v = (t.reshape(segments, length, heads, dim).transpose(1, 2) for t in picked)  # [S, H, L, d]
        attended = F.scaled_dot_product_attention(q, k, v, scale=scaling)  # [S, H, L, d]
        attended = attended.transpose(1, 2).reshape(segments * length, heads, dim)  # [S * L, H, d]
        if index is None:
            return attended
        output = query.new_zeros(query.shape) if output is None else output
        output = output.index_copy(0, index, attended)  # out of place: autograd sees every group
    return output


def _batched_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    tokens = hidden_states.shape[0]
    qkv = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1)  # [T, 3, H, d]
    query, key, value = qkv.permute(1, 0, 2, 3).unbind(0)  # [T, H, d] each
    cos, sin = position_embeddings
    query, key = rotary(query, key, cos, sin)
    attended = segment_attention(query, key, value, _plan_for(cu_seqlens), self.scaling)  # [T, H, d]
    return self.proj(attended.reshape(tokens, -1))  # [T, D]


def install_batched_vision_attention(model: nn.Module) -> list[ForwardRestorer]:
    """Patch every sdpa vision attention block of a Qwen2-VL / Qwen2.5-VL model (under any PEFT wrapper).

    Returns:
        One handle per patched block (`remove()` gives it its own forward back); none for other families.
    """
    base = base_model(model)
    class_name = SEGMENTED_ATTENTION.get(getattr(base.config, "model_type", None))
    handles = []
    for module in base.modules():
        if type(module).__name__ != class_name or module.config._attn_implementation != "sdpa":
            continue
        previous = module.__dict__.get("forward")
        module.forward = types.MethodType(_batched_forward, module)
        handles.append(ForwardRestorer(module, previous))
    return handles
