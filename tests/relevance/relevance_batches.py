"""Batches for relevance tests, built with the tiny models' real processors (no data collator)."""

from __future__ import annotations

import types

import numpy as np
from PIL import Image
from tiny import tiny_vlm

# Families with relevance wiring that the tiny fixtures provide.
WIRED_ARCHS = ("llava", "idefics3", "qwen2_5_vl", "qwen2_vl", "mllama", "paligemma", "gemma3")
# Different sizes give Qwen images different token counts.
IMAGE_SIZES = ((40, 48), (84, 56), (28, 28))
PROMPTS = ("Describe the image.", "What colour is the big square on the left?", "Caption this.")
CAPTIONS = ("a red circle", "two blue squares on a line", "a green star")


def component_map(model) -> types.SimpleNamespace:
    """The part of `find_components` the relevance wiring reads: the model type."""
    return types.SimpleNamespace(model_type=model.config.model_type)


def images(count: int = 2, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of IMAGE_SIZES (height, width)."""
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (*IMAGE_SIZES[i], 3), dtype=np.uint8)) for i in range(count)]


def _prompt(processor, text: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def train_batch(processor, count: int = 2, seed: int = 0) -> dict:
    """Prompt + caption for `count` images, right padding, labels only on caption tokens."""
    processor.tokenizer.padding_side = "right"
    pictures = images(count, seed)
    prompts = [_prompt(processor, PROMPTS[i]) for i in range(count)]
    batch = dict(
        processor(
            text=[p + CAPTIONS[i] for i, p in enumerate(prompts)],
            images=[[picture] for picture in pictures],
            return_tensors="pt",
            padding=True,
        )
    )
    batch.pop("labels", None)  # PaliGemma's processor adds its own
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for row, (prompt, picture) in enumerate(zip(prompts, pictures)):
        prompt_length = processor(text=[prompt], images=[[picture]], return_tensors="pt")["input_ids"].shape[1]
        labels[row, :prompt_length] = -100
    batch["labels"] = labels
    if type(processor).__name__ == "PaliGemmaProcessor":  # prefix-LM: the caption is the causal suffix
        batch["token_type_ids"] = (labels != -100).long() * batch["attention_mask"]
    return batch


def generate_batch(processor, count: int = 2, seed: int = 0) -> dict:
    """Prompts only, left padding (as for generation)."""
    processor.tokenizer.padding_side = "left"
    pictures = images(count, seed)
    prompts = [_prompt(processor, PROMPTS[i]) for i in range(count)]
    return dict(processor(text=prompts, images=[[picture] for picture in pictures], return_tensors="pt", padding=True))


def model_and_processor(arch: str, seed: int = 0):
    """Tiny model (eval mode) and processor of `arch`."""
    model, processor = tiny_vlm(arch, seed)
    return model.eval(), processor
