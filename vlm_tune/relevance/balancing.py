"""Balancing: a learned, query-conditioned combination of the three knowing scores into one relevance.

The combination is shaped as three opponent pairs, each a weight w in (0, 1) and its complement 1 - w,
chosen per image from the prompt query and the image's gist:

- compress vs particularize: dense, high-information tokens (compress: keep what carries the most)
  against tokens that stand out from the image and their neighbours (particularize: keep the specific);
- exploit vs explore: what the prompt asks for (query coupling) against the bottom-up mix above;
- focus vs diversify: that ranking as it is, against novelty — how unlike a token is to the tokens
  ranked above it — so the budget is not spent on near-duplicates.

The per-image weights of the last call are kept in `last_weights` for inspection.

Shapes: U = images, N = most visual tokens of one image, H = hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm_tune.relevance.knowing import KnowingScores, standardise

# Opponent pairs, in the order of the balancing network's outputs; the first pole gets weight w.
OPPONENT_PAIRS = (("compress", "particularize"), ("exploit", "explore"), ("focus", "diversify"))
# Starting balance of each pair (logit of w): even, leaning to bottom-up while the coupling is
# untrained, and leaning to focus.
_INITIAL_LOGITS = (0.0, -1.0, 1.0)


def novelty(visual: torch.Tensor, ranking: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """How unlike each token is to the most similar token ranked above it.

    Args:
        visual: [U, N, H] token features. ranking: [U, N] scores (compared without gradient).
        valid: [U, N] bool.
    Returns:
        [U, N] novelty = 1 - max cosine similarity to a higher-ranked valid token (1 for the top token).
    """
    unit_dir = F.normalize(visual, dim=-1)
    similarity = unit_dir @ unit_dir.transpose(1, 2)  # [U, N, N]
    ranked = ranking.detach().masked_fill(~valid, float("-inf"))
    above = (ranked[:, None, :] > ranked[:, :, None]) & valid[:, None, :]  # [U, N(i), N(j)]: j ranked above i
    redundancy = similarity.masked_fill(~above, -2.0).amax(-1)  # [U, N]
    redundancy = torch.where(redundancy < -1.5, torch.zeros_like(redundancy), redundancy)
    return 1.0 - redundancy


class Balancing(nn.Module):
    """Per-image opponent-pair weights from the prompt query and image gist, and the relevance they give."""

    def __init__(self, hidden_size: int = 64):
        """Args: hidden_size: width H of the knowing module's query and gist."""
        super().__init__()
        self.context = nn.Sequential(
            nn.LayerNorm(2 * hidden_size),
            nn.Linear(2 * hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, len(OPPONENT_PAIRS)),
        )
        nn.init.normal_(self.context[-1].weight, std=0.01)
        with torch.no_grad():
            self.context[-1].bias.copy_(torch.tensor(_INITIAL_LOGITS))
        self.last_weights: dict[str, torch.Tensor] = {}

    def pair_weights(self, scores: KnowingScores) -> torch.Tensor:
        """Weight of the first pole of each opponent pair, per image: [U, 3] in (0, 1)."""
        context = torch.cat([scores.query, scores.gist], -1)  # [U, 2H]
        return torch.sigmoid(self.context(context))  # [U, 3]

    def forward(self, scores: KnowingScores, valid: torch.Tensor) -> torch.Tensor:
        """Combine the knowing scores into one relevance per token.

        Args:
            scores: the knowing scores of U images. valid: [U, N] bool.
        Returns:
            [U, N] relevance (standardised per image; padding 0).
        """
        weights = self.pair_weights(scores)  # [U, 3]
        compress, exploit, focus = (weights[:, i : i + 1] for i in range(len(OPPONENT_PAIRS)))  # each [U, 1]
        bottom_up = compress * scores.information + (1 - compress) * scores.salience  # [U, N]
        ranking = exploit * scores.coupling + (1 - exploit) * standardise(bottom_up, valid)  # [U, N]
        ranking = standardise(ranking, valid)
        novel = standardise(novelty(scores.visual, ranking, valid), valid)  # [U, N]
        relevance = focus * ranking + (1 - focus) * novel
        self.last_weights = {
            name: (weight if first else 1 - weight).detach().squeeze(-1)
            for (first_name, second_name), weight in zip(OPPONENT_PAIRS, (compress, exploit, focus))
            for name, first in ((first_name, True), (second_name, False))
        }
        return standardise(relevance, valid)
