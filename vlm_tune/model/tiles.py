"""mllama (Llama-3.2-Vision) in training: padding tiles' features skip the projector and the cross-attention.

The processor pads every image to `max_image_tiles` tiles (an image of one tile comes with three padding tiles)
and `cross_attention_mask` masks those tiles for every text token. The model still projects their features and
feeds them to every cross-attention layer as keys and values. Here only each sample's real tiles are projected
and passed on, with a cross-attention mask of one column per kept tile: masked keys add nothing, so the loss and
the gradients are the same.

The vision tower itself still reads the padding tiles: its attention mask lets real tiles attend to padding
tiles (only padding-to-padding pairs are masked), so dropping them there would change the image features.

The patch is a forward pre-hook on the inner `MllamaModel`, active in training mode only (evaluation and
`generate` run the model's own path); `handle.remove()` undoes it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlm_tune.model.wrapping import base_model
from vlm_tune.relevance.sequence import compact


def real_tile_inputs(
    inner: nn.Module,
    pixel_values: torch.Tensor,
    aspect_ratio_ids: torch.Tensor,
    aspect_ratio_mask: torch.Tensor,
    cross_attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention states and mask holding only each sample's real tiles.

    Args:
        inner: the `MllamaModel` (vision_model, multi_modal_projector).
        pixel_values: [B, I, G, C, H, W]; aspect_ratio_ids: [B, I]; aspect_ratio_mask: [B, I, G] (1: real tile);
        cross_attention_mask: [B, T, I, G].
    Returns:
        (cross_attention_states [B, R * P, D], cross_attention_mask [B, T, 1, R]) with R the most real tiles of
        one sample in the batch and P the tokens per tile.
    """
    batch, images, tiles = aspect_ratio_mask.shape
    # The host reads the tile mask (compact, nonzero) before the tower is launched, so it does not wait for it.
    index, valid = compact(aspect_ratio_mask.reshape(batch, images * tiles).bool())  # [B, R]: real tiles in order
    sample, slot = torch.nonzero(valid, as_tuple=True)  # [n_real]: each real tile's sample and place in [B, R]
    tile = index[sample, slot]  # [n_real]: its tile in [B, I * G]
    vision = inner.vision_model(
        pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
    ).last_hidden_state  # [B, I, G, P, Dv]
    per_tile = vision.shape[3]
    real = vision.reshape(batch, images * tiles, per_tile, -1)[sample, tile]  # [n_real, P, Dv]
    projected = inner.multi_modal_projector(real)  # [n_real, P, D]
    states = projected.new_zeros(*index.shape, per_tile, projected.shape[-1])  # [B, R, P, D]
    states = states.index_put((sample, slot), projected)
    text_length = cross_attention_mask.shape[1]
    columns = cross_attention_mask.reshape(batch, text_length, images * tiles)  # [B, T, I * G]
    mask = torch.gather(columns, 2, index[:, None, :].expand(-1, text_length, -1))  # [B, T, R]
    mask = mask * valid[:, None, :].to(mask.dtype)
    return states.reshape(batch, -1, states.shape[-1]), mask[:, :, None, :]


def _drop_padding_tiles(inner: nn.Module, args, kwargs) -> Optional[tuple]:
    needed = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
    if not inner.training or any(kwargs.get(key) is None for key in needed):
        return None
    if bool(kwargs["aspect_ratio_mask"].bool().all()):
        return None  # no padding tile to drop
    states, mask = real_tile_inputs(inner, *(kwargs[key] for key in needed))
    kwargs.update(
        pixel_values=None,
        aspect_ratio_ids=None,
        aspect_ratio_mask=None,
        cross_attention_states=states,
        cross_attention_mask=mask,
    )
    return args, kwargs


def mllama_inner(model: nn.Module, lever: str) -> nn.Module:
    """The `MllamaModel` inside an mllama model (under any PEFT wrapper), where the mllama levers hook in.

    Raises:
        ValueError: the model is not an mllama model (the message starts with `lever`).
    """
    base = base_model(model)
    inner = getattr(base, "model", None)
    if getattr(base.config, "model_type", None) != "mllama" or not hasattr(inner, "multi_modal_projector"):
        raise ValueError(f"{lever}: {type(base).__name__} is not an mllama model")
    return inner


def install_padding_tile_drop(model: nn.Module):
    """Patch an mllama model (under any PEFT wrapper) so that training skips padding tiles after the vision tower.

    Returns:
        The hook handle (`remove()` undoes the patch).
    Raises:
        ValueError: the model is not an mllama model.
    """
    return mllama_inner(model, "padding tiles").register_forward_pre_hook(_drop_padding_tiles, with_kwargs=True)
