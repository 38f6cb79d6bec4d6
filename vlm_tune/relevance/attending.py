"""Attending: turn per-token relevance into a budget of K visual tokens per image.

The kept tokens stay in their original order (and, downstream, at their original positions); the
dropped ones can be folded into one summary token. The same `Selection` is produced by the two
parameter-free baselines at the same K: `random` (K tokens drawn uniformly) and `pool` (average
pooling of the image's tokens down to K, in order).

Shapes: U = images (selection units) in the batch, N = most visual tokens of one image,
D = feature width, K = most tokens kept by one image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from vlm_tune.relevance.errors import RelevanceError


def keep_count(keep: Union[int, float], num_tokens: int) -> int:
    """Number of visual tokens an image of `num_tokens` tokens keeps.

    Args:
        keep: a count (int >= 1, capped at `num_tokens`) or a fraction in (0, 1] (rounded up, at least 1).
        num_tokens: visual tokens of the image.
    Returns:
        K with 1 <= K <= num_tokens (0 when the image has no tokens).
    Raises:
        RelevanceError: `keep` is neither a positive count nor a fraction in (0, 1].
    """
    if num_tokens <= 0:
        return 0
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise RelevanceError(f"relevance.keep: expected a count or a fraction, got {keep!r}")
    if isinstance(keep, int):
        if keep < 1:
            raise RelevanceError(f"relevance.keep: a count must be >= 1, got {keep}")
        return min(keep, num_tokens)
    if not 0.0 < keep <= 1.0:
        raise RelevanceError(f"relevance.keep: a fraction must be in (0, 1], got {keep}")
    return max(1, min(num_tokens, math.ceil(keep * num_tokens - 1e-6)))


@dataclass
class Selection:
    """Which visual tokens of each image reach the language model, and with which values.

    Attributes:
        slots: [U, S] indices into each image's tokens, ascending; the token positions that stay in the
            sequence (kept tokens, plus the summary slot when there is one). Padding entries are 0.
        slot_valid: [U, S] bool, False on padding entries.
        values: [U, S, D] the features placed at those slots (kept tokens are the original features in
            the forward pass; gradients reach the relevance through them).
        kept_counts: [U] number of kept tokens (without the summary token).
        token_counts: [U] number of visual tokens each image had before selection.
        summary_slot: [U] index of the summary token's slot, -1 where the image has no summary token.
        relevance: [U, N] the relevance scores the selection used (None for the baselines).
    """

    slots: torch.Tensor
    slot_valid: torch.Tensor
    values: torch.Tensor
    kept_counts: torch.Tensor
    token_counts: torch.Tensor
    summary_slot: torch.Tensor
    relevance: Optional[torch.Tensor] = None


def _pack_slots(
    slot_mask: torch.Tensor,
    token_values: torch.Tensor,
    counts: torch.Tensor,
    valid: torch.Tensor,
    summary_slot: torch.Tensor,
) -> Selection:
    """Gather the slots marked in `slot_mask` [U, N] (ascending) with their `token_values` [U, N, D]."""
    num_slots = int(slot_mask.sum(-1).max().item()) if slot_mask.numel() else 0
    # Stable sort puts the marked indices first, in ascending order.
    order = torch.sort((~slot_mask).to(torch.int8), dim=-1, stable=True).indices[:, :num_slots]  # [U, S]
    slot_valid = torch.gather(slot_mask, 1, order)  # [U, S]
    slots = order.masked_fill(~slot_valid, 0)
    values = torch.gather(token_values, 1, slots[..., None].expand(-1, -1, token_values.shape[-1]))  # [U, S, D]
    return Selection(slots, slot_valid, values, counts, valid.sum(-1), summary_slot)


def _summary_slots(kept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Slot of each image's summary token: its last dropped token in original order ([U]; -1 if none dropped)."""
    dropped = valid & ~kept  # [U, N]
    index = torch.arange(kept.shape[1], device=kept.device).expand_as(kept)
    return torch.where(dropped, index, -1).amax(-1)  # [U]


def _with_summary(
    kept: torch.Tensor,
    valid: torch.Tensor,
    features: torch.Tensor,
    weights: torch.Tensor,
    summary_embedding: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold each image's dropped tokens into one summary token placed at the slot of its last dropped token.

    Args:
        kept, valid: [U, N] bool. features: [U, N, D]. weights: [U, N] unnormalised log-weights of the
            dropped tokens (relevance, or zeros for a plain mean).
        summary_embedding: [D] learned marker added to the summary, or None.
    Returns:
        (slot_mask [U, N], token_values [U, N, D], summary_slot [U]).
    """
    summary_slot = _summary_slots(kept, valid)  # [U]
    has_summary = summary_slot >= 0
    dropped = valid & ~kept
    log_w = weights.float().masked_fill(~dropped, float("-inf"))
    w = torch.softmax(log_w, dim=-1).nan_to_num(0.0)  # [U, N]; rows without dropped tokens are all-NaN -> 0
    summary = torch.einsum("un,und->ud", w.to(features.dtype), features)  # [U, D]
    if summary_embedding is not None:
        summary = summary + summary_embedding.to(features.dtype)
    at_slot = F.one_hot(summary_slot.clamp_min(0), kept.shape[1]).bool() & has_summary[:, None]  # [U, N]
    token_values = torch.where(at_slot[..., None], summary[:, None, :], features)  # [U, N, D]
    return kept | at_slot, token_values, summary_slot


class Attending(nn.Module):
    """Keep the K most relevant tokens of each image, differentiably.

    Gradient path (why straight-through with a sigmoid gate): the forward pass is a hard top-k, so the
    language model sees exactly K tokens in training as at inference (no train/test gap, and the saved
    tokens/s are real); each kept token is multiplied by `1 + (s - s.detach())` (exactly 1 in the forward
    pass), with s = sigmoid(sharpness * (relevance - threshold)) and the threshold halfway between the
    K-th and (K+1)-th relevance. The LM loss thus sends every kept token d(loss)/d(scale of token) back
    to its relevance, strongest for tokens near the cut, which are the ones whose rank can change; the
    summary token (a relevance-weighted mean of the dropped tokens) carries gradient to dropped tokens.
    A dropped token gets no gradient of its own, so a scorer that drifts onto useless tokens early may
    never try the useful ones again (measured: a run that kept only background tokens). Remedies:
    `relevance.start_step` (the scorer waits until the model reads visual tokens; used by the benchmark)
    and `exploration`, Gumbel noise on the choice in training (a Gumbel top-k sample; at 1.0 it cost more
    than it gave in our measurement, so it is off by default). Inference chooses on relevance alone.
    Soft gating was not used: it keeps all N tokens in the sequence.
    """

    def __init__(
        self, feature_size: int, temperature: float = 1.0, summary_token: bool = False, exploration: float = 0.0
    ):
        """Args: feature_size: width D of the visual tokens; temperature: initial softness of the gate;
        summary_token: fold the dropped tokens into one extra token; exploration: scale of the Gumbel
        noise on the relevance when choosing in training."""
        super().__init__()
        self.exploration = exploration
        # Learned log inverse temperature of the gate (how far from the cut a token still gets gradient).
        self.log_sharpness = nn.Parameter(torch.tensor(-math.log(temperature)))
        # Learned marker that tells the language model "this token summarises dropped ones".
        self.summary_embedding = nn.Parameter(torch.zeros(feature_size)) if summary_token else None

    def forward(
        self, relevance: torch.Tensor, features: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor
    ) -> Selection:
        """Select K_u tokens of image u by relevance.

        Args:
            relevance: [U, N] scores (higher is kept first). features: [U, N, D]. valid: [U, N] bool.
            counts: [U] long, tokens to keep per image (K_u <= valid tokens of u).
        Returns:
            The `Selection`; kept values equal the features in the forward pass.
        """
        num_tokens = relevance.shape[1]
        noise = torch.zeros_like(relevance.detach())  # [U, N] 0 at inference
        if self.training and self.exploration > 0:
            uniform = torch.rand_like(noise).clamp(1e-6, 1 - 1e-6)
            noise = -self.exploration * torch.log(-torch.log(uniform))  # Gumbel noise
        ranked = (relevance.detach() + noise).masked_fill(~valid, float("-inf"))  # [U, N] what the top-k takes
        sorted_scores, order = ranked.sort(dim=-1, descending=True)  # [U, N]
        rank_of = torch.empty_like(order).scatter_(
            1, order, torch.arange(num_tokens, device=order.device).expand_as(order)
        )  # [U, N] rank of each token
        kept = (rank_of < counts[:, None]) & valid  # [U, N]

        # Threshold halfway between the last kept and the first dropped score (or below the last kept one).
        last_kept = torch.gather(sorted_scores, 1, (counts - 1).clamp_min(0)[:, None]).squeeze(1)  # [U]
        first_dropped = torch.gather(sorted_scores, 1, counts.clamp_max(num_tokens - 1)[:, None]).squeeze(1)
        n_valid = valid.sum(-1)
        threshold = torch.where(counts < n_valid, (last_kept + first_dropped) / 2, last_kept - 1.0)  # [U]

        soft = torch.sigmoid(self.log_sharpness.exp() * (relevance + noise - threshold[:, None]))  # [U, N]
        gate = 1.0 + (soft - soft.detach())  # [U, N], exactly 1 in the forward pass (soft - soft == 0)
        gated = features * gate.to(features.dtype)[..., None]  # [U, N, D]

        if self.summary_embedding is not None:
            slot_mask, token_values, summary_slot = _with_summary(kept, valid, gated, relevance, self.summary_embedding)
        else:
            slot_mask, token_values = kept, gated
            summary_slot = torch.full_like(counts, -1)
        selection = _pack_slots(slot_mask, token_values, counts, valid, summary_slot)
        selection.relevance = relevance
        return selection


def select_random(
    features: torch.Tensor,
    valid: torch.Tensor,
    counts: torch.Tensor,
    summary_token: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Selection:
    """Baseline: K_u tokens of image u drawn uniformly at random, kept in original order.

    Args:
        features: [U, N, D]. valid: [U, N] bool. counts: [U] long.
        summary_token: fold the dropped tokens into their plain mean.
        generator: torch generator for the draw (default: the global one).
    Returns:
        The `Selection` (no relevance).
    """
    noise = torch.rand(valid.shape, generator=generator, device="cpu").to(valid.device)  # [U, N]
    noise = noise.masked_fill(~valid, -1.0)
    rank_of = noise.argsort(dim=-1, descending=True).argsort(dim=-1)  # [U, N]
    kept = (rank_of < counts[:, None]) & valid
    if summary_token:
        slot_mask, token_values, summary_slot = _with_summary(
            kept, valid, features, torch.zeros(valid.shape, device=valid.device), None
        )
    else:
        slot_mask, token_values, summary_slot = kept, features, torch.full_like(counts, -1)
    return _pack_slots(slot_mask, token_values, counts, valid, summary_slot)


def _grid_factors(height: int, width: int, count: int) -> Optional[tuple[int, int]]:
    """Output grid (h, w) with h * w == count that fits in (height, width), closest to its aspect; None if none."""
    pairs = [(h, count // h) for h in range(1, count + 1) if count % h == 0]
    pairs = [(h, w) for h, w in pairs if h <= height and w <= width]
    if not pairs:
        return None
    return min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(height / width)))


def _region_centres(size: int, parts: int) -> torch.Tensor:
    """Centre index of each of the `parts` adaptive-pooling regions over `size`.

    Strictly increasing when parts <= size.
    """
    starts = [(i * size) // parts for i in range(parts)]
    ends = [-((-(i + 1) * size) // parts) for i in range(parts)]  # ceil
    return torch.tensor([(s + e - 1) // 2 for s, e in zip(starts, ends)])


def _pool_one(tokens: torch.Tensor, count: int, grid: Optional[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool one image's tokens [n, D] to `count` tokens; returns (pooled [count, D], slots [count]).

    Each pooled token sits at the slot of its region's centre token, so the slots ascend like the regions.
    """
    n = tokens.shape[0]
    factors = _grid_factors(*grid, count) if grid is not None and grid[0] * grid[1] == n else None
    if factors is not None:  # 2-D adaptive pooling over the patch grid
        height, width = grid
        as_map = tokens.T.reshape(1, -1, height, width)  # [1, D, h, w]
        pooled = F.adaptive_avg_pool2d(as_map, factors).flatten(2)[0].T  # [count, D]
        rows, cols = _region_centres(height, factors[0]), _region_centres(width, factors[1])
        slots = (rows[:, None] * width + cols[None, :]).flatten()  # [count]
    else:  # 1-D adaptive pooling in sequence order
        pooled = F.adaptive_avg_pool1d(tokens.T[None], count)[0].T  # [count, D]
        slots = _region_centres(n, count)
    return pooled, slots.to(tokens.device)


def select_pool(
    features: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor, grids: list[Optional[tuple[int, int]]]
) -> Selection:
    """Baseline: average-pool each image's tokens down to K_u, in order (2-D on the patch grid when known).

    Args:
        features: [U, N, D]. valid: [U, N] bool (each image's tokens come first). counts: [U] long.
        grids: per image (rows, cols) of its token grid, or None for 1-D pooling.
    Returns:
        The `Selection`; every token contributes to a pooled one, so there is no summary token.
    """
    num_units, num_tokens, width = features.shape
    slot_mask = torch.zeros_like(valid)
    token_values = torch.zeros_like(features)
    for unit in range(num_units):
        n = int(valid[unit].sum())
        pooled, slots = _pool_one(features[unit, :n], int(counts[unit]), grids[unit])
        slot_mask[unit, slots] = True
        token_values = token_values.index_put((torch.full_like(slots, unit), slots), pooled)
    return _pack_slots(slot_mask, token_values, counts, valid, torch.full_like(counts, -1))
