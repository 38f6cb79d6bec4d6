"""mllama's vision encoders keep only the layer outputs the model reads (`speed.vision_states: needed`).

transformers' `MllamaVisionEncoder` collects every layer's output in a tuple and returns it with the last one;
the vision model reads five of the 32 local layers' outputs (`intermediate_layers_indices`) and none of the 8
global layers'. With the tower frozen (it runs without an autograd graph), that tuple is the only reference to
the other outputs, so all 40 stay alive until the tower returns. Under CUDA autocast the tower's residual stream
is fp32 (layer_norm computes in fp32), so each output is batch x tiles x 1032 x 1280 x 4 bytes: 79 MiB for
Llama-3.2-11B-Vision at batch 4 with 4 tiles of 448 px, 3.1 GiB for the 40 layers, 2.6 GiB for the 34 that are
not read. The tower's forward was the peak of a bf16 LoRA step: 4.6 GiB above the weights, 2.0 GiB with this
patch (benchmarks/mllama_memory.py has the accounting).

Here each encoder's forward keeps the outputs at the indices its vision model reads and None at the others. The
layers run as before, so the features, the loss and the gradients are the same. A tower that trains keeps the
outputs for its backward anyway; then nothing changes but the tuple.

The patch replaces the `forward` of the two encoder instances of each mllama vision model; `remove()` undoes it.
"""

from __future__ import annotations

import types

from torch import nn

from vlm_tune.model.patches import ForwardRestorer
from vlm_tune.model.wrapping import base_model

VISION_MODEL_CLASS = "MllamaVisionModel"


def _forward_keeping(encoder: nn.Module, hidden_states, attention_mask=None, **kwargs):
    """The encoder's forward (each layer on the previous one's output), keeping the outputs of `_kept` only."""
    from transformers.modeling_outputs import BaseModelOutput

    kept = []
    for index, layer in enumerate(encoder.layers):
        output = layer(hidden_states, attention_mask=attention_mask)  # positional: the name differs by version
        hidden_states = output[0] if isinstance(output, tuple) else output
        kept.append(hidden_states if index in encoder._kept else None)
    return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=tuple(kept))


class NeededVisionStates:
    """What `keep_needed_vision_states` installed; `remove()` gives each encoder its forward back."""

    def __init__(self, restorers: list[tuple[nn.Module, ForwardRestorer]]):
        self.restorers = restorers

    def remove(self) -> None:
        for encoder, restorer in self.restorers:
            restorer.remove()
            encoder.__dict__.pop("_kept", None)
        self.restorers = []


def _patch(encoder: nn.Module, kept: set[int]) -> ForwardRestorer:
    restorer = ForwardRestorer(encoder, encoder.__dict__.get("forward"))
    encoder._kept = frozenset(kept)
    encoder.forward = types.MethodType(_forward_keeping, encoder)
    return restorer


def keep_needed_vision_states(model: nn.Module) -> NeededVisionStates:
    """Patch every mllama vision model in `model` (under any wrapper) so its encoders keep only what it reads.

    The local encoder (`transformer`) keeps the layers of `intermediate_layers_indices`, the global encoder none.
    Returns:
        The handle (`remove()` undoes the patch).
    Raises:
        ValueError: the model has no mllama vision model.
    """
    restorers = []
    for module in base_model(model).modules():
        if type(module).__name__ != VISION_MODEL_CLASS:
            continue
        local, global_ = module.transformer, module.global_transformer
        count = len(local.layers)
        needed = {index % count for index in module.intermediate_layers_indices}
        restorers += [(local, _patch(local, needed)), (global_, _patch(global_, set()))]
    if not restorers:
        raise ValueError(f"vision states: {type(base_model(model)).__name__} has no mllama vision model")
    return NeededVisionStates(restorers)
