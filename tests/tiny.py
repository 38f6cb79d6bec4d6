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
import json

from pathlib import Path

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
    model = tf.MllamaForConditionalGeneration(config)
    # Cross-attention gates start at 0 (image ignored); open them as in a trained model.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    return model


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
    model = tf.Gemma3ForConditionalGeneration(config)
    # The projector weight starts at 0 (image ignored); give it random values as in a trained model.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    return model


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
    model = _MODEL_BUILDERS[arch]().float().eval()
    text_spec = _TEXT_SPECS[arch]
    model.generation_config.pad_token_id = token_id(arch, text_spec["pad"])
    model.generation_config.eos_token_id = [token_id(arch, tok) for tok in text_spec["stop"]]
    return model


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


# --- tokenizers: byte-level BPE trained in-process, family special tokens first ----------

_COLOURS = "red green blue yellow black white orange purple pink brown grey gray".split()
_SHAPES = "square circle triangle rectangle star line dot cross ring box ball cube".split()
_PLACES = "left right top bottom middle centre center corner edge background foreground".split()
_COUNTS = "one two three four five six seven eight nine ten a an no many several".split()
_WORDS = (
    "the a an of on in at with and is are there this that image picture photo shows small large "
    "big tiny bright dark next to above below near behind front side some two dog cat man woman "
    "person people car bus tree house street table plate food water sky grass field sitting "
    "standing holding looking describe caption what how who where question answer briefly "
    "please write short sentence detailed scene object objects colour color shape shapes"
).split()


def _caption_corpus() -> list[str]:
    """Deterministic caption-like English (shapes, colours, positions, counts, common words)."""
    lines = []
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            count = _COUNTS[(i + j) % len(_COUNTS)]
            place = _PLACES[(i * 3 + j) % len(_PLACES)]
            lines.append(f"{count.capitalize()} {colour} {shape}s on the {place} of the image.")
            lines.append(f"A {colour} {shape} in the {place}, next to a {_COLOURS[j % 12]} {_SHAPES[i]}.")
    lines += [" ".join(_WORDS[k:k + 9]) + "." for k in range(0, len(_WORDS), 3)]
    lines += ["Describe the image.", "What is in the picture?", "Caption:", "Write a short caption.",
              "0 1 2 3 4 5 6 7 8 9 10 100 2024", "Yes, no; maybe! (it's) \"quoted\" - ok?"]
    return lines * 3


@functools.lru_cache(maxsize=None)
def _trained_bpe(arch: str):
    """A `tokenizers.Tokenizer` with byte-level BPE; special token i of the family gets id i."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size(arch), special_tokens=SPECIAL_TOKENS[arch], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_caption_corpus(), trainer)
    return tokenizer


def _text(literal: str) -> str:
    """A Jinja expression printing `literal` (immune to the trim_blocks/lstrip_blocks settings)."""
    return "{{ " + json.dumps(literal) + " }}" if literal else ""


def _chat_template(image: str, user: tuple, assistant: tuple, system: tuple = ("", " "),
                   start: str = "", default_system: str = "", lead: str = "") -> str:
    """Compact Jinja chat template for one family's turn format.

    Args:
        image: text an image part renders to (the processor expands it to image tokens).
        user / system: (prefix, suffix) around the turn's content.
        assistant: (generation prompt, separator, suffix); the answer is wrapped in
            {% generation %} so `return_assistant_tokens_mask=True` works.
        start: text before the first turn; default_system: rendered when no system turn is given.
        lead: text put before a turn's content when it starts with text (SmolVLM's "User: hi").
    """
    gen_prompt, separator, assistant_end = assistant
    content = (  # one message's content: a string, or a list of image / text parts
        "{% macro content(message) %}{% if message['content'] is string %}" + _text(lead)
        + "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
        + "{% if part['type'] == 'image' %}" + _text(image) + "{% elif part['type'] == 'text' %}"
        + "{% if loop.first %}" + _text(lead) + "{% endif %}{{ part['text'] }}{% endif %}"
        + "{% endfor %}{% endif %}{% endmacro %}"
    )
    return (
        content + start
        + "{% if messages[0]['role'] != 'system' %}" + _text(default_system) + "{% endif %}"
        + "{% for message in messages %}"
        + "{% if message['role'] == 'system' %}" + _text(system[0]) + "{{ content(message) }}" + _text(system[1])
        + "{% elif message['role'] == 'user' %}" + _text(user[0]) + "{{ content(message) }}" + _text(user[1])
        + "{% elif message['role'] == 'assistant' %}" + _text(gen_prompt) + "{% generation %}"
        + _text(separator) + "{{ content(message) }}" + _text(assistant_end) + "{% endgeneration %}"
        + "{% else %}{{ raise_exception('unknown chat role ' + message['role']) }}{% endif %}"
        + "{% endfor %}{% if add_generation_prompt %}" + _text(gen_prompt) + "{% endif %}"
    )


def _spec(bos, eos, pad, unk, add_bos, named, stop, template) -> dict:
    return dict(bos=bos, eos=eos, pad=pad, unk=unk, add_bos=add_bos, named=named, stop=stop,
                template=template)


_LLAMA2_TOKENS = dict(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True,
                      named={"image_token": "<image>"}, stop=["</s>"])
_QWEN_TEXT = _spec(
    None, "<|im_end|>", "<|endoftext|>", None, False,
    {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
     "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    ["<|im_end|>", "<|endoftext|>"],
    _chat_template("<|vision_start|><|image_pad|><|vision_end|>", ("<|im_start|>user\n", "<|im_end|>\n"),
                   ("<|im_start|>assistant\n", "", "<|im_end|>\n"),
                   system=("<|im_start|>system\n", "<|im_end|>\n"),
                   default_system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"),
)

# arch -> tokenizer settings and chat template (turn format of the real family).
_TEXT_SPECS: dict[str, dict] = {
    # LLaVA-1.5: "USER: <image>\nDescribe. ASSISTANT: caption</s>"
    "llava": dict(_LLAMA2_TOKENS, template=_chat_template(
        "<image>\n", ("USER: ", " "), ("ASSISTANT:", " ", "</s>"))),
    # LLaVA-NeXT (Mistral): "[INST] <image>\nDescribe. [/INST] caption</s>"
    "llava_next": dict(_LLAMA2_TOKENS, template=_chat_template(
        "<image>\n", ("[INST] ", " [/INST]"), ("", " ", "</s>"), system=("", "\n"))),
    # SmolVLM: "<|im_start|>User:<image>Describe.<end_of_utterance>\nAssistant: caption<end_of_utterance>\n"
    "idefics3": _spec(
        "<|im_start|>", "<end_of_utterance>", "<|im_end|>", "<|endoftext|>", False,
        {"image_token": "<image>"}, ["<end_of_utterance>"],
        _chat_template("<image>", ("User:", "<end_of_utterance>\n"),
                       ("Assistant:", "", "<end_of_utterance>\n"),
                       system=("System:", "<end_of_utterance>\n"), start="<|im_start|>", lead=" ")),
    "qwen2_vl": _QWEN_TEXT,
    "qwen2_5_vl": _QWEN_TEXT,
    # Llama 3.2 Vision: "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>..."
    "mllama": _spec(
        "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", None, True,
        {"image_token": "<|image|>"}, ["<|end_of_text|>", "<|eot_id|>"],
        _chat_template("<|image|>", ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
                       ("<|start_header_id|>assistant<|end_header_id|>\n\n", "", "<|eot_id|>"),
                       system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
                       start="{{ bos_token }}")),
    # PaliGemma has no chat turns: "<image>prefix" + "\n" + suffix; the processor inserts
    # <bos> after the image tokens and "\n" at the end (prefer `suffix=` for training).
    "paligemma": _spec(
        "<bos>", "<eos>", "<pad>", "<unk>", False, {"image_token": "<image>"}, ["<eos>"],
        _chat_template("<image>", ("", ""), ("", "\n", "<eos>"), system=("", "\n"))),
    # BLIP-2 (OPT): "Question: Describe. Answer: caption</s>"; the processor prepends query tokens.
    "blip2": _spec(
        "</s>", "</s>", "<pad>", "<unk>", True, {}, ["</s>"],  # a named image_token breaks Blip2Processor
        _chat_template("", ("Question: ", " Answer:"), ("", " ", "</s>"))),
    # Gemma 3: "<bos><start_of_turn>user\n<start_of_image>Describe.<end_of_turn>\n<start_of_turn>model\n..."
    "gemma3": _spec(
        "<bos>", "<eos>", "<pad>", "<unk>", True,
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        ["<eos>", "<end_of_turn>"],
        _chat_template("<start_of_image>", ("<start_of_turn>user\n", "<end_of_turn>\n"),
                       ("<start_of_turn>model\n", "", "<end_of_turn>\n"), system=("", "\n\n"),
                       start="{{ bos_token }}")),
}


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(arch: str) -> tf.PreTrainedTokenizerFast:
    spec = _TEXT_SPECS[arch]
    named = spec["named"]
    others = [tok for tok in SPECIAL_TOKENS[arch] if tok not in named.values()]
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=_trained_bpe(arch), bos_token=spec["bos"], eos_token=spec["eos"],
        pad_token=spec["pad"], unk_token=spec["unk"], add_bos_token=spec["add_bos"], add_eos_token=False,
        extra_special_tokens=named, additional_special_tokens=others, chat_template=spec["template"],
        model_max_length=512, padding_side="right",
    )


def tiny_tokenizer(arch: str) -> tf.PreTrainedTokenizerFast:
    """Fresh copy of the tiny tokenizer of `arch` (family special tokens, pad and chat template)."""
    _check_arch(arch)
    return copy.deepcopy(_cached_tokenizer(arch))


# --- processors: the family's real processor class, sized for 32-56 px images ------------

def _processor_llava(tokenizer, template):
    image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tf.LlavaProcessor(image_processor, tokenizer, patch_size=8, num_additional_image_tokens=1,
                             vision_feature_select_strategy="default", chat_template=template)


def _processor_llava_next(tokenizer, template):
    image_processor = tf.LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
    )
    return tf.LlavaNextProcessor(image_processor, tokenizer, patch_size=8, num_additional_image_tokens=1,
                                 vision_feature_select_strategy="default", chat_template=template)


def _processor_idefics3(tokenizer, template):
    image_processor = tf.Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
    )
    return tf.Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=template)


def _processor_qwen(processor_class):
    def build(tokenizer, template):
        pixels = {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}  # -> 4x4 patches of 14 px
        image_processor = tf.Qwen2VLImageProcessor(size=pixels, patch_size=14, merge_size=2,
                                                   temporal_patch_size=2)
        video_processor = tf.Qwen2VLVideoProcessor(size=pixels, patch_size=14, merge_size=2,
                                                   temporal_patch_size=2)
        return processor_class(image_processor, tokenizer, video_processor, chat_template=template)
    return build


def _processor_mllama(tokenizer, template):
    image_processor = tf.MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=2)
    return tf.MllamaProcessor(image_processor, tokenizer, chat_template=template)


def _processor_paligemma(tokenizer, template):
    image_processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # PaliGemmaProcessor reads the token count from here
    return tf.PaliGemmaProcessor(image_processor, tokenizer, chat_template=template)


def _processor_blip2(tokenizer, template):
    image_processor = tf.BlipImageProcessor(size={"height": 32, "width": 32})
    processor = tf.Blip2Processor(image_processor, tokenizer, num_query_tokens=4)
    processor.chat_template = template  # Blip2Processor.__init__ drops a chat_template argument
    return processor


def _processor_gemma3(tokenizer, template):
    image_processor = tf.Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    return tf.Gemma3Processor(image_processor, tokenizer, chat_template=template, image_seq_length=4)


# arch -> builder of the family's processor from (tokenizer, chat template).
_PROCESSOR_BUILDERS = {
    "llava": _processor_llava,
    "llava_next": _processor_llava_next,
    "idefics3": _processor_idefics3,
    "qwen2_vl": _processor_qwen(tf.Qwen2VLProcessor),
    "qwen2_5_vl": _processor_qwen(tf.Qwen2_5_VLProcessor),
    "mllama": _processor_mllama,
    "paligemma": _processor_paligemma,
    "blip2": _processor_blip2,
    "gemma3": _processor_gemma3,
}


@functools.lru_cache(maxsize=None)
def _cached_processor(arch: str):
    return _PROCESSOR_BUILDERS[arch](tiny_tokenizer(arch), _TEXT_SPECS[arch]["template"])


def tiny_processor(arch: str):
    """Fresh copy of the tiny processor of `arch` (the family's real processor class).

    Raises:
        ValueError: `arch` is not one of TINY_ARCHS.
    """
    _check_arch(arch)
    return copy.deepcopy(_cached_processor(arch))


def tiny_vlm(arch: str, seed: int = 0):
    """Tiny random model and its processor; token ids in the model config match the tokenizer.

    Args:
        arch: one of TINY_ARCHS.
        seed: torch seed used before building the model.

    Returns:
        (model, processor), both fresh objects the caller may modify.

    Raises:
        ValueError: `arch` is not one of TINY_ARCHS.
    """
    return tiny_model(arch, seed), tiny_processor(arch)


def tiny_vlm_folder(arch: str, tmp_path, seed: int = 0) -> Path:
    """Save the tiny model + processor of `arch` with save_pretrained into `tmp_path / arch`.

    The folder loads back with `AutoModelForImageTextToText.from_pretrained` (BLIP-2:
    `Blip2ForConditionalGeneration`) and `AutoProcessor.from_pretrained`.

    Returns:
        The folder path.
    """
    model, processor = tiny_vlm(arch, seed)
    folder = Path(tmp_path) / arch
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
