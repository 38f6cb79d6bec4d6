"""Collators: dataset items -> model inputs through the model's own processor and chat template.

`TrainCollator` builds "user: image + prompt / assistant: caption" and labels only the caption
tokens and the end-of-turn token (prompt, image and padding tokens are -100). `GenerateCollator`
builds the prompt with the generation prompt, left padded, for `model.generate`. Sequences longer
than `data.max_length` lose caption tokens from the end; image and prompt tokens are never cut, and
a sample whose prompt alone is too long is dropped and reported in the batch's "skipped" list.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Optional

import torch

from vlm_tune.constants import IGNORE_INDEX
from vlm_tune.data.bad_samples import DataError, is_skipped
from vlm_tune.data.families import caption_style, chat_messages, image_budget, image_placeholder, special_token_ids
from vlm_tune.data.images import fit_within
from vlm_tune.recipe import DataConfig

logger = logging.getLogger("vlm_tune.data")

# Processor outputs laid out [batch, sequence, ...]: cut together when a sequence is shortened.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")
UNREADABLE = {"image_id": None, "file": None, "reason": "image could not be read"}  # a dataset that gives None


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


class CaptionEncoder:
    """The processor-facing half of both collators: text layout, image budget, robust processor calls.

    Args:
        processor: the model's processor (its tokenizer is `processor.tokenizer`).
        data_cfg: the `data` section (prompt, image_size, max_pixels, max_length, on_error).
    Raises:
        DataError: the processor has no chat template and is not a known template-free family.
    """

    def __init__(self, processor: Any, data_cfg: DataConfig):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.style = caption_style(processor)
        self.budget = image_budget(processor, data_cfg.image_size, data_cfg.max_pixels)
        self.max_length = data_cfg.max_length
        self.on_error = data_cfg.on_error
        self.prompts = [data_cfg.prompt] if isinstance(data_cfg.prompt, str) else list(data_cfg.prompt)
        self.special_ids = special_token_ids(self.tokenizer)
        self.placeholder = image_placeholder(processor) if self.style == "prefix_suffix" else ""
        self.append_eos = self.style == "plain"
        if self.style == "chat":  # a template that ends the answer without a special token gets eos added
            prompt, full = self.prompt_text("p"), self.full_text("p", "a caption")
            ids = self.tokenizer(full, add_special_tokens=False)["input_ids"]
            start = _common_prefix(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], ids)
            self.append_eos = not any(i in self.special_ids for i in ids[start:])

    # --- text ---------------------------------------------------------------------------------

    def prompt_of(self, item: dict, seed: int = 0) -> str:
        """The item's prompt, or (items from other sources) a draw from `data.prompt` by image id."""
        if item.get("prompt"):
            return item["prompt"]
        return random.Random(f"vlm_tune:{seed}:{item['image_id']}").choice(self.prompts)

    def prompt_text(self, prompt: str) -> str:
        """What the model reads before it answers (generation prompt included)."""
        if self.style == "chat":
            return self.processor.apply_chat_template(
                chat_messages(prompt, None), tokenize=False, add_generation_prompt=True
            )
        return self.placeholder + prompt if self.style == "prefix_suffix" else prompt

    def full_text(self, prompt: str, caption: str) -> str:
        """Prompt and answer (chat and plain styles); the answer ends with the end-of-turn token."""
        eos = self.tokenizer.eos_token if self.append_eos else ""
        if self.style == "chat":
            return self.processor.apply_chat_template(chat_messages(prompt, caption), tokenize=False) + eos
        return (f"{prompt} {caption}" if prompt else caption) + eos

    def _adds_special_tokens(self, text: str) -> bool:
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))  # a template that writes <bos> itself must not get two

    def answer_lengths(self, prompt_texts: list[str], full_texts: list[str]) -> list[int]:
        """Tokens after the prompt in each full text (caption, end-of-turn and the template's tail)."""
        flag = self._adds_special_tokens(full_texts[0])
        prompt_ids = self.tokenizer(prompt_texts, add_special_tokens=flag)["input_ids"]
        full_ids = self.tokenizer(full_texts, add_special_tokens=flag)["input_ids"]
        return [len(full) - _common_prefix(prompt, full) for prompt, full in zip(prompt_ids, full_ids)]

    # --- processor calls ----------------------------------------------------------------------

    def image(self, image):
        """The image shrunk to the budget (families whose token count follows the image size)."""
        return fit_within(image, self.budget.longest_edge, self.budget.max_pixels) if self.budget.resizes else image

    def encode(self, texts: list[str], images: list, padding_side: str, suffixes: Optional[list[str]] = None):
        """One processor call over a batch of one image per text: tensors, padded on `padding_side`, no truncation."""
        return self.encode_image_lists(texts, [[image] for image in images], padding_side, suffixes)

    def encode_image_lists(
        self, texts: list[str], image_lists: list[list], padding_side: str, suffixes: Optional[list[str]] = None
    ):
        """One processor call over a batch with any number of images per text (none for text-only samples)."""
        kwargs = dict(
            text=texts,
            images=image_lists if any(image_lists) else None,
            padding=True,
            padding_side=padding_side,
            return_tensors="pt",
            **self.budget.processor_kwargs,
        )
        if self.style != "prefix_suffix":
            kwargs["add_special_tokens"] = self._adds_special_tokens(texts[0])
        if suffixes is not None:
            kwargs["suffix"] = suffixes
        if any(image_lists) and not all(image_lists) and refuses_mixed_batches(self.processor):
            return _call_unchecked(self.processor, kwargs)
        return self.processor(**kwargs)

    def encode_robust(self, samples: list[dict], build) -> tuple[list[dict], Any, list[dict]]:
        """`build(samples)` (a processor call); if it fails, find and drop the samples that fail alone.

        Returns:
            (kept samples, build's result or None when nothing is left, skipped records)
        Raises:
            DataError: a sample the processor rejects, when `data.on_error` is "raise".
        """
        try:
            return samples, build(samples), []
        except Exception as batch_error:  # noqa: BLE001 - any processor failure is isolated per sample
            kept, skipped = [], []
            for sample in samples:
                try:
                    build([sample])
                    kept.append(sample)
                except Exception as exc:  # noqa: BLE001
                    reason = f"processor failed ({type(exc).__name__}: {exc})"
                    if self.on_error == "raise":
                        raise DataError(
                            f"image {sample['image_id']}: {reason} "
                            f"(set data.on_error: skip to skip and count such samples)"
                        ) from None
                    skipped.append({"image_id": sample["image_id"], "reason": reason})
            if not skipped:  # it fails only as a batch: not a data problem
                raise batch_error
            return kept, (build(kept) if kept else None), skipped


_REFUSES_MIXED: dict = {}  # the class's validate_inputs function -> the answer of `refuses_mixed_batches`


def refuses_mixed_batches(processor) -> bool:
    """True for an MllamaProcessor whose input check refuses a batch of text-only and image samples (transformers
    5.17; later versions accept it). The rest of its call handles such a batch: the output equals 5.24's."""
    if type(processor).__name__ != "MllamaProcessor":
        return False
    check = type(processor).validate_inputs
    if check not in _REFUSES_MIXED:  # asked once per check function, not per batch
        from PIL import Image

        try:
            processor.validate_inputs(images=[[Image.new("RGB", (2, 2))], []], text=[processor.image_token, "text"])
            _REFUSES_MIXED[check] = False
        except ValueError:
            _REFUSES_MIXED[check] = True
    return _REFUSES_MIXED[check]


def _no_input_check(*args, **kwargs) -> None:
    return None


def _call_unchecked(processor, kwargs: dict):
    """The processor call without its input check (see `refuses_mixed_batches`)."""
    processor.validate_inputs = _no_input_check  # an instance attribute, removed after the call
    try:
        return processor(**kwargs)
    finally:
        del processor.validate_inputs


def _split_none(items: list) -> tuple[list[dict], list[dict]]:
    """(the usable samples, the records of the skipped ones: image, file and reason)."""
    samples = [item for item in items if not is_skipped(item)]
    skipped = [dict(item) if item is not None else dict(UNREADABLE) for item in items if is_skipped(item)]
    return samples, skipped


def _too_long(sample: dict, prompt_tokens: int, max_length: int) -> dict:
    reason = (
        f"too long: prompt and image tokens ({prompt_tokens}) leave no room for the caption "
        f"within data.max_length={max_length}"
    )
    logger.warning("skipping image %s: %s", sample["image_id"], reason)
    return {"image_id": sample["image_id"], "reason": reason}


class TrainCollator:
    """Training batches: items -> model inputs with `labels`, plus "skipped" (dropped items).

    Args:
        processor: the model's processor.
        data_cfg: the `data` section.
        seed: draws a prompt for items that carry none (items of a `CaptionDataset` always do).
    Returns (call):
        `{"input_ids", "attention_mask", "labels", <pixel and family tensors>, "skipped": [{"image_id",
        "reason"}]}`, or only `{"skipped": [...]}` when every item was dropped.
    """

    def __init__(self, processor: Any, data_cfg: DataConfig, seed: int = 0):
        self.encoder = CaptionEncoder(processor, data_cfg)
        self.seed = seed

    def __call__(self, items: list[Optional[dict]]) -> Optional[dict]:
        samples, skipped = _split_none(items)
        batch, dropped = self._collate(samples) if samples else (None, [])
        if batch is None:  # nothing usable: only the records of what was dropped, so the loop can report them
            return {"skipped": skipped + dropped}
        batch["skipped"] = skipped + dropped
        return batch

    def _encode(self, samples: list[dict]):
        """Processor output and, per sample, the labelled span [start, end) before truncation."""
        encoder = self.encoder
        prompts = [encoder.prompt_of(s, self.seed) for s in samples]
        captions = [s.get("caption") or s["captions"][0] for s in samples]
        images = [encoder.image(s["image"]) for s in samples]
        if encoder.style == "prefix_suffix":  # the processor marks the suffix (caption + eos) with token_type 1
            encoded = encoder.encode([encoder.prompt_text(p) for p in prompts], images, "right", suffixes=captions)
            starts = [int(row.nonzero()[0]) for row in encoded["token_type_ids"] * encoded["attention_mask"]]
            answers = [int(n) - start for n, start in zip(encoded["attention_mask"].sum(1), starts)]
        else:
            full_texts = [encoder.full_text(p, c) for p, c in zip(prompts, captions)]
            encoded = encoder.encode(full_texts, images, "right")
            answers = encoder.answer_lengths([encoder.prompt_text(p) for p in prompts], full_texts)
        spans = []
        for row, (ids, length) in enumerate(zip(encoded["input_ids"], encoded["attention_mask"].sum(1).tolist())):
            start = length - answers[row]  # right padding: the answer ends the unpadded sequence
            end = next((pos + 1 for pos in range(start, length) if int(ids[pos]) in encoder.special_ids), length)
            spans.append((start, end, length))
        return encoded, spans

    def _collate(self, samples: list[dict]) -> tuple[Optional[dict], list[dict]]:
        samples, encoded, skipped = self.encoder.encode_robust(samples, self._encode)
        if encoded is None:
            return None, skipped
        encoded, spans = encoded
        max_length = self.encoder.max_length
        too_long = [i for i, (start, _, _) in enumerate(spans) if start >= max_length]
        if too_long:  # re-encode without them (rare): other tensors (pixels, grids) are per sample
            skipped += [_too_long(samples[i], spans[i][0], max_length) for i in too_long]
            kept = [s for i, s in enumerate(samples) if i not in too_long]
            batch, more = self._collate(kept) if kept else (None, [])
            return batch, skipped + more
        width = max(min(length, max_length) for _, _, length in spans)
        batch = {key: value for key, value in encoded.items() if key != "labels"}
        for key in SEQUENCE_KEYS:  # [B, T, ...] -> [B, width, ...]; cuts only captions' tails
            if key in batch:
                batch[key] = batch[key][:, :width]
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)  # [B, width]
        for row, (start, end, _) in enumerate(spans):
            end = min(end, max_length)
            labels[row, start:end] = batch["input_ids"][row, start:end]
        batch["labels"] = labels
        return batch, skipped


class GenerateCollator:
    """Generation batches: items -> `(inputs, meta)` for `model.generate(**inputs)`.

    `inputs` hold the prompt with the generation prompt, LEFT padded (set per call; the processor's
    tokenizer is not changed); the new tokens are `output[:, inputs["input_ids"].shape[1]:]`.
    `meta` = `{"image_ids": [...], "references": [[...], ...], "skipped": [{"image_id", "reason"}]}`.
    Returns None when every item was dropped.
    """

    def __init__(self, processor: Any, data_cfg: DataConfig, seed: int = 0):
        self.encoder = CaptionEncoder(processor, data_cfg)
        self.seed = seed

    def _encode(self, samples: list[dict]):
        encoder = self.encoder
        texts = [encoder.prompt_text(encoder.prompt_of(s, self.seed)) for s in samples]
        return encoder.encode(texts, [encoder.image(s["image"]) for s in samples], "left")

    def __call__(self, items: list[Optional[dict]]) -> Optional[tuple[dict, dict]]:
        samples, skipped = _split_none(items)
        encoded = generation_inputs(self.encoder, samples, self._encode, _too_long)
        if encoded is None:
            return None
        samples, inputs, dropped = encoded
        meta = {
            "image_ids": [s["image_id"] for s in samples],
            "references": [list(s["captions"]) for s in samples],
            "skipped": skipped + dropped,
        }
        return inputs, meta


def generation_inputs(encoder: CaptionEncoder, samples: list[dict], build, too_long) -> Optional[tuple]:
    """`build(samples)` for generation, without the samples that fail or leave no room within `data.max_length`.

    Returns:
        (kept samples, inputs without labels, skipped records), or None when no sample is left.
    """
    skipped: list[dict] = []
    while samples:
        samples, encoded, dropped = encoder.encode_robust(samples, build)
        skipped += dropped
        if encoded is None:
            break
        lengths = encoded["attention_mask"].sum(1).tolist()
        rows = [i for i, n in enumerate(lengths) if n >= encoder.max_length]
        if not rows:
            return samples, {key: value for key, value in encoded.items() if key != "labels"}, skipped
        skipped += [too_long(samples[i], lengths[i], encoder.max_length) for i in rows]
        samples = [s for i, s in enumerate(samples) if i not in rows]
    return None
