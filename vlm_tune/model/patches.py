"""Every runtime patch the toolkit applies to a transformers model, in one place.

Each patch changes how a module instance runs (never its weights or its class), says why, and says how it
is undone. Who applies them:
    run_without_grad, require_grad_on_output   targeting.py (frozen parts, trainable parts after them)
    compute_in_fp32                            load.py (norms of 4-bit components)
    no_cpu_4bit_repacking                      load.py (4-bit layers narrower than a quantization block)
    embeds_at_prefill                          relevance/integrate.py (families whose generate refuses embeds)
    mllama_cross_attention_per_token           relevance/cross_attention.py (mllama with selected tokens)
    virtual_token_embeddings                   model/soft_prompt.py (prompt tuning)
    attend_to_prefix                           model/soft_prompt.py (prefix tuning)
"""

from __future__ import annotations

import contextlib
import sys
import types

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


def _fp32_forward(norm: nn.Module, hidden, *args, **kwargs):
    """The norm's class forward on an fp32 copy of its input, its output cast back to the input's dtype."""
    forward = type(norm).forward
    if not (isinstance(hidden, torch.Tensor) and hidden.is_floating_point()):
        return forward(norm, hidden, *args, **kwargs)
    output = forward(norm, hidden.float(), *args, **kwargs)
    if isinstance(output, torch.Tensor) and output.dtype != hidden.dtype:
        return output.to(hidden.dtype)
    return output


class ForwardRestorer:
    """Undoes an instance `forward` patch: the forward it replaced (the class's, or an earlier patch) shows again."""

    def __init__(self, module: nn.Module, previous):
        self.module, self.previous = module, previous

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)
        if self.previous is not None:
            self.module.forward = self.previous


def compute_in_fp32(norm: nn.Module) -> ForwardRestorer:
    """Let a norm keep fp32 weights and compute in fp32, returning its input's dtype.

    Patches: the norm's weights become fp32 (`norm.float()`); the instance's `forward` (one shared function bound
    to the norm) casts its input to fp32 and its output back to the input's dtype, so the residual stream keeps its
    16-bit dtype. No state is kept between calls and every norm shares the function: torch.compile then traces a
    layer once for all layers (hooks passing the dtype through a module attribute break its graph).
    Why: norms of 4-bit components are unstable in 16 bit; upcasting every non-quantized weight (what
    `peft.prepare_model_for_kbit_training` does) would upcast a whole 16-bit vision tower instead.
    Undone by: `.remove()` on the returned handle (the weights stay fp32).
    """
    norm.float()
    previous = norm.__dict__.get("forward")
    norm.forward = types.MethodType(_fp32_forward, norm)
    return ForwardRestorer(norm, previous)


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


@contextlib.contextmanager
def virtual_token_embeddings(embedding: nn.Module, virtual: torch.Tensor, values: torch.Tensor):
    """Within the block, the input embedding's output at the virtual-token positions is `values`.

    Patches: a forward hook on the model's input embedding module replaces its output [B, T, D] where
    `virtual` [B, T] is True by `values` [B, T, D], in the call whose output has that shape (beam search's
    larger batch gets both repeated); decoding steps (shorter inputs) pass.
    Why: prompt tuning puts placeholder ids into `input_ids`, so the model itself still finds its image
    tokens, positions (M-RoPE) and masks from them; only the placeholders' embeddings are trained vectors.
    Undone by: leaving the block (the hook is removed however it ends).
    """

    def replace(module, args, output):
        if output.dim() != 3 or output.shape[1] != virtual.shape[1]:  # a decoding step
            return output
        repeat = output.shape[0] // virtual.shape[0]
        mask = virtual.repeat_interleave(repeat, dim=0)[..., None]  # [B, T, 1]
        return torch.where(mask, values.repeat_interleave(repeat, dim=0).to(output.dtype), output)

    handle = embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


PREFIX_ATTENTION = {"sdpa": "vlm_tune_prefix_sdpa", "eager": "vlm_tune_prefix_eager"}


def _with_prefix_columns(mask, query: torch.Tensor, key_length: int, prefix: int, additive: bool):
    """The attention mask [B|1, H|1, q, kv] with `prefix` always-visible key columns in front."""
    if mask is None:
        q_length = query.shape[2]
        if q_length == 1:
            return None  # one query (decoding) sees every key, prefix included
        offset = key_length - q_length  # queries are the last q positions of the keys (a cache before them)
        mask = torch.ones(q_length, key_length, dtype=torch.bool, device=query.device).tril(offset)[None, None]
        if additive:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
    visible = True if mask.dtype == torch.bool else 0.0
    columns = torch.full((*mask.shape[:-1], prefix), visible, dtype=mask.dtype, device=mask.device)
    return torch.cat([columns, mask], dim=-1)


def _prefix_attention(inner: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if inner == "eager":  # each modeling file has its own eager function (transformers' convention)
            forward = sys.modules[type(module).__module__].eager_attention_forward
        else:
            forward = ALL_ATTENTION_FUNCTIONS[inner]
        source = getattr(module, "_vlm_tune_prefix", None)
        if source is None:  # cross-attention of mllama, or a layer without prefix
            return forward(module, query, key, value, attention_mask, **kwargs)
        prefix_keys, prefix_values = source()  # [H_kv, P, hd] each
        batch = key.shape[0]
        mask = _with_prefix_columns(attention_mask, query, key.shape[2], prefix_keys.shape[1], inner == "eager")
        key = torch.cat([prefix_keys.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)  # [B, H_kv, P+kv, hd]
        value = torch.cat([prefix_values.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
        kwargs.pop("is_causal", None)
        return forward(module, query, key, value, mask, **kwargs)

    return attention


def attend_to_prefix(attention_modules: list[nn.Module], sources: list) -> str:
    """Let each self-attention module attend to prefix keys and values in front of its own.

    Args:
        attention_modules: the decoder's self-attention modules (they share one text config).
        sources: per module, a callable returning its (keys, values) [H_kv, P, head_dim] (trained parameters).
    Returns:
        The attention implementation name now set on the modules' config.
    Patches: the text config's `_attn_implementation` becomes a registered function that puts the module's
    prefix keys / values before its keys / values and always-visible columns before the mask, then runs the
    original sdpa or eager attention (modules without a source, e.g. mllama's cross-attention, run it as is);
    the mask function registered under that name is the original one's. The vision tower's config is untouched.
    Why: prefix tuning without a pre-filled KV cache, so positions (M-RoPE), gradient checkpointing (which drops
    caches) and generation's cache work unchanged; the prefix carries no position.
    Undone by: setting the config's `_attn_implementation` back and deleting `module._vlm_tune_prefix`; nothing in
    the toolkit undoes it (the wrapped model keeps its prefix).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = attention_modules[0].config
    inner = config._attn_implementation
    if inner in PREFIX_ATTENTION.values():
        inner = next(name for name, patched in PREFIX_ATTENTION.items() if patched == inner)
    name = PREFIX_ATTENTION[inner]
    AttentionInterface.register(name, _prefix_attention(inner))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    for module, source in zip(attention_modules, sources):
        object.__setattr__(module, "_vlm_tune_prefix", source)  # a plain attribute, not a submodule
    config._attn_implementation = name
    return name
