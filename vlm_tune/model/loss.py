"""Chunked cross-entropy: the loss over the label positions only, without full-vocabulary logits.

The model's own loss computes logits [B, T, V] for every position (V = 128k-152k) and upcasts them to
float32, although only the caption positions carry labels. `install_chunked_loss` makes the model's forward
stop at the hidden states when labels are given, and computes the loss from the label positions' hidden states,
a chunk of rows at a time; each chunk's logits are recomputed in backward instead of being kept. The loss is
the same (mean over label tokens, one-token shift); `output.logits` is None on such calls.

The patch is a pair of forward hooks on the transformers model (under any PEFT wrapper): the pre-hook takes the
labels out of the call and swaps the output head for a module that keeps its input; the post-hook (run even when
the forward raises) puts the head back and sets `output.loss`. `handle.remove()` undoes it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm_tune.constants import IGNORE_INDEX
from vlm_tune.model.wrapping import base_model


def _chunk_loss_sum(head: nn.Module, softcap: Optional[float], hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden).float()  # [n, V]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, columns, targets) of the positions whose shifted label is not -100, each [N].

    Finding them reads the labels on the host (a `nonzero`), so the chunked loss does it before the forward: on
    a GPU that read waits for every kernel launched before it.
    """
    targets = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    rows, columns = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)  # [N], [N]
    return rows, columns, targets[rows, columns]


def label_positions_loss(
    hidden: torch.Tensor,
    labels: Optional[torch.Tensor],
    head: nn.Module,
    chunk_tokens: int = 1024,
    softcap: Optional[float] = None,
    positions: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose (shifted) label is not -100.

    Args:
        hidden: [B, T, D] last hidden states (the output head's input).
        labels: [B, T] token ids, -100 where no loss is taken (the model's `labels`, not yet shifted).
        head: the output head (any module mapping [n, D] to [n, V], LoRA-wrapped or not).
        chunk_tokens: label positions per chunk; only one chunk's logits exist at a time.
        softcap: the model's final logit soft-capping (Gemma), if any.
        positions: `label_positions(labels)`, found earlier; then `labels` is not read.
    Returns:
        The loss (float32 scalar); 0 with a graph when no position carries a label.
    """
    rows, columns, targets = positions if positions is not None else label_positions(labels)
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    picked = hidden[rows.to(hidden.device), columns.to(hidden.device)]  # [N, D]; integer indices: no host read
    targets = targets.to(hidden.device)
    chunk_sum = functools.partial(_chunk_loss_sum, head, softcap)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        part = (picked[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        total = total + (
            checkpoint(chunk_sum, *part, use_reentrant=False) if torch.is_grad_enabled() else chunk_sum(*part)
        )
    return total / targets.numel()


class _KeepHidden(nn.Module):
    """Stands in for the output head during one forward: keeps its input, returns a [.., 1] placeholder."""

    def __init__(self):
        super().__init__()
        self.hidden: Optional[torch.Tensor] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden_states
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 1)


@dataclass
class _Call:
    positions: Optional[tuple] = None  # label_positions of the call under way; None: no labels given
    keeper: _KeepHidden = field(default_factory=_KeepHidden)


def _owner_of(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    for name, candidate in model.named_modules():
        if candidate is module and name:
            parent, _, attr = name.rpartition(".")
            return (model.get_submodule(parent) if parent else model), attr
    raise ValueError(f"{type(model).__name__}: the output head is not a submodule of the model")


class ChunkedLossHandle:
    """The installed patch; `remove()` restores the model's own loss."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def install_chunked_loss(model: nn.Module, chunk_tokens: int = 1024) -> ChunkedLossHandle:
    """Make every forward of `model` that is given `labels` compute the loss by `label_positions_loss`.

    Args:
        model: a transformers VLM with an output head (`get_output_embeddings()`), or a PEFT model around one.
        chunk_tokens: label positions per chunk.
    Returns:
        A handle whose `remove()` undoes the patch.
    Raises:
        ValueError: the model has no output head.
    """
    base = base_model(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output head; the chunked loss needs one")
    parent, attr = _owner_of(base, head)
    text_config = getattr(base.config, "text_config", None) or base.config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    call = _Call()

    def before(module, args, kwargs):
        if kwargs.get("labels") is None:
            return None
        call.positions = label_positions(kwargs.pop("labels"))  # before the forward's kernels: the read waits for none
        setattr(parent, attr, call.keeper)
        return args, kwargs

    def after(module, args, kwargs, output):
        if call.positions is None:
            return None
        positions, call.positions = call.positions, None
        setattr(parent, attr, head)
        hidden, call.keeper.hidden = call.keeper.hidden, None
        if hidden is None or output is None:  # the forward raised; the head is back in place
            return None
        output.loss = label_positions_loss(hidden, None, head, chunk_tokens, softcap, positions=positions)
        output.logits = None
        return output

    handles = [
        base.register_forward_pre_hook(before, with_kwargs=True),
        base.register_forward_hook(after, with_kwargs=True, always_call=True),
    ]
    return ChunkedLossHandle(handles)
