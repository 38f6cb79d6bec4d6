"""Architecture-independent pieces of token selection: grouping visual tokens per image, reading the
prompt, and rebuilding a shorter input sequence from a `Selection`.

Shapes: B = samples, T = sequence length, U = images (selection units), N = most tokens of one image,
D = language-model width, S = slots of one image after selection, L = new sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vlm_tune.constants import IGNORE_INDEX
from vlm_tune.relevance.attending import Selection
from vlm_tune.relevance.errors import RelevanceError


@dataclass
class VisualTokens:
    """The visual tokens of a batch, one row per image.

    Attributes:
        features: [U, N, D] features after the projector, padded per image.
        valid: [U, N] bool; each image's tokens come first.
        unit_sample: [U] the sample each image belongs to.
        grids: per image (rows, cols) of its token grid, or None when unknown.
    """

    features: torch.Tensor
    valid: torch.Tensor
    unit_sample: torch.Tensor
    grids: list[Optional[tuple[int, int]]]


def compact(mask: torch.Tensor, align_right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of each row of `mask` [R, T], in order, padded to the longest row.

    Args:
        mask: [R, T] bool.
        align_right: put the padding first (left padding) instead of last.
    Returns:
        (index [R, L], valid [R, L]); padding entries point at column 0 and are invalid.
    """
    lengths = mask.sum(-1)  # [R]
    longest = int(lengths.max().item()) if mask.numel() else 0
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :longest]  # [R, L] True ones first
    column = torch.arange(longest, device=mask.device).expand(mask.shape[0], -1)  # [R, L]
    if align_right:
        shifted = column - (longest - lengths)[:, None]
        valid = shifted >= 0
        index = torch.gather(order, 1, shifted.clamp_min(0))
    else:
        valid = column < lengths[:, None]
        index = order
    return index.masked_fill(~valid, 0), valid


def pad_units(
    units: list[torch.Tensor], unit_sample: list[int], grids: list[Optional[tuple[int, int]]]
) -> VisualTokens:
    """Stack per-image token tensors [n_u, D] into a padded `VisualTokens`."""
    width = units[0].shape[-1]
    longest = max(unit.shape[0] for unit in units)
    features = units[0].new_zeros(len(units), longest, width)
    valid = torch.zeros(len(units), longest, dtype=torch.bool, device=units[0].device)
    for row, unit in enumerate(units):
        features[row, : unit.shape[0]] = unit
        valid[row, : unit.shape[0]] = True
    sample = torch.tensor(unit_sample, device=units[0].device)
    return VisualTokens(features, valid, sample, grids)


def split_runs(visual_mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive True entries of `visual_mask` [B, T] as (sample, start, end), in order."""
    runs = []
    padded = torch.nn.functional.pad(visual_mask.to(torch.int8), (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]  # [B, T + 1]: +1 at run starts, -1 after run ends
    for sample in range(visual_mask.shape[0]):
        starts = (edges[sample] == 1).nonzero().flatten().tolist()
        ends = (edges[sample] == -1).nonzero().flatten().tolist()
        runs += [(sample, start, end) for start, end in zip(starts, ends)]
    return runs


def placeholder_units(visual_mask: torch.Tensor, unit_sizes: list[int]) -> tuple[list[int], torch.Tensor]:
    """Assign the placeholder positions, in reading order, to consecutive images of the given sizes.

    Args:
        visual_mask: [B, T] bool, True at image placeholder tokens.
        unit_sizes: tokens of each image, in the order their features come.
    Returns:
        (sample of each image, positions [U, N] of each image's placeholders in its sample, -1 padding).
    Raises:
        RelevanceError: the placeholders and the features do not match, or an image spans two samples.
    """
    sample_of, position_of = visual_mask.nonzero(as_tuple=True)  # reading order
    if sample_of.numel() != sum(unit_sizes):
        raise RelevanceError(
            f"relevance: the batch has {sample_of.numel()} image placeholder tokens but the vision side produced "
            f"{sum(unit_sizes)} features ({unit_sizes} per image); build inputs with the model's own processor "
            "and do not truncate image tokens (data.max_length)."
        )
    positions = torch.full((len(unit_sizes), max(unit_sizes)), -1, dtype=torch.long, device=visual_mask.device)
    samples, start = [], 0
    for row, size in enumerate(unit_sizes):
        owners = sample_of[start : start + size]
        if owners.numel() and not bool((owners == owners[0]).all()):
            raise RelevanceError(
                f"relevance: image {row} of the batch spans two samples; its placeholder tokens "
                "were cut by truncation (raise data.max_length)"
            )
        samples.append(int(owners[0]) if owners.numel() else 0)
        positions[row, :size] = position_of[start : start + size]
        start += size
    return samples, positions


def prompt_tokens(
    text_embeds: torch.Tensor, prompt_mask: torch.Tensor, unit_sample: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt token embeddings of each image's sample.

    Args:
        text_embeds: [B, T, E] token embeddings. prompt_mask: [B, T] bool, True on prompt tokens.
        unit_sample: [U] sample of each image.
    Returns:
        (prompt [U, L, E], prompt_valid [U, L]).
    """
    index, valid = compact(prompt_mask)  # [B, L]
    prompt = torch.gather(text_embeds, 1, index[..., None].expand(-1, -1, text_embeds.shape[-1]))  # [B, L, E]
    return prompt[unit_sample], valid[unit_sample]


def prompt_mask_of(
    attention_mask: torch.Tensor, visual_mask: torch.Tensor, labels: Optional[torch.Tensor]
) -> torch.Tensor:
    """Prompt positions: attended, not an image placeholder, and (in training) without a label."""
    mask = attention_mask.bool() & ~visual_mask
    if labels is not None:
        mask &= labels == IGNORE_INDEX
    return mask


@dataclass
class ShortSequence:
    """A sequence rebuilt without the dropped visual tokens.

    Attributes:
        inputs_embeds: [B, L, D]. attention_mask: [B, L]. input_ids: [B, L].
        per_token: the other per-token tensors (labels, position ids...) shortened the same way.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    per_token: dict[str, torch.Tensor]


def shorten_sequence(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual_mask: torch.Tensor,
    unit_positions: torch.Tensor,
    unit_sample: torch.Tensor,
    selection: Selection,
    per_token: dict[str, tuple[torch.Tensor, int]],
    align_right: bool,
) -> ShortSequence:
    """Write the selected visual tokens into their slots and drop every other placeholder position.

    Args:
        inputs_embeds: [B, T, D] token embeddings (placeholders not yet filled).
        input_ids, attention_mask, visual_mask: [B, T].
        unit_positions: [U, N] sequence position of each image token (-1 padding). unit_sample: [U].
        selection: which token of each image goes where.
        per_token: name -> (tensor whose LAST dim is the sequence, value for new padding positions).
        align_right: pad the shortened rows on the left (generation, or left-padded input).
    Returns:
        The `ShortSequence`; non-visual tokens keep their order and values.
    """
    slot_positions = torch.gather(unit_positions, 1, selection.slots)  # [U, S] sequence position of each slot
    slot_samples = unit_sample[:, None].expand_as(slot_positions)  # [U, S]
    slot_valid = selection.slot_valid  # [U, S]
    rows, cols = slot_samples[slot_valid], slot_positions[slot_valid]  # [K_total]
    values = selection.values[slot_valid].to(inputs_embeds.dtype)  # [K_total, D]
    filled = inputs_embeds.index_put((rows, cols), values)  # [B, T, D]

    keep = ~visual_mask  # [B, T]
    keep = keep.index_put((rows, cols), torch.ones_like(rows, dtype=torch.bool))
    index, valid = compact(keep, align_right=align_right)  # [B, L]

    def take(tensor: torch.Tensor, fill) -> torch.Tensor:
        gather_index = index.expand(*tensor.shape[:-2], *index.shape) if tensor.dim() > 2 else index
        taken = torch.gather(tensor, -1, gather_index)
        return taken.masked_fill(~valid, fill)

    embeds = torch.gather(filled, 1, index[..., None].expand(-1, -1, filled.shape[-1]))  # [B, L, D]
    return ShortSequence(
        inputs_embeds=embeds,
        attention_mask=take(attention_mask, 0),
        input_ids=take(input_ids, 0),
        per_token={name: take(tensor, fill) for name, (tensor, fill) in per_token.items()},
    )


def padding_is_left(attention_mask: torch.Tensor) -> bool:
    """True when some row is padded on the left (and none on the right)."""
    left = bool((attention_mask[:, 0] == 0).any())
    right = bool((attention_mask[:, -1] == 0).any())
    return left and not right


def full_positions(attention_mask: torch.Tensor, generating: bool) -> torch.Tensor:
    """1-D position ids [B, T] of the full sequence, as the model would use them.

    In a forward pass decoders number positions 0..T-1; `generate` numbers attended tokens from 0 and
    gives padding 0 — we reproduce each so that keeping every token changes nothing.
    """
    if generating:
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(attention_mask == 0, 0)
    length = attention_mask.shape[-1]
    return torch.arange(length, device=attention_mask.device).expand(attention_mask.shape[0], -1)
