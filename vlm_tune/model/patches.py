"""Every runtime patch the toolkit applies to a transformers model, in one place.

Each patch changes how a module instance runs (never its weights or its class), says why, and says how it
is undone. Who applies them:
    run_without_grad, require_grad_on_output   targeting.py (frozen parts, trainable parts after them)
    compute_in_fp32                            load.py (norms of 4-bit components)
    no_cpu_4bit_repacking                      load.py (4-bit layers narrower than a quantization block)
    embeds_at_prefill                          relevance/integrate.py (families whose generate refuses embeds)
    mllama_cross_attention_per_token           relevance/cross_attention.py (mllama with selected tokens)
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def run_without_grad(module: nn.Module) -> None:
    """Make a frozen module's forward build no autograd graph.

    Patches: the instance's `forward` becomes `torch.no_grad()(forward)` (applied once; exception-safe, as
    `no_grad` restores the grad mode however the call ends).
    Why: a frozen vision tower (and a frozen projector after it) would otherwise keep every activation for a
    backward pass that never reaches it.
    Undone by: `del module.forward` (the class's forward shows again); nothing in the toolkit undoes it, since a
    module frozen by targeting stays frozen.
    """
    if getattr(module, "_vlm_tune_no_grad", False):
        return
    module.forward = torch.no_grad()(module.forward)
    module._vlm_tune_no_grad = True


def _output_requires_grad(module: nn.Module, inputs, output):
    if isinstance(output, torch.Tensor) and torch.is_grad_enabled() and output.is_floating_point():
        output.requires_grad_(True)


def require_grad_on_output(module: nn.Module) -> RemovableHandle:
    """Mark the module's output as requiring grad (a forward hook).

    Patches: the output tensor of `module` (a patch embedding or the text embeddings, both frozen) gets
    `requires_grad=True` when grad is enabled.
    Why: with gradient checkpointing, a checkpointed block whose inputs need no grad passes no gradient to the
    LoRA layers inside it; a frozen embedding's output would be such an input.
    Undone by: `.remove()` on the returned handle.
    """
    return module.register_forward_hook(_output_requires_grad)


def _input_to_fp32(module: nn.Module, args):
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        module._vlm_tune_input_dtype = args[0].dtype
        return (args[0].float(), *args[1:])
    return None


def _output_to_input_dtype(module: nn.Module, args, output):
    dtype = getattr(module, "_vlm_tune_input_dtype", None)
    if isinstance(output, torch.Tensor) and dtype is not None and output.dtype != dtype:
        return output.to(dtype)
    return None


def compute_in_fp32(norm: nn.Module) -> tuple[RemovableHandle, RemovableHandle]:
    """Let a norm keep fp32 weights and compute in fp32, returning its input's dtype.

    Patches: the norm's weights become fp32 (`norm.float()`); a forward pre-hook casts its input to fp32 and a
    forward hook casts the output back to the input's dtype, so the residual stream keeps its 16-bit dtype.
    Why: norms of 4-bit components are unstable in 16 bit; upcasting every non-quantized weight (what
    `peft.prepare_model_for_kbit_training` does) would upcast a whole 16-bit vision tower instead.
    Undone by: `.remove()` on both returned handles (the weights stay fp32).
    """
    norm.float()
    return norm.register_forward_pre_hook(_input_to_fp32), norm.register_forward_hook(_output_to_input_dtype)


CPU_PACK_BLOCK_N = 32  # output rows per block of bitsandbytes' CPU packing


def no_cpu_4bit_repacking(model: nn.Module) -> int:
    """Keep 4-bit layers whose shape bitsandbytes' CPU inference packing cannot take on the general path.

    Patches: `support_avx512bf16_for_cpu = False` on each bitsandbytes `Linear4bit` whose input width is not a
    multiple of its quantization block (or whose output width is not a multiple of 32).
    Why: in eval mode on an AVX512-BF16 CPU, bitsandbytes (0.50) repacks the 4-bit weight at the first call and
    fails on such layers (their absmax is reshaped to [N, K // blocksize] = [N, 0]): no tiny test model, and no
    model with a narrow layer, could generate on the CPU in 4 bit.
    Undone by: setting the attribute back to `bitsandbytes.functional.has_avx512bf16()`.
    Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        rows, width = state.shape[0], state.shape[-1]
        if width % state.blocksize or rows % CPU_PACK_BLOCK_N:
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


@contextlib.contextmanager
def embeds_at_prefill(base_model: nn.Module, inputs_embeds: torch.Tensor):
    """Within the block, the prefill call of `generate` reads `inputs_embeds` [B, L, D] instead of its input ids.

    Patches: a forward pre-hook on `base_model` swaps `input_ids` for `inputs_embeds` in the call whose input ids
    are as long as the prompt (beam search's larger batch gets the embeddings repeated); decoding steps pass.
    Why: some families' `generate` (Gemma 3, PaliGemma) refuses `inputs_embeds`, and relevance hands the language
    model a shortened sequence that exists only as embeddings.
    Undone by: leaving the block (the hook is removed however it ends).
    """
    prompt_length = inputs_embeds.shape[1]

    def inject(module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] != prompt_length:  # a decoding step
            return args, kwargs
        repeat = input_ids.shape[0] // inputs_embeds.shape[0]  # beam search expands the batch
        kwargs.update(input_ids=None, inputs_embeds=inputs_embeds.repeat_interleave(repeat, dim=0))
        return args, kwargs

    handle = base_model.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def mllama_cross_attention_per_token(base_model: nn.Module, cross_states: torch.Tensor):
    """Within the block, mllama reads one cross-attention mask column per key and (in generate) our keys.

    Patches: `vision_model.num_patches` of the inner model is 1 (the model expands each tile's mask column that
    many times; a mask built per kept token [B, T, S, 1] already has one column per key), and a forward pre-hook
    on the inner model replaces `pixel_values` by `cross_attention_states` [B, S, D] (generate drops pixel values
    after prefill, so it is the call that has them that gets our states).
    Why: relevance gives mllama's cross-attention layers only the kept visual tokens.
    Undone by: leaving the block (num_patches is restored and the hook removed however it ends).
    """
    inner = base_model.model
    saved = inner.vision_model.num_patches

    def inject(module, args, kwargs):
        if kwargs.get("pixel_values") is None:
            return args, kwargs
        text = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        repeat = text.shape[0] // cross_states.shape[0]  # beam search expands the batch
        kwargs.update(
            pixel_values=None,
            aspect_ratio_ids=None,
            aspect_ratio_mask=None,
            cross_attention_states=cross_states.repeat_interleave(repeat, dim=0),
        )
        return args, kwargs

    handle = inner.register_forward_pre_hook(inject, with_kwargs=True)
    inner.vision_model.num_patches = 1
    try:
        yield
    finally:
        inner.vision_model.num_patches = saved
        handle.remove()
