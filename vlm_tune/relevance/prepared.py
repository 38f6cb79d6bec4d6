"""What every wiring (placeholder families in integrate.py, cross-attention families in cross_attention.py) shares:
the selection function it is given and the inputs it prepares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlm_tune.relevance.attending import Selection
from vlm_tune.relevance.sequence import VisualTokens

# select(visual tokens, prompt [U, L, E], prompt_valid [U, L]) -> Selection
SelectFn = Callable[[VisualTokens, torch.Tensor, torch.Tensor], Selection]


@dataclass
class PreparedInputs:
    """What the wrapped model is called with after selection.

    Attributes:
        model_inputs: keyword arguments for the wrapped model's `forward` / `generate`.
        selection: the selection that was applied (for inspection and tests).
        unit_sample: [U] the sample of each selected image.
        context: a context manager the call must run inside (a patch from vlm_tune.model.patches), or a null one.
    """

    model_inputs: dict
    selection: Selection
    unit_sample: torch.Tensor
    context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
