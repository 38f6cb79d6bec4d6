"""mllama in training: the decoder's padding mask is read on the host before the vision tower is launched.

On sdpa, transformers reads the 2D padding mask on the host before it builds the language model's mask
(`padding_mask.all()`: with no padding it skips the mask and lets sdpa apply causality). mllama's text model does
that after the vision tower is launched, and on a GPU a host read waits for every kernel launched before it, so
the host idles through the tower instead of launching the text layers meanwhile (`benchmarks/host_syncs.py`
lists a step's host reads). Here a forward pre-hook on `MllamaModel`, which runs before the tower, reads the mask
once and passes the text model what transformers would build: no mask when nothing is padded, else causal AND
padding as a [B, 1, T, T] boolean mask, which transformers takes as it is. The attention computes the same.
Training mode, sdpa and a 2D mask only; `handle.remove()` undoes it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlm_tune.model.tiles import mllama_inner


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean mask, True where query t may attend to key s: s <= t and key s is not padding.

    Args:
        attention_mask: [B, T] padding mask (1: token, 0: padding).
    """
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()  # [T, T]
    return causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, T]


def _read_padding_early(inner: nn.Module, args, kwargs) -> Optional[tuple]:
    mask = kwargs.get("attention_mask")
    if not inner.training or mask is None or mask.dim() != 2 or kwargs.get("past_key_values") is not None:
        return None
    if inner.language_model.config._attn_implementation != "sdpa":
        return None  # other implementations take the 2D mask without reading it, or build their own
    kwargs["attention_mask"] = None if bool(mask.all()) else causal_padding_mask(mask)  # the host read, early
    return args, kwargs


def install_early_padding_read(model: nn.Module):
    """Patch an mllama model (under any PEFT wrapper) so that training reads its padding mask before the vision tower.

    Returns:
        The hook handle (`remove()` undoes the patch).
    Raises:
        ValueError: the model is not an mllama model.
    """
    inner = mllama_inner(model, "decoder mask")
    # first of the model's pre-hooks: speed.padding_tiles' hook runs the vision tower
    return inner.register_forward_pre_hook(_read_padding_early, with_kwargs=True, prepend=True)
