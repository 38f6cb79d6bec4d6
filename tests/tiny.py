"""Tiny random vision-language models for tests, built from real transformers classes.

Each arch is the family's real model class at toy size (hidden 32, 2 layers, 32-56 px
images, float32, ~70-130K parameters) with a tokenizer trained here (byte-level BPE,
the family's special tokens and chat turn format) and the family's real processor class.
Nothing is downloaded.

Public API: TINY_ARCHS, tiny_vlm(arch, seed) -> (model, processor), tiny_model,
tiny_processor, tiny_tokenizer, tiny_vlm_folder(arch, tmp_path), SPECIAL_TOKENS, token_id.
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

_LLAMA2 = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_QWEN = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_ROW_COL = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
_LOC_SEG = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]

# arch -> the family's special tokens, in id order (token id == list index).
SPECIAL_TOKENS: dict[str, list[str]] = {
    "llava": _LLAMA2,
    "llava_next": _LLAMA2,
    "idefics3": [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
    ]
    + _ROW_COL,
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "mllama": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|finetune_right_pad_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ],
    "paligemma": ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"] + _LOC_SEG,
    "blip2": ["<s>", "<pad>", "</s>", "<unk>", "<image>"],
    "gemma3": [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    ],
}
TINY_ARCHS: tuple[str, ...] = tuple(SPECIAL_TOKENS)


def _check_arch(arch: str) -> None:
    if arch not in SPECIAL_TOKENS:
        raise ValueError(f"unknown tiny arch {arch!r}; valid: {', '.join(TINY_ARCHS)}")


def token_id(arch: str, token: str) -> int:
    """Id of a special token in the tiny tokenizer of `arch` (its index in SPECIAL_TOKENS)."""
    return SPECIAL_TOKENS[arch].index(token)


def vocab_size(arch: str) -> int:
    """Model vocabulary size of `arch`: special tokens plus the byte-level BPE part."""
    return len(SPECIAL_TOKENS[arch]) + BPE_VOCAB_SIZE


# --- chat templates and tokenizer settings per family ------------------------------------


def _text(literal: str) -> str:
    """A Jinja expression printing `literal` (immune to the trim_blocks/lstrip_blocks settings)."""
    return "{{ " + json.dumps(literal) + " }}" if literal else ""


def _chat_template(
    image: str,
    user: tuple,
    assistant: tuple,
    system: tuple = ("", " "),
    start: str = "",
    default_system: str = "",
    lead: str = "",
) -> str:
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
        "{% macro content(message) %}{% if message['content'] is string %}"
        + _text(lead)
        + "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
        + "{% if part['type'] == 'image' %}"
        + _text(image)
        + "{% elif part['type'] == 'text' %}"
        + "{% if loop.first %}"
        + _text(lead)
        + "{% endif %}{{ part['text'] }}{% endif %}"
        + "{% endfor %}{% endif %}{% endmacro %}"
    )
    return (
        content
        + start
        + "{% if messages[0]['role'] != 'system' %}"
        + _text(default_system)
        + "{% endif %}"
        + "{% for message in messages %}"
        + "{% if message['role'] == 'system' %}"
        + _text(system[0])
        + "{{ content(message) }}"
        + _text(system[1])
        + "{% elif message['role'] == 'user' %}"
        + _text(user[0])
        + "{{ content(message) }}"
        + _text(user[1])
        + "{% elif message['role'] == 'assistant' %}"
        + _text(gen_prompt)
        + "{% generation %}"
        + _text(separator)
        + "{{ content(message) }}"
        + _text(assistant_end)
        + "{% endgeneration %}"
        + "{% else %}{{ raise_exception('unknown chat role ' + message['role']) }}{% endif %}"
        + "{% endfor %}{% if add_generation_prompt %}"
        + _text(gen_prompt)
        + "{% endif %}"
    )


def _spec(bos, eos, pad, unk, add_bos, named, stop, template) -> dict:
    """Tokenizer settings: special tokens, whether BOS is prepended, named extra tokens
    (become tokenizer attributes, e.g. `tokenizer.image_token`), generation stop tokens."""
    return dict(bos=bos, eos=eos, pad=pad, unk=unk, add_bos=add_bos, named=named, stop=stop, template=template)


_LLAMA2_SPEC = dict(
    bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True, named={"image_token": "<image>"}, stop=["</s>"]
)
_QWEN_SPEC = _spec(
    None,
    "<|im_end|>",
    "<|endoftext|>",
    None,
    False,
    {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    },
    ["<|im_end|>", "<|endoftext|>"],
    _chat_template(
        "<|vision_start|><|image_pad|><|vision_end|>",
        ("<|im_start|>user\n", "<|im_end|>\n"),
        ("<|im_start|>assistant\n", "", "<|im_end|>\n"),
        system=("<|im_start|>system\n", "<|im_end|>\n"),
        default_system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    ),
)

# arch -> tokenizer settings and chat template (turn format of the real family).
_TEXT_SPECS: dict[str, dict] = {
    # LLaVA-1.5: "USER: <image>\nDescribe. ASSISTANT: caption</s>"
    "llava": dict(_LLAMA2_SPEC, template=_chat_template("<image>\n", ("USER: ", " "), ("ASSISTANT:", " ", "</s>"))),
    # LLaVA-NeXT (Mistral): "[INST] <image>\nDescribe. [/INST] caption</s>"
    "llava_next": dict(
        _LLAMA2_SPEC,
        template=_chat_template("<image>\n", ("[INST] ", " [/INST]"), ("", " ", "</s>"), system=("", "\n")),
    ),
    # SmolVLM: "<|im_start|>User:<image>Describe.<end_of_utterance>\nAssistant: caption<end_of_utterance>\n"
    "idefics3": _spec(
        "<|im_start|>",
        "<end_of_utterance>",
        "<|im_end|>",
        "<|endoftext|>",
        False,
        {"image_token": "<image>"},
        ["<end_of_utterance>"],
        _chat_template(
            "<image>",
            ("User:", "<end_of_utterance>\n"),
            ("Assistant:", "", "<end_of_utterance>\n"),
            system=("System:", "<end_of_utterance>\n"),
            start="<|im_start|>",
            lead=" ",
        ),
    ),
    # Qwen2-VL / Qwen2.5-VL: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n..."
    "qwen2_vl": _QWEN_SPEC,
    "qwen2_5_vl": _QWEN_SPEC,
    # Llama 3.2 Vision: "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe.<|eot_id|>..."
    "mllama": _spec(
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        None,
        True,
        {"image_token": "<|image|>"},
        ["<|end_of_text|>", "<|eot_id|>"],
        _chat_template(
            "<|image|>",
            ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", "", "<|eot_id|>"),
            system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
            start="{{ bos_token }}",
        ),
    ),
    # PaliGemma has no chat turns: "<image>prefix" + "\n" + suffix; the processor inserts
    # <bos> after the image tokens and "\n" at the end (prefer `suffix=` for training).
    "paligemma": _spec(
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        False,
        {"image_token": "<image>"},
        ["<eos>"],
        _chat_template("<image>", ("", ""), ("", "\n", "<eos>"), system=("", "\n")),
    ),
    # BLIP-2 (OPT): "Question: Describe. Answer: caption</s>"; the processor prepends query tokens.
    "blip2": _spec(
        "</s>",
        "</s>",
        "<pad>",
        "<unk>",
        True,
        {},
        ["</s>"],  # a named image_token breaks Blip2Processor
        _chat_template("", ("Question: ", " Answer:"), ("", " ", "</s>")),
    ),
    # Gemma 3: "<bos><start_of_turn>user\n<start_of_image>Describe.<end_of_turn>\n<start_of_turn>model\n..."
    "gemma3": _spec(
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        True,
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        ["<eos>", "<end_of_turn>"],
        _chat_template(
            "<start_of_image>",
            ("<start_of_turn>user\n", "<end_of_turn>\n"),
            ("<start_of_turn>model\n", "", "<end_of_turn>\n"),
            system=("", "\n\n"),
            start="{{ bos_token }}",
        ),
    ),
}


# --- models: one builder per arch, random weights ----------------------------------------


def _text_ids(arch: str) -> dict:
    """bos/eos/pad ids of the family's tokenizer, for the text config."""
    spec = _TEXT_SPECS[arch]
    bos = token_id(arch, spec["bos"]) if spec["bos"] else token_id(arch, spec["pad"])
    return dict(bos_token_id=bos, eos_token_id=token_id(arch, spec["eos"]), pad_token_id=token_id(arch, spec["pad"]))


def _decoder(arch: str, **extra) -> dict:
    """Tiny decoder sizes (2 layers, hidden 32, 2 heads, 1 kv head) with the family's token ids."""
    return dict(
        vocab_size=vocab_size(arch),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        **_text_ids(arch),
        **extra,
    )


def _vit(image_size: int = 32, patch_size: int = 8) -> dict:
    """Tiny ViT sizes for CLIP / SigLIP / Idefics3 / BLIP vision towers (32 px / 8 px = 16 patches)."""
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def _build_llava(arch: str, config_class=tf.LlavaConfig, model_class=tf.LlavaForConditionalGeneration, **extra):
    # 16 patches (CLS dropped by "default") -> 16 image tokens; LLaVA-NeXT adds anyres crops.
    config = config_class(
        vision_config=tf.CLIPVisionConfig(**_vit(), projection_dim=HIDDEN),
        text_config=tf.LlamaConfig(**_decoder(arch)),
        image_token_index=token_id(arch, "<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        **extra,
    )
    return model_class(config)


def _build_llava_next(arch: str):
    return _build_llava(
        arch,
        tf.LlavaNextConfig,
        tf.LlavaNextForConditionalGeneration,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
    )


def _build_idefics3(arch: str):
    # 16 patches, pixel shuffle (scale 2) -> 4 image tokens.
    config = tf.Idefics3Config(
        vision_config=tf.Idefics3VisionConfig(**_vit()),
        text_config=tf.LlamaConfig(**_decoder(arch)),
        image_token_id=token_id(arch, "<image>"),
        scale_factor=2,
    )
    return tf.Idefics3ForConditionalGeneration(config)


# head_dim 16 -> 8 rotary frequencies split over (time, height, width).
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _build_qwen(arch: str):
    # 56 px image, 14 px patches -> 4x4 patches, 2x2 merge -> 4 image tokens (varies with aspect).
    vision_common = dict(
        depth=2, hidden_size=HIDDEN, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2
    )
    ids = dict(
        image_token_id=token_id(arch, "<|image_pad|>"),
        video_token_id=token_id(arch, "<|video_pad|>"),
        vision_start_token_id=token_id(arch, "<|vision_start|>"),
        vision_end_token_id=token_id(arch, "<|vision_end|>"),
    )
    if arch == "qwen2_vl":
        vision = tf.Qwen2VLVisionConfig(**vision_common, embed_dim=HIDDEN, mlp_ratio=2)
        text = tf.Qwen2VLTextConfig(**_decoder(arch, rope_parameters=dict(_MROPE)))
        return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(vision_config=vision, text_config=text, **ids))
    vision = tf.Qwen2_5_VLVisionConfig(
        **vision_common,
        intermediate_size=INTERMEDIATE,
        window_size=56,
        out_hidden_size=HIDDEN,
        fullatt_block_indexes=[1],
    )
    text = tf.Qwen2_5_VLTextConfig(**_decoder(arch, rope_parameters=dict(_MROPE)))
    return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids))


def _build_mllama(arch: str):
    # Up to two 32 px tiles of 16 patches (+CLS), read by the cross-attention layer 1.
    vision = tf.MllamaVisionConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        intermediate_size=INTERMEDIATE,
        image_size=32,
        patch_size=8,
        max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        intermediate_layers_indices=[1],
        vision_output_dim=HIDDEN * 2,
    )
    text = tf.MllamaTextConfig(**_decoder(arch, cross_attention_layers=[1]))
    model = tf.MllamaForConditionalGeneration(
        tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=token_id(arch, "<|image|>"))
    )
    with torch.no_grad():  # gates start at 0 (image ignored); open them as in a trained model
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    return model


def _build_paligemma(arch: str):
    # 16 patches -> 16 image tokens.
    config = tf.PaliGemmaConfig(
        vision_config=tf.SiglipVisionConfig(**_vit()),
        text_config=tf.GemmaConfig(**_decoder(arch, head_dim=16)),
        image_token_index=token_id(arch, "<image>"),
        vocab_size=vocab_size(arch),
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    return tf.PaliGemmaForConditionalGeneration(config)


def _build_blip2(arch: str):
    # Q-Former with 4 query tokens -> 4 image tokens in front of the OPT decoder.
    ids = _text_ids(arch)
    text = tf.OPTConfig(
        vocab_size=vocab_size(arch),
        hidden_size=HIDDEN,
        ffn_dim=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=512,
        **ids,
    )
    qformer = tf.Blip2QFormerConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
        intermediate_size=INTERMEDIATE,
        encoder_hidden_size=HIDDEN,
        cross_attention_frequency=1,
    )
    config = tf.Blip2Config(
        vision_config=tf.Blip2VisionConfig(**_vit()),
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=4,
        image_text_hidden_size=HIDDEN,
        image_token_index=token_id(arch, "<image>"),
    )
    return tf.Blip2ForConditionalGeneration(config)


def _build_gemma3(arch: str):
    # 4x4 patches pooled 2x2 -> 4 image tokens between <start_of_image> and <end_of_image>.
    config = tf.Gemma3Config(
        vision_config=tf.SiglipVisionConfig(**_vit()),
        text_config=tf.Gemma3TextConfig(**_decoder(arch, head_dim=16, sliding_window=64)),
        mm_tokens_per_image=4,
        boi_token_index=token_id(arch, "<start_of_image>"),
        eoi_token_index=token_id(arch, "<end_of_image>"),
        image_token_index=token_id(arch, "<image_soft_token>"),
    )
    model = tf.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # the projector starts at 0 (image ignored); randomise it as in a trained model
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    return model


# arch -> builder of the random model (the real transformers class of that family).
_MODEL_BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "idefics3": _build_idefics3,
    "qwen2_vl": _build_qwen,
    "qwen2_5_vl": _build_qwen,
    "mllama": _build_mllama,
    "paligemma": _build_paligemma,
    "blip2": _build_blip2,
    "gemma3": _build_gemma3,
}


@functools.cache
def _cached_model(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = _MODEL_BUILDERS[arch](arch).float().eval()
    model.generation_config.pad_token_id = token_id(arch, _TEXT_SPECS[arch]["pad"])
    model.generation_config.eos_token_id = [token_id(arch, tok) for tok in _TEXT_SPECS[arch]["stop"]]
    return model


# --- tokenizers: byte-level BPE trained in-process on caption-like English ----------------

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
            count, place = _COUNTS[(i + j) % len(_COUNTS)], _PLACES[(i * 3 + j) % len(_PLACES)]
            lines.append(f"{count.capitalize()} {colour} {shape}s on the {place} of the image.")
            lines.append(f"A {colour} {shape} in the {place}, next to a {_COLOURS[j]} {_SHAPES[i]}.")
    lines += [" ".join(_WORDS[k : k + 9]) + "." for k in range(0, len(_WORDS), 3)]
    lines += [
        "Describe the image.",
        "What is in the picture?",
        "Caption:",
        "Write a short caption.",
        "0 1 2 3 4 5 6 7 8 9 10 100 2024",
        'Yes, no; maybe! (it\'s) "quoted" - ok?',
    ]
    return lines * 3


@functools.cache
def _cached_tokenizer(arch: str) -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # any text encodes
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(  # special tokens get ids 0..k-1 in SPECIAL_TOKENS order
        vocab_size=vocab_size(arch),
        special_tokens=SPECIAL_TOKENS[arch],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_caption_corpus(), trainer)
    spec = _TEXT_SPECS[arch]
    others = [tok for tok in SPECIAL_TOKENS[arch] if tok not in spec["named"].values()]
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        unk_token=spec["unk"],
        add_bos_token=spec["add_bos"],
        add_eos_token=False,
        extra_special_tokens=spec["named"],
        additional_special_tokens=others,
        chat_template=spec["template"],
        model_max_length=512,
        padding_side="right",
    )


# --- processors: the family's real processor class, sized for 32-56 px images ------------


def _processor_llava(arch, tokenizer, template):
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    common = dict(
        patch_size=8, num_additional_image_tokens=1, vision_feature_select_strategy="default", chat_template=template
    )
    if arch == "llava":
        return tf.LlavaProcessor(tf.CLIPImageProcessor(**size), tokenizer, **common)
    image_processor = tf.LlavaNextImageProcessor(**size, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    return tf.LlavaNextProcessor(image_processor, tokenizer, **common)


def _processor_idefics3(arch, tokenizer, template):
    image_processor = tf.Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    return tf.Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=template)


def _processor_qwen(arch, tokenizer, template):
    sizes = dict(
        size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56}, patch_size=14, merge_size=2, temporal_patch_size=2
    )  # pixel budget of one 56x56 image -> ~16 patches
    processor_class = tf.Qwen2VLProcessor if arch == "qwen2_vl" else tf.Qwen2_5_VLProcessor
    return processor_class(
        tf.Qwen2VLImageProcessor(**sizes), tokenizer, tf.Qwen2VLVideoProcessor(**sizes), chat_template=template
    )


def _processor_mllama(arch, tokenizer, template):
    image_processor = tf.MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=2)
    return tf.MllamaProcessor(image_processor, tokenizer, chat_template=template)


def _processor_paligemma(arch, tokenizer, template):
    image_processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # PaliGemmaProcessor reads the token count from here
    return tf.PaliGemmaProcessor(image_processor, tokenizer, chat_template=template)


def _processor_blip2(arch, tokenizer, template):
    processor = tf.Blip2Processor(
        tf.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=4
    )
    processor.chat_template = template  # Blip2Processor.__init__ drops a chat_template argument
    return processor


def _processor_gemma3(arch, tokenizer, template):
    image_processor = tf.Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    return tf.Gemma3Processor(image_processor, tokenizer, chat_template=template, image_seq_length=4)


# arch -> builder of the family's processor from (arch, tokenizer, chat template).
_PROCESSOR_BUILDERS = {
    "llava": _processor_llava,
    "llava_next": _processor_llava,
    "idefics3": _processor_idefics3,
    "qwen2_vl": _processor_qwen,
    "qwen2_5_vl": _processor_qwen,
    "mllama": _processor_mllama,
    "paligemma": _processor_paligemma,
    "blip2": _processor_blip2,
    "gemma3": _processor_gemma3,
}


@functools.cache
def _cached_processor(arch: str):
    return _PROCESSOR_BUILDERS[arch](arch, tiny_tokenizer(arch), _TEXT_SPECS[arch]["template"])


# --- public API ----------------------------------------------------------------------------


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """Fresh tiny random model of `arch` (float32, eval mode, same weights for the same seed).

    Args:
        arch: one of TINY_ARCHS.
        seed: torch seed set before construction.

    Returns:
        A new model instance (a deep copy of a per-process cache; modify it freely).

    Raises:
        ValueError: `arch` is not one of TINY_ARCHS.
    """
    _check_arch(arch)
    return copy.deepcopy(_cached_model(arch, seed))


def tiny_tokenizer(arch: str) -> tf.PreTrainedTokenizerFast:
    """Fresh copy of the tiny tokenizer of `arch` (family special tokens, pad token, chat template)."""
    _check_arch(arch)
    return copy.deepcopy(_cached_tokenizer(arch))


def tiny_processor(arch: str):
    """Fresh copy of the tiny processor of `arch` (the family's real processor class).

    Raises:
        ValueError: `arch` is not one of TINY_ARCHS.
    """
    _check_arch(arch)
    return copy.deepcopy(_cached_processor(arch))


def tiny_vlm(arch: str, seed: int = 0):
    """Tiny random model and its processor; the model config's token ids match the tokenizer.

    Args:
        arch: one of TINY_ARCHS.
        seed: torch seed set before building the model.

    Returns:
        (model, processor), fresh objects the caller may modify.

    Raises:
        ValueError: `arch` is not one of TINY_ARCHS.
    """
    return tiny_model(arch, seed), tiny_processor(arch)


def tiny_vlm_folder(arch: str, tmp_path, seed: int = 0) -> Path:
    """Save the tiny model + processor of `arch` with save_pretrained into `tmp_path / arch`.

    The folder loads back with `AutoModelForImageTextToText.from_pretrained` and
    `AutoProcessor.from_pretrained` (BLIP-2's processor then lacks its chat template; its
    tokenizer keeps it).

    Returns:
        The folder path.
    """
    model, processor = tiny_vlm(arch, seed)
    folder = Path(tmp_path) / arch
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
