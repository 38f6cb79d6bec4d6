"""How each model family's processor turns (image, prompt, caption) into text, and how its image-token
budget is bounded. Families are told apart by the processor class name.

Caption styles:
    chat           the processor's chat template: user turn = image + prompt, assistant turn = caption
    prefix_suffix  PaliGemma: `processor(text="<image>" + prompt, suffix=caption)`; the processor adds
                   <bos>, the "\\n" separator and <eos>
    plain          BLIP-2: "prompt caption</s>" as plain text; the processor prepends the query tokens
Image budgets (`data.image_size` = longest edge in pixels, `data.max_pixels` = width * height):
    fixed    the model's own fixed input size sets the token count; the budget does not apply
    resize   the image is shrunk to the budget before the processor (tiles / anyres grids shrink)
    idefics3 shrink, and tell the processor its longest edge (it would upscale otherwise)
    qwen     shrink, and tell the processor its pixel range (min_pixels / max_pixels)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from vlm_tune.data.bad_samples import DataError

CAPTION_STYLES = ("chat", "prefix_suffix", "plain")
STYLE_OF_PROCESSOR = {"PaliGemmaProcessor": "prefix_suffix", "Blip2Processor": "plain"}  # others: chat

BUDGET_RULES = ("fixed", "resize", "idefics3", "qwen")
BUDGET_OF_PROCESSOR = {
    "LlavaProcessor": "fixed",
    "PaliGemmaProcessor": "fixed",
    "Blip2Processor": "fixed",
    "Gemma3Processor": "fixed",
    "LlavaNextProcessor": "resize",
    "LlavaOnevisionProcessor": "resize",
    "MllamaProcessor": "resize",
    "Idefics3Processor": "idefics3",
    "SmolVLMProcessor": "idefics3",
    "Qwen2VLProcessor": "qwen",
    "Qwen2_5_VLProcessor": "qwen",
    "Qwen3VLProcessor": "qwen",
}  # processors not listed: "resize", which is safe for any processor


@dataclass(frozen=True)
class ImageBudget:
    """What the collators do to keep image tokens within `data.image_size` / `data.max_pixels`."""

    rule: str
    longest_edge: Optional[int]  # shrink images to this longest edge first (None: no bound)
    max_pixels: Optional[int]  # shrink images to this many pixels first (None: no bound)
    processor_kwargs: dict  # extra image arguments for every processor call

    @property
    def resizes(self) -> bool:
        return self.rule != "fixed" and (self.longest_edge is not None or self.max_pixels is not None)


def processor_name(processor: Any) -> str:
    return type(processor).__name__


def caption_style(processor: Any) -> str:
    """The caption style of `processor` (see the module docstring).

    Raises:
        DataError: a processor outside the known plain / prefix-suffix families without a chat template.
    """
    style = STYLE_OF_PROCESSOR.get(processor_name(processor), "chat")
    if style == "chat" and not getattr(processor, "chat_template", None):
        known = ", ".join(f"{name} ({s})" for name, s in STYLE_OF_PROCESSOR.items())
        raise DataError(
            f"{processor_name(processor)} has no chat template, so prompts and captions cannot be "
            f"laid out as the model expects; save the model folder with its chat_template "
            f"(chat_template.jinja), or use a family that needs none: {known}"
        )
    return style


def image_budget(processor: Any, image_size: Optional[int], max_pixels: Optional[int]) -> ImageBudget:
    """The image-token budget rule of `processor` for `data.image_size` and `data.max_pixels`."""
    rule = BUDGET_OF_PROCESSOR.get(processor_name(processor), "resize")
    kwargs: dict = {}
    if rule == "idefics3" and (image_size or max_pixels):
        edges = [e for e in (image_size, math.isqrt(max_pixels) if max_pixels else None) if e]
        kwargs["size"] = {"longest_edge": min(edges)}
    if rule == "qwen" and (image_size or max_pixels):
        pixels = min(p for p in (max_pixels, image_size * image_size if image_size else None) if p)
        size = getattr(getattr(processor, "image_processor", None), "size", None)
        current_min = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        kwargs["size"] = {"shortest_edge": min(current_min or pixels, pixels), "longest_edge": pixels}
    return ImageBudget(rule, image_size, max_pixels, kwargs)


def chat_messages(prompt: str, caption: Optional[str]) -> list[dict]:
    """The conversation of one sample: user (image + prompt), then the assistant's caption if given."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return messages


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of all special tokens (end-of-turn markers included, which `all_special_ids` may miss)."""
    ids = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids | set(tokenizer.all_special_ids)


def image_placeholder(processor: Any) -> str:
    """The text placeholder of one image (prefix_suffix style), e.g. "<image>"."""
    token = getattr(processor, "image_token", None) or getattr(processor.tokenizer, "image_token", None)
    if token is None:
        raise DataError(f"{processor_name(processor)} has no image_token; cannot place the image in the prompt")
    return str(token)
