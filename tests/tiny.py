"""Tiny random vision-language models for tests, built from real transformers configs.

Every architecture here is a real transformers model class at toy size (hidden 32,
1-2 layers, 32-56 px images, float32, a few hundred K parameters), so tests exercise
the real module tree, forward and generate code paths without any download.

Public API:
    TINY_ARCHS                      names accepted below
    tiny_model(arch, seed=0)        fresh random model
    SPECIAL_TOKENS[arch]            the family's special tokens; a token's id is its index
"""

from __future__ import annotations

import copy
import functools

import torch
import transformers as tf

# Size of the byte-level BPE part of every tiny vocabulary (256 byte symbols + merges);
# special tokens come first (ids 0..k-1), so model vocab = len(specials) + BPE_VOCAB_SIZE.
BPE_VOCAB_SIZE = 512
HIDDEN = 32
INTERMEDIATE = 64

_LLAMA2_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
_IDEFICS3_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>",
    "<fake_token_around_image>", "<image>", "<global-img>",
] + [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
_MLLAMA_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
_PALIGEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"] + [
    f"<loc{i:0>4}>" for i in range(1024)
] + [f"<seg{i:0>3}>" for i in range(128)]
_OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
_GEMMA3_SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]

# arch -> the family's special tokens, in id order (token id == list index).
SPECIAL_TOKENS: dict[str, list[str]] = {
    "llava": _LLAMA2_SPECIALS,
    "llava_next": _LLAMA2_SPECIALS,
    "idefics3": _IDEFICS3_SPECIALS,
    "qwen2_vl": _QWEN_SPECIALS,
    "qwen2_5_vl": _QWEN_SPECIALS,
    "mllama": _MLLAMA_SPECIALS,
    "paligemma": _PALIGEMMA_SPECIALS,
    "blip2": _OPT_SPECIALS,
    "gemma3": _GEMMA3_SPECIALS,
}


def token_id(arch: str, token: str) -> int:
    """Id of a special token in the tiny tokenizer of `arch` (its index in SPECIAL_TOKENS)."""
    return SPECIAL_TOKENS[arch].index(token)


def vocab_size(arch: str) -> int:
    """Model vocabulary size of `arch`: special tokens plus the byte-level BPE part."""
    return len(SPECIAL_TOKENS[arch]) + BPE_VOCAB_SIZE


def _decoder_kwargs(arch: str) -> dict:
    """Shared tiny decoder sizes (2 layers, hidden 32, 2 heads, 1 kv head)."""
    return dict(
        vocab_size=vocab_size(arch), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=512,
    )


def _vit_kwargs(image_size: int, patch_size: int) -> dict:
    """Shared tiny ViT sizes for CLIP / SigLIP / Idefics3 / BLIP vision towers."""
    return dict(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size,
    )


def _llama_ids(arch: str) -> dict:
    return dict(bos_token_id=token_id(arch, "<s>"), eos_token_id=token_id(arch, "</s>"),
                pad_token_id=token_id(arch, "<pad>"))


# --- one builder per arch: returns the model (random weights) ---------------------------

def _build_llava() -> torch.nn.Module:
    # 32 px image, 8 px patches -> 16 patches (+CLS dropped by "default") -> 16 image tokens.
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_vit_kwargs(32, 8), projection_dim=HIDDEN),
        text_config=tf.LlamaConfig(**_decoder_kwargs("llava"), **_llama_ids("llava")),
        image_token_index=token_id("llava", "<image>"), image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    return tf.LlavaForConditionalGeneration(config)


def _build_llava_next() -> torch.nn.Module:
    config = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(**_vit_kwargs(32, 8), projection_dim=HIDDEN),
        text_config=tf.LlamaConfig(**_decoder_kwargs("llava_next"), **_llama_ids("llava_next")),
        image_token_index=token_id("llava_next", "<image>"), image_seq_length=16,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    return tf.LlavaNextForConditionalGeneration(config)


def _build_idefics3() -> torch.nn.Module:
    # 32 px image, 8 px patches -> 16 patches, pixel shuffle (scale 2) -> 4 image tokens.
    arch = "idefics3"
    text = tf.LlamaConfig(
        **_decoder_kwargs(arch), bos_token_id=token_id(arch, "<|im_start|>"),
        eos_token_id=token_id(arch, "<end_of_utterance>"), pad_token_id=token_id(arch, "<|im_end|>"),
    )
    config = tf.Idefics3Config(
        vision_config=tf.Idefics3VisionConfig(**_vit_kwargs(32, 8)),
        text_config=text, image_token_id=token_id(arch, "<image>"), scale_factor=2,
    )
    return tf.Idefics3ForConditionalGeneration(config)


def _qwen_text_ids(arch: str) -> dict:
    return dict(bos_token_id=token_id(arch, "<|endoftext|>"), eos_token_id=token_id(arch, "<|im_end|>"),
                pad_token_id=token_id(arch, "<|endoftext|>"))


def _qwen_top_ids(arch: str) -> dict:
    return dict(
        image_token_id=token_id(arch, "<|image_pad|>"), video_token_id=token_id(arch, "<|video_pad|>"),
        vision_start_token_id=token_id(arch, "<|vision_start|>"),
        vision_end_token_id=token_id(arch, "<|vision_end|>"),
    )


# head_dim 16 -> 8 rotary frequencies split over (time, height, width).
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _build_qwen2_5_vl() -> torch.nn.Module:
    # 56 px image, 14 px patches -> 4x4 patches, 2x2 merge -> 4 image tokens.
    arch = "qwen2_5_vl"
    vision = tf.Qwen2_5_VLVisionConfig(
        depth=2, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_heads=2, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=HIDDEN,
        fullatt_block_indexes=[1],
    )
    text = tf.Qwen2_5_VLTextConfig(**_decoder_kwargs(arch), **_qwen_text_ids(arch),
                                   rope_parameters=dict(_MROPE))
    config = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_qwen_top_ids(arch))
    return tf.Qwen2_5_VLForConditionalGeneration(config)


def _build_qwen2_vl() -> torch.nn.Module:
    arch = "qwen2_vl"
    vision = tf.Qwen2VLVisionConfig(
        depth=2, embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2, num_heads=2, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2,
    )
    text = tf.Qwen2VLTextConfig(**_decoder_kwargs(arch), **_qwen_text_ids(arch),
                                rope_parameters=dict(_MROPE))
    config = tf.Qwen2VLConfig(vision_config=vision, text_config=text, **_qwen_top_ids(arch))
    return tf.Qwen2VLForConditionalGeneration(config)


def _build_mllama() -> torch.nn.Module:
    # Up to two 32 px tiles, 8 px patches -> 16 patches (+CLS) per tile, read by cross-attention layer 1.
    arch = "mllama"
    vision = tf.MllamaVisionConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
        intermediate_size=INTERMEDIATE, image_size=32, patch_size=8, max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        intermediate_layers_indices=[1], vision_output_dim=HIDDEN * 2,
    )
    text = tf.MllamaTextConfig(
        vocab_size=vocab_size(arch), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, cross_attention_layers=[1],
        max_position_embeddings=512, bos_token_id=token_id(arch, "<|begin_of_text|>"),
        eos_token_id=[token_id(arch, "<|end_of_text|>"), token_id(arch, "<|eot_id|>")],
        pad_token_id=token_id(arch, "<|finetune_right_pad_id|>"),
    )
    config = tf.MllamaConfig(vision_config=vision, text_config=text,
                             image_token_index=token_id(arch, "<|image|>"))
    return tf.MllamaForConditionalGeneration(config)


def _gemma_ids(arch: str) -> dict:
    return dict(bos_token_id=token_id(arch, "<bos>"), eos_token_id=token_id(arch, "<eos>"),
                pad_token_id=token_id(arch, "<pad>"))


def _build_paligemma() -> torch.nn.Module:
    # 32 px image, 8 px patches -> 16 image tokens.
    arch = "paligemma"
    text = tf.GemmaConfig(**_decoder_kwargs(arch), head_dim=16, **_gemma_ids(arch))
    config = tf.PaliGemmaConfig(
        vision_config=tf.SiglipVisionConfig(**_vit_kwargs(32, 8)), text_config=text,
        image_token_index=token_id(arch, "<image>"), vocab_size=vocab_size(arch),
        projection_dim=HIDDEN, hidden_size=HIDDEN,
    )
    return tf.PaliGemmaForConditionalGeneration(config)


def _build_blip2() -> torch.nn.Module:
    # Q-Former with 4 query tokens -> 4 image tokens in front of the OPT decoder.
    arch = "blip2"
    text = tf.OPTConfig(
        vocab_size=vocab_size(arch), hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=2, word_embed_proj_dim=HIDDEN, max_position_embeddings=512,
        bos_token_id=token_id(arch, "</s>"), eos_token_id=token_id(arch, "</s>"),
        pad_token_id=token_id(arch, "<pad>"),
    )
    qformer = tf.Blip2QFormerConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=INTERMEDIATE,
        encoder_hidden_size=HIDDEN, cross_attention_frequency=1, vocab_size=64,
    )
    config = tf.Blip2Config(
        vision_config=tf.Blip2VisionConfig(**_vit_kwargs(32, 8)), qformer_config=qformer,
        text_config=text, num_query_tokens=4, image_text_hidden_size=HIDDEN,
        image_token_index=token_id(arch, "<image>"),
    )
    return tf.Blip2ForConditionalGeneration(config)


def _build_gemma3() -> torch.nn.Module:
    # 32 px image, 8 px patches -> 4x4 patches, pooled 2x2 -> 4 image tokens.
    arch = "gemma3"
    text = tf.Gemma3TextConfig(**_decoder_kwargs(arch), head_dim=16, sliding_window=64,
                               **_gemma_ids(arch))
    config = tf.Gemma3Config(
        vision_config=tf.SiglipVisionConfig(**_vit_kwargs(32, 8)), text_config=text,
        mm_tokens_per_image=4, boi_token_index=token_id(arch, "<start_of_image>"),
        eoi_token_index=token_id(arch, "<end_of_image>"),
        image_token_index=token_id(arch, "<image_soft_token>"),
    )
    return tf.Gemma3ForConditionalGeneration(config)


# arch -> builder of the random model (the real transformers class of that family).
_MODEL_BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "idefics3": _build_idefics3,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "mllama": _build_mllama,
    "paligemma": _build_paligemma,
    "blip2": _build_blip2,
    "gemma3": _build_gemma3,
}

TINY_ARCHS: tuple[str, ...] = tuple(_MODEL_BUILDERS)


def _check_arch(arch: str) -> None:
    if arch not in _MODEL_BUILDERS:
        raise ValueError(f"unknown tiny arch {arch!r}; valid: {', '.join(TINY_ARCHS)}")


@functools.lru_cache(maxsize=None)
def _cached_model(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _MODEL_BUILDERS[arch]().float().eval()


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """Fresh tiny random model of `arch` (float32, eval mode, same weights for the same seed).

    Args:
        arch: one of TINY_ARCHS.
        seed: torch seed used before construction.

    Returns:
        A new model instance (a deep copy; callers may modify it freely).

    Raises:
        ValueError: `arch` is not one of TINY_ARCHS.
    """
    _check_arch(arch)
    return copy.deepcopy(_cached_model(arch, seed))
