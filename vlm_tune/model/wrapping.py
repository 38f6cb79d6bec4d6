"""What the modules that wrap a (PEFT) VLM share: they look like the wrapped model to callers.

RelevanceWrapper (vlm_tune/relevance/wrapper.py) and SoftPromptWrapper (soft_prompt.py) hold the model as
`.model`; `generate` callers read `config`, `generation_config` and `device` from them, and get back the
original prompt ids followed by the new tokens, whatever the wrapper fed the model.
"""

from __future__ import annotations

import torch
from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ModelWrapper(nn.Module):
    """A module around `model` (PEFT or transformers) that answers for it: config, generation config, device."""

    model: nn.Module

    @property
    def config(self):
        """The wrapped transformers model's config."""
        return base_model(self.model).config

    @property
    def generation_config(self):
        """The wrapped transformers model's generation config."""
        return base_model(self.model).generation_config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def with_original_prompt(output, input_ids: torch.Tensor, seen: int):
    """`generate`'s output with the caller's `input_ids` in front of the new tokens (the model saw `seen` ids).

    `output` is a tensor of sequences, or an output object whose `.sequences` are replaced.
    """
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    full = torch.cat([input_ids.to(sequences.device), sequences[:, seen:]], dim=1)
    if isinstance(output, torch.Tensor):
        return full
    output.sequences = full
    return output
