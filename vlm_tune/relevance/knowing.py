"""Knowing: three scores for every visual token of an image, given the prompt.

- information (propositional): how much the token carries — the log energy of its feature vector
  relative to the image, plus a learned read-out of its content;
- salience (perspectival): how it stands out — contrast with the whole image and with its neighbours
  on the patch grid (sequence neighbours when the grid is unknown);
- query coupling (participatory): how it relates to the prompt — a learned query attends over the
  prompt tokens after one self-attention layer has made them contextual, and the token is scored
  against that query.

Shapes: U = images, N = most visual tokens of one image, L = longest prompt, D = visual width,
E = text embedding width, H = `hidden_size` of the modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class KnowingScores:
    """Per-token scores (each standardised over the image's valid tokens) and the context they came from.

    Attributes:
        information, salience, coupling: [U, N] scores (0 mean, unit spread per image; 0 on padding).
        visual: [U, N, H] projected visual tokens. query: [U, H] contextual prompt query.
        gist: [U, H] mean projected visual token of each image.
    """

    information: torch.Tensor
    salience: torch.Tensor
    coupling: torch.Tensor
    visual: torch.Tensor
    query: torch.Tensor
    gist: torch.Tensor


SPREAD_FLOOR = 1e-2  # spread below which a score is treated as flat (see standardise)


def standardise(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-spread `scores` [U, N] over each row's valid entries.

    Padding is set to 0; flat rows stay near 0.
    """
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    mean = (scores * valid).sum(-1, keepdim=True) / count
    centred = (scores - mean) * valid
    # The variance floor bounds d(out)/d(scores) by 1 / SPREAD_FLOOR: a score that is (nearly) constant over an
    # image carries no ranking, and dividing by its vanishing spread sent gradients of 1e2-1e3 into the scorer.
    spread = (centred.pow(2).sum(-1, keepdim=True) / count).add(SPREAD_FLOOR**2).sqrt()
    return centred / spread


def masked_mean(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `tokens` [U, N, H] over valid entries -> [U, H]."""
    weights = valid.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def neighbour_mean(tokens: torch.Tensor, valid: torch.Tensor, grids: list[Optional[tuple[int, int]]]) -> torch.Tensor:
    """Mean of each token's neighbours (3x3 on the grid, or previous/next in sequence), itself excluded.

    Args:
        tokens: [U, N, H]. valid: [U, N] bool (valid tokens first). grids: per image (rows, cols) or None.
    Returns:
        [U, N, H] neighbour means (0 for tokens without neighbours).
    """
    width = tokens.shape[-1]
    masked = tokens * valid[..., None]
    ones = valid.to(tokens.dtype)[..., None]
    stacked = torch.cat([masked, ones], -1)  # [U, N, H + 1]: features and a count channel
    # 1-D neighbourhood by default: window sums of 3 in sequence order.
    sums = F.pad(stacked.transpose(1, 2), (1, 1)).unfold(2, 3, 1).sum(-1).transpose(1, 2)  # [U, N, H + 1]
    for unit, grid in enumerate(grids):
        n = int(valid[unit].sum())
        if grid is None or grid[0] * grid[1] != n:
            continue
        as_map = stacked[unit, :n].T.reshape(1, width + 1, *grid)  # [1, H + 1, rows, cols]
        box = F.pad(as_map, (1, 1, 1, 1)).unfold(2, 3, 1).unfold(3, 3, 1).sum((-1, -2))  # [1, H + 1, rows, cols]
        rows = torch.full((n,), unit, device=tokens.device)
        sums = sums.index_put((rows, torch.arange(n, device=tokens.device)), box.flatten(2)[0].T)  # 3x3 window sums
    total, count = sums[..., :width] - masked, sums[..., width:] - ones  # the token itself excluded
    return total / count.clamp_min(1.0)


class Knowing(nn.Module):
    """Scores every visual token for information, salience and coupling to the prompt."""

    def __init__(self, visual_size: int, text_size: int, hidden_size: int = 64, num_heads: int = 4):
        """Args: visual_size: width D of the visual tokens (the language model's width after the
        projector); text_size: width E of the prompt embeddings; hidden_size: internal width H."""
        super().__init__()
        heads = num_heads if hidden_size % num_heads == 0 else 1
        self.hidden_size = hidden_size
        self.visual_norm = nn.LayerNorm(visual_size)
        self.visual_proj = nn.Linear(visual_size, hidden_size)
        self.information_head = nn.Linear(hidden_size, 1, bias=False)  # a bias would vanish in standardise()
        self.text_norm = nn.LayerNorm(text_size)
        self.text_proj = nn.Linear(text_size, hidden_size)
        self.text_context = nn.MultiheadAttention(hidden_size, heads, batch_first=True)
        self.prompt_query = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))
        self.prompt_pool = nn.MultiheadAttention(hidden_size, heads, batch_first=True)
        self.coupling_visual = nn.Linear(hidden_size, hidden_size, bias=False)  # same: constant per image
        self.coupling_query = nn.Linear(hidden_size, hidden_size)
        nn.init.normal_(self.information_head.weight, std=0.1 / math.sqrt(hidden_size))

    def prompt_query_vector(self, prompt: torch.Tensor, prompt_valid: torch.Tensor) -> torch.Tensor:
        """Contextual query of each image's prompt.

        Args:
            prompt: [U, L, E] prompt token embeddings. prompt_valid: [U, L] bool.
        Returns:
            [U, H]: the learned query after attending over the contextualised prompt tokens.
        """
        num_units = prompt.shape[0]
        query = self.prompt_query.expand(num_units, 1, -1)  # [U, 1, H]
        text = self.text_proj(self.text_norm(prompt))  # [U, L, H]
        # The learned query is also a key, so an image with an empty prompt still has something to read.
        tokens = torch.cat([query, text], 1)  # [U, 1 + L, H]
        padding = torch.cat([prompt_valid.new_zeros(num_units, 1), ~prompt_valid], 1)  # [U, 1 + L] True = ignore
        context, _ = self.text_context(tokens, tokens, tokens, key_padding_mask=padding, need_weights=False)
        tokens = tokens + context  # [U, 1 + L, H] contextual prompt tokens
        pooled, _ = self.prompt_pool(query, tokens, tokens, key_padding_mask=padding, need_weights=False)
        return (query + pooled)[:, 0]  # [U, H]

    def forward(
        self,
        visual: torch.Tensor,
        valid: torch.Tensor,
        prompt: torch.Tensor,
        prompt_valid: torch.Tensor,
        grids: list[Optional[tuple[int, int]]],
    ) -> KnowingScores:
        """Score the visual tokens.

        Args:
            visual: [U, N, D] visual tokens (features after the projector). valid: [U, N] bool.
            prompt: [U, L, E] prompt token embeddings. prompt_valid: [U, L] bool.
            grids: per image (rows, cols) of its token grid, or None.
        Returns:
            `KnowingScores` with the three standardised [U, N] scores.
        """
        dtype = self.visual_proj.weight.dtype
        visual, prompt = visual.to(dtype), prompt.to(dtype)
        projected = self.visual_proj(self.visual_norm(visual)) * valid[..., None]  # [U, N, H]

        # Information: log energy of the raw token (relative to its image) + a learned read-out.
        energy = visual.pow(2).mean(-1).add(1e-6).log()  # [U, N]
        information = standardise(energy, valid) + self.information_head(F.gelu(projected)).squeeze(-1)

        # Salience: contrast with the whole image and with the grid neighbours.
        unit_dir = F.normalize(projected, dim=-1)  # [U, N, H]
        gist = masked_mean(projected, valid)  # [U, H]
        global_contrast = 1.0 - (unit_dir * F.normalize(gist, dim=-1)[:, None]).sum(-1)  # [U, N]
        local = neighbour_mean(projected, valid, grids)  # [U, N, H]
        local_contrast = 1.0 - (unit_dir * F.normalize(local, dim=-1)).sum(-1)  # [U, N]
        salience = global_contrast + local_contrast

        # Query coupling: each token against the contextual prompt query.
        query = self.prompt_query_vector(prompt, prompt_valid)  # [U, H]
        coupling = (self.coupling_visual(projected) * self.coupling_query(query)[:, None]).sum(-1)  # [U, N]
        coupling = coupling / math.sqrt(self.hidden_size)

        return KnowingScores(
            information=standardise(information, valid),
            salience=standardise(salience, valid),
            coupling=standardise(coupling, valid),
            visual=projected,
            query=query,
            gist=gist,
        )
