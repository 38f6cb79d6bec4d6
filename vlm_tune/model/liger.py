"""liger-kernel's Triton kernels in the language decoder (`speed.liger_kernel`), on one model instance.

The decoder's RMSNorms run liger's fused norm, its gated MLPs liger's fused activation-times-up product (SwiGLU,
or GeGLU on Gemma), and its attention layers liger's rotary embedding, each in forward and backward. The MLP keeps
calling its own `gate_proj`, `up_proj` and `down_proj`, so LoRA layers wrapping them still run. Not patched: the
vision tower, the projector, mllama's cross-attention layers, and the loss (`speed.loss: chunked` already skips
the full-vocabulary logits that liger's fused linear cross-entropy avoids).

liger's `apply_liger_kernel_to_<family>(model=...)` also replaces transformers' classes and functions for the
whole process, which no handle can undo, so each module instance gets its own `forward` here, calling liger's
public functions; `remove()` gives every module its forward back. RoPE is a module-level function of each
modeling file (`apply_rotary_pos_emb`): a patched attention layer reads liger's in its place only during its own
call (recomputed checkpointed layers included), and the name is restored when the call ends, however it ends (a
model of the same family run by another thread during that call would read it too; training runs one at a time).
Qwen2-VL / Qwen2.5-VL: transformers (5.17 and later) composes the 3D rotary sections into cos / sin before the
attention, which then applies a plain rotary embedding, so liger's plain RoPE kernel serves there (its M-RoPE
patch names a function these versions no longer call).

Triton kernels need a CUDA GPU; tests/model/test_liger.py checks the wiring on the CPU with reference functions
in place of the kernels, and the kernels' loss and gradients on a GPU.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from vlm_tune.model.components import ComponentMap
from vlm_tune.model.patches import ForwardRestorer
from vlm_tune.model.targeting import base_name
from vlm_tune.model.wrapping import base_model

logger = logging.getLogger(__name__)

FAMILIES = ("llava", "llava_next", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "mllama", "paligemma", "gemma3")
ROPE = "apply_rotary_pos_emb"  # the name each modeling file's attention forward calls


@dataclass(frozen=True)
class NormKind:
    """How liger's RMSNorm reproduces a decoder's norm: weight offset, casting mode, and whether its backward may
    write the input gradient into the output gradient (liger's settings for the family)."""

    offset: float
    casting_mode: str
    in_place: bool


_LLAMA = NormKind(0.0, "llama", True)  # x normalized in fp32, cast to the input's dtype, times the weight
_GEMMA = NormKind(1.0, "gemma", True)  # everything in fp32, times (1 + weight)
_GEMMA_CHAINED = NormKind(1.0, "gemma", False)  # Gemma 2 / 3: norms before and after each block share gradients
DECODERS = {  # the language decoder's model_type -> its norms
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen2_vl_text": _LLAMA,
    "qwen2_5_vl_text": _LLAMA,
    "mllama_text_model": _LLAMA,
    "gemma": _GEMMA,
    "gemma2": _GEMMA_CHAINED,
    "gemma3_text": _GEMMA_CHAINED,
}


def liger_functions() -> SimpleNamespace:
    """liger-kernel's functions the patched forwards call (rms_norm, swiglu, geglu, rope).

    Raises:
        SpeedError: liger-kernel is not installed.
    """
    from vlm_tune.model.speed import SpeedError

    try:
        from liger_kernel.transformers.functional import liger_geglu, liger_rms_norm, liger_swiglu
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        raise SpeedError(
            "speed.liger_kernel needs liger-kernel (pip install liger-kernel), or set speed.liger_kernel: false"
        ) from None
    return SimpleNamespace(rms_norm=liger_rms_norm, swiglu=liger_swiglu, geglu=liger_geglu, rope=liger_rotary_pos_emb)


def _norm_forward(norm: nn.Module, kind: NormKind, kernels: SimpleNamespace):
    eps = getattr(norm, "variance_epsilon", None) or norm.eps

    def forward(hidden_states):
        weight = norm.weight
        # fp32 weights (4-bit components' stabilized norms, fp32 models): computed in fp32 throughout, as they were
        casting = "gemma" if weight.dtype == torch.float32 else kind.casting_mode
        return kernels.rms_norm(hidden_states, weight, eps, kind.offset, casting, kind.in_place)

    return forward


def _mlp_forward(mlp: nn.Module, gated):
    def forward(x):
        return mlp.down_proj(gated(mlp.gate_proj(x), mlp.up_proj(x)))

    return forward


def _rope_forward(forward, namespace: dict, rope):
    """The attention layer's forward with liger's RoPE under the modeling file's name for the length of the call."""

    @functools.wraps(forward)
    def call(*args, **kwargs):
        own = namespace[ROPE]
        namespace[ROPE] = rope
        try:
            return forward(*args, **kwargs)
        finally:
            namespace[ROPE] = own

    return call


def _gated(mlp: nn.Module, kernels: SimpleNamespace):
    """liger's fused product for the MLP's activation, or None (an activation liger has no kernel for)."""
    from transformers.activations import GELUTanh, SiLUActivation

    act = getattr(mlp, "act_fn", None)
    if isinstance(act, (SiLUActivation, nn.SiLU)):
        return kernels.swiglu
    if isinstance(act, GELUTanh):
        return kernels.geglu
    return None


def _rope_namespace(attention: nn.Module):
    """The globals the attention's forward reads `apply_rotary_pos_emb` from, or None when it calls no such name."""
    function = inspect.unwrap(type(attention).forward)
    has_rope = ROPE in function.__code__.co_names and ROPE in function.__globals__
    return function.__globals__ if has_rope else None


class LigerKernels:
    """What `install_liger_kernels` patched, counted per kind; `remove()` gives each module its forward back."""

    def __init__(self):
        self.restorers: list[ForwardRestorer] = []
        self.counts = {"rms_norm": 0, "mlp": 0, "rope": 0}

    def patch(self, module: nn.Module, kind: str, forward) -> None:
        self.restorers.append(ForwardRestorer(module, module.__dict__.get("forward")))
        module.forward = forward
        self.counts[kind] += 1

    def remove(self) -> None:
        for restorer in reversed(self.restorers):
            restorer.remove()
        self.restorers = []


def _decoder_modules(model: nn.Module, cmap: ComponentMap) -> list[nn.Module]:
    """The modules of the language component (PEFT's copies and originals included), in model order."""
    return [module for name, module in model.named_modules() if cmap.component_of(base_name(name)) == "language"]


def install_liger_kernels(model: nn.Module, cmap: ComponentMap) -> LigerKernels:
    """Patch the language decoder's RMSNorms, gated MLPs and RoPE of this model instance with liger's kernels.

    Args:
        model: the targeted (PEFT) model; cmap: its components (the language component is patched).
    Returns:
        The handle (`remove()` restores every patched forward).
    Raises:
        SpeedError: no CUDA device, liger-kernel not installed, or a family / decoder it is not checked on.
    """
    from vlm_tune.model.speed import SpeedError, refuse_other_families

    if not torch.cuda.is_available():
        raise SpeedError("speed.liger_kernel runs Triton kernels on a CUDA GPU; set speed.liger_kernel: false on CPU")
    refuse_other_families(cmap.model_type, FAMILIES, "speed.liger_kernel", "false")
    decoder = base_model(model).config.get_text_config().model_type
    if decoder not in DECODERS:
        raise SpeedError(
            f"speed.liger_kernel is not checked on a {decoder} language decoder (valid: {', '.join(DECODERS)}); "
            "set speed.liger_kernel: false"
        )
    kernels = liger_functions()
    handle = LigerKernels()  # per instance: liger's apply_liger_kernel_to_* (model=...) also swaps classes process-wide
    for module in _decoder_modules(model, cmap):
        if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
            handle.patch(module, "rms_norm", _norm_forward(module, DECODERS[decoder], kernels))
        elif all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
            gated = _gated(module, kernels)
            if gated is not None:
                handle.patch(module, "mlp", _mlp_forward(module, gated))
        elif hasattr(module, "q_proj") and (namespace := _rope_namespace(module)) is not None:
            handle.patch(module, "rope", _rope_forward(module.forward, namespace, kernels.rope))
    logger.info("liger-kernel in the language decoder: %s", handle.counts)
    return handle
