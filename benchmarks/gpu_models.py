"""Models and data of the GPU benchmark: full-size configs with real processors, synthetic batches, a caption set.

Full size: Llama-3.2-11B-Vision (mllama, tiles of 448 px as in the issue's workload), Qwen2.5-VL-7B and
SmolVLM-Instruct 2.2B (idefics3), from their published config values, random weights. The processors are the
families' real processor classes with the real image settings; the tokenizer is the small offline one of
tests/tiny.py (only the config's vocabulary size matters for the cost of the logits). `tiny=True` gives the
tests' tiny models instead, so the whole benchmark runs on a CPU.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import transformers as tf
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import tiny_tokenizer, tiny_vlm_folder, token_id  # noqa: E402

MODEL_NAMES = ("mllama", "qwen2_5_vl", "idefics3")
TITLES = {"mllama": "Llama-3.2-11B-Vision", "qwen2_5_vl": "Qwen2.5-VL-7B", "idefics3": "SmolVLM-Instruct 2.2B"}


def _ids(arch: str, bos: str, eos: str, pad: str) -> dict:
    return dict(bos_token_id=token_id(arch, bos), eos_token_id=token_id(arch, eos), pad_token_id=token_id(arch, pad))


def _mllama_config():
    vision = tf.MllamaVisionConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_global_layers=8,
        attention_heads=16,
        image_size=448,
        patch_size=14,
        max_num_tiles=4,
        intermediate_layers_indices=[3, 7, 15, 23, 30],
        vision_output_dim=7680,
        supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    )
    text = tf.MllamaTextConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        **_ids("mllama", "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
    )
    return tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=token_id("mllama", "<|image|>"))


def _qwen_config():
    arch = "qwen2_5_vl"
    vision = tf.Qwen2_5_VLVisionConfig(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    text = tf.Qwen2_5_VLTextConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        **_ids(arch, "<|endoftext|>", "<|im_end|>", "<|endoftext|>"),
    )
    ids = {
        "image_token_id": token_id(arch, "<|image_pad|>"),
        "video_token_id": token_id(arch, "<|video_pad|>"),
        "vision_start_token_id": token_id(arch, "<|vision_start|>"),
        "vision_end_token_id": token_id(arch, "<|vision_end|>"),
    }
    return tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)


def _idefics3_config():
    arch = "idefics3"
    vision = tf.Idefics3VisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    )
    text = tf.LlamaConfig(
        vocab_size=49155,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=16384,
        rope_parameters={"rope_type": "default", "rope_theta": 273768.0},
        tie_word_embeddings=False,
        **_ids(arch, "<|im_start|>", "<end_of_utterance>", "<|im_end|>"),
    )
    return tf.Idefics3Config(
        vision_config=vision, text_config=text, image_token_id=token_id(arch, "<image>"), scale_factor=3
    )


def _processor(arch: str):
    """The family's real processor class with the real image settings and the offline tokenizer."""
    tokenizer = tiny_tokenizer(arch)
    template = tokenizer.chat_template
    if arch == "mllama":
        image_processor = tf.MllamaImageProcessor(size={"height": 448, "width": 448}, max_image_tiles=4)
        return tf.MllamaProcessor(image_processor, tokenizer, chat_template=template)
    if arch == "qwen2_5_vl":
        sizes = dict(
            size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
        )
        image_processor, videos = tf.Qwen2VLImageProcessor(**sizes), tf.Qwen2VLVideoProcessor(**sizes)
        return tf.Qwen2_5_VLProcessor(image_processor, tokenizer, videos, chat_template=template)
    image_processor = tf.Idefics3ImageProcessor(
        do_image_splitting=True, size={"longest_edge": 768}, max_image_size={"longest_edge": 384}
    )
    return tf.Idefics3Processor(image_processor, tokenizer, image_seq_len=81, chat_template=template)


CONFIGS = {"mllama": _mllama_config, "qwen2_5_vl": _qwen_config, "idefics3": _idefics3_config}
# Synthetic workload per model: image size (pixels) and its visual tokens, as in the table.
IMAGE_SIZES = {"mllama": (448, 448), "qwen2_5_vl": (448, 448), "idefics3": (768, 768)}  # 1 tile / 256 / 5x81 tokens
HIGH_RES = (896, 896)  # Qwen2.5-VL: 1,024 visual tokens per image (relevance lever)


def build_folder(arch: str, root: Path, tiny: bool) -> Path:
    """A model folder (config, random bf16 weights, processor) for `arch`, built once under `root`."""
    folder = Path(root) / (f"tiny-{arch}" if tiny else arch)
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    if tiny:
        return tiny_vlm_folder(arch, root / "tiny-build").rename(folder) if not folder.exists() else folder
    config = CONFIGS[arch]()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = tf.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # gates start at 0 (images ignored); open them as a trained model has them
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    model.save_pretrained(folder)
    _processor(arch).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


# --- text and images ---------------------------------------------------------------------------------

_WORDS = (
    "a red square blue circle green triangle on the left right top bottom of image next to small large bright "
    "dark picture shows there is with and near behind front some two three person dog cat tree house street"
).split()


def words(count: int, seed: int) -> str:
    """`count` caption-like words, the same for the same seed."""
    draw = random.Random(seed)
    return " ".join(draw.choice(_WORDS) for _ in range(count))


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A photo-sized RGB image with gradients and shapes (not noise: JPEG sizes stay realistic)."""
    draw_random = random.Random(seed)
    base = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image = Image.blend(base, Image.new("RGB", (width, height), tuple(draw_random.randrange(256) for _ in "rgb")), 0.5)
    pen = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = draw_random.randrange(width), draw_random.randrange(height)
        size = draw_random.randrange(20, max(21, min(width, height) // 3))
        pen.ellipse((x, y, x + size, y + size), fill=tuple(draw_random.randrange(256) for _ in "rgb"))
    return image


def synthetic_items(arch: str, batch_size: int, tiny: bool, high_res: bool = False) -> list[dict]:
    """Dataset-like items of the synthetic workload: one image, a ~64-token prompt, a ~64-token caption."""
    size = (48, 40) if tiny else (HIGH_RES if high_res else IMAGE_SIZES[arch])
    count = 6 if tiny else 40  # words; the offline tokenizer gives about 1.6 tokens per word
    return [
        {"image_id": str(i), "image": picture(*size, i), "prompt": words(count, 1000 + i), "caption": words(count, i)}
        for i in range(batch_size)
    ]


COCO_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (612, 612), (640, 360), (427, 640), (800, 600)]


def caption_set(root: Path, count: int = 256) -> Path:
    """A COCO-format caption set of photo-sized JPEGs (COCO's common sizes), written once under `root`."""
    folder = Path(root) / "captions"
    annotations = folder / "captions.json"
    if annotations.is_file():
        return annotations
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for i in range(count):
        width, height = COCO_SIZES[i % len(COCO_SIZES)]
        picture(width, height, i).save(folder / "images" / f"{i:05d}.jpg", quality=90)
        images.append({"id": i, "file_name": f"{i:05d}.jpg", "width": width, "height": height})
        for k in range(2):
            captions.append({"id": 2 * i + k, "image_id": i, "caption": words(8 + (i * 7 + k) % 14, 10 * i + k)})
    annotations.write_text(json.dumps({"images": images, "annotations": captions}))
    return annotations
