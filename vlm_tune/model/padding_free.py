"""Padding-free batches (`speed.padding_free`): a training batch reaches the model as one row of real tokens.

A padded batch [B, T] spends every layer's work on its padding. With padding_free, a pre-hook on the transformers
model keeps only the real tokens, sample after sample, as one row [1, N] (N = the batch's real tokens), and
passes each token's position within its own sample instead of the attention mask. From those positions
transformers keeps every sample's attention to itself: flash-attention's variable-length path, flex attention's
block mask, or a block-diagonal mask on sdpa and eager. The loss and gradients are the padded batch's
(tests/model/test_padding_free.py). With sdpa or eager that mask spans the whole row, so attention work grows
with the batch (a warning says so); the layers' matrix products, most of a step, shrink to the real tokens.

Families (FLATTENERS): those whose image inputs do not depend on the text rows (LLaVA, LLaVA-NeXT), Idefics3 /
SmolVLM-Instruct (each row's images join the one row's), and Qwen2-VL / Qwen2.5-VL (the 3D rotary positions are
computed per sample first; transformers reads packed text positions from a fourth row in front). Batches without
padding, evaluation and generation go through unchanged.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
from torch import nn

from vlm_tune.constants import IGNORE_INDEX
from vlm_tune.model.wrapping import base_model

logger = logging.getLogger(__name__)

ROW_KEYS = ("input_ids", "token_type_ids", "mm_token_type_ids")  # [B, T] inputs that follow the tokens


def _unchanged(base: nn.Module, kwargs: dict, keep: torch.Tensor, positions: torch.Tensor) -> dict:
    return {}


def _idefics3_images(base: nn.Module, kwargs: dict, keep: torch.Tensor, positions: torch.Tensor) -> dict:
    """[B, images, ...] pixel inputs become [1, B x images, ...]; the model drops the all-zero padding images."""
    out = {}
    for key in ("pixel_values", "pixel_attention_mask"):
        if kwargs.get(key) is not None:
            value = kwargs[key]
            out[key] = value.reshape(1, -1, *value.shape[2:])
    return out


def _qwen_positions(base: nn.Module, kwargs: dict, keep: torch.Tensor, positions: torch.Tensor) -> dict:
    """[4, 1, N] positions: each sample's text positions, then its 3D rotary positions (temporal, height, width)."""
    inner = base.model
    names = inspect.signature(inner.get_rope_index).parameters  # its arguments differ between transformers versions
    extra = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")
    rope, _ = inner.get_rope_index(kwargs["input_ids"], **{k: kwargs.get(k) for k in extra if k in names})  # [3, B, T]
    both = torch.cat([positions[None].to(rope.device), rope], dim=0)  # [4, B, T]
    return {"position_ids": both[:, keep][:, None]}  # [4, 1, N]


FLATTENERS: dict[str, Callable[[nn.Module, dict, torch.Tensor, torch.Tensor], dict]] = {
    "llava": _unchanged,
    "llava_next": _unchanged,
    "idefics3": _idefics3_images,  # SmolVLM-Instruct too
    "qwen2_vl": _qwen_positions,
    "qwen2_5_vl": _qwen_positions,
}


def flatten_batch(base: nn.Module, kwargs: dict) -> dict:
    """The model inputs of a padded batch as one row of its real tokens (unchanged when nothing is padding).

    Args:
        base: the transformers model. kwargs: its forward's keyword inputs (input_ids, attention_mask [B, T], ...).
    Returns:
        The inputs for the one row: [1, N] token inputs, position_ids, no attention_mask, use_cache False.
    """
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2 or kwargs.get("input_ids") is None or bool(mask.all()):
        return kwargs
    keep = mask.bool()  # [B, T]
    positions = mask.long().cumsum(1) - 1  # [B, T]: each token's position within its sample
    out = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    out.update(FLATTENERS[base.config.model_type](base, kwargs, keep, positions))
    for key in ROW_KEYS:
        if kwargs.get(key) is not None:
            out[key] = kwargs[key][keep][None]  # [1, N]
    if kwargs.get("labels") is not None:
        labels = kwargs["labels"].clone()
        labels[torch.arange(len(labels)), keep.int().argmax(1)] = IGNORE_INDEX  # never a target of the sample before
        out["labels"] = labels[keep][None]
    out.setdefault("position_ids", positions[keep][None])
    out["use_cache"] = False  # transformers reads packed positions only without a cache
    return out


def install_padding_free(model: nn.Module):
    """Flatten every training forward's padded batch into one row (a pre-hook ahead of the other speed hooks).

    Returns:
        The hook's handle (`remove()` takes it off).
    Raises:
        SpeedError: a family outside FLATTENERS (the message lists them).
    """
    from vlm_tune.model.speed import refuse_other_families

    base = base_model(model)
    refuse_other_families(base.config.model_type, FLATTENERS, "speed.padding_free", "false")
    attention = getattr(base.config.get_text_config(), "_attn_implementation", None)
    if attention in ("sdpa", "eager"):
        logger.warning(
            "speed.padding_free with %s attention masks the whole row: attention work grows with the batch "
            "(model.attn_implementation: flash_attention_2 or flex_attention works per sample)",
            attention,
        )

    def before(module, args, kwargs):
        return (args, flatten_batch(module, kwargs)) if module.training else None

    return base.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
