"""Collators for conversations: the family's chat template over every turn, labels on the assistant turns only.

Label spans are exact for any template: the conversation up to each assistant turn (with the generation
prompt) and up to that turn's end are rendered and tokenised; both must be prefixes of the whole conversation's
tokens (else the sample is named: the template rewrites earlier turns). A turn's labels run from its first
token through its end-of-turn token (the last special token of the turn); system and user turns, image tokens
and padding are -100. Positions are mapped to the processor's output, where images are expanded to their
tokens: exact without a second processor call when every image lies before (or after) a boundary, else by
encoding that prefix with its images. `data.train_on: last` labels only the last assistant turn.

A conversation longer than `data.max_length` is cut after its last assistant turn that fits (its images
after the cut are dropped with their turns, never split); one whose first exchange does not fit is skipped
and named. PaliGemma (prefix/suffix) and BLIP-2 (plain) have no turns: they take one question, one answer
and one image, read through the caption collators.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from vlm_tune.constants import IGNORE_INDEX
from vlm_tune.data.bad_samples import DataError
from vlm_tune.data.collate import (
    SEQUENCE_KEYS,
    CaptionEncoder,
    GenerateCollator,
    TrainCollator,
    _split_none,
    generation_inputs,
)
from vlm_tune.data.conversations import count_images, turn_text
from vlm_tune.data.keepalive import dummy_sample
from vlm_tune.recipe import DataConfig

logger = logging.getLogger("vlm_tune.data")


def _too_long(sample: dict, tokens: int, max_length: int, what: str) -> dict:
    reason = f"too long: {what} ({tokens} tokens, images included) exceeds data.max_length={max_length}"
    logger.warning("skipping sample %s: %s", sample["image_id"], reason)
    return {"image_id": sample["image_id"], "reason": reason}


def images_first(samples: list[dict]) -> list[dict]:
    """The samples with those holding images first, in their order (see `fill_image_rows`)."""
    return [s for s in samples if s["images"]] + [s for s in samples if not s["images"]]


def fill_image_rows(encoded) -> None:
    """Give text-only rows their per-image rows where the processor leaves them out (in place).

    mllama's image processor fails when the first sample has no image and returns `aspect_ratio_ids` /
    `aspect_ratio_mask` only for the leading samples that have one; with `images_first` ordering the missing
    rows are the trailing ones, filled as it fills an absent image (id 0, first tile on in the mask).
    """
    rows = encoded["input_ids"].shape[0]
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        value = encoded.get(key)
        if value is not None and value.shape[0] < rows:
            filler = torch.zeros((rows - value.shape[0], *value.shape[1:]), dtype=value.dtype)
            if key == "aspect_ratio_mask":
                filler[:, :, 0] = 1
            encoded[key] = torch.cat([value, filler])


def _too_long_question(sample: dict, tokens: int, max_length: int) -> dict:
    return _too_long(sample, tokens, max_length, "the question before the answer")


class ChatEncoder:
    """Renders conversations with the processor's chat template and finds the assistant turns' tokens.

    Args:
        processor: the model's processor.
        data_cfg: the `data` section (train_on, max_length, image budget, on_error).
    """

    def __init__(self, processor: Any, data_cfg: DataConfig):
        self.base = CaptionEncoder(processor, data_cfg)
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.train_on = data_cfg.train_on
        self.max_length = data_cfg.max_length

    @property
    def has_turns(self) -> bool:
        """False for the prefix/suffix and plain families (PaliGemma, BLIP-2)."""
        return self.base.style == "chat"

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        """The template's text of `messages`; eos is added to each answer when the template ends turns without
        a special token."""
        if self.base.append_eos and not generation_prompt:
            eos = self.tokenizer.eos_token
            messages = [
                {**m, "content": [*m["content"], {"type": "text", "text": eos}]} if m["role"] == "assistant" else m
                for m in messages
            ]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def images(self, sample: dict, count: Optional[int] = None) -> list:
        """The sample's first `count` images (all by default), shrunk to the image budget."""
        return [self.base.image(image) for image in sample["images"][:count]]

    def turn_bounds(self, sample: dict, expanded_length: int) -> list[tuple[int, int]]:
        """(first token, end of turn) of every assistant turn, as positions in the processor's output.

        Raises:
            DataError: a turn's prefix is not a prefix of the whole conversation's tokens.
        """
        messages, images = sample["messages"], self.images(sample)
        full = self.render(messages)
        flag = self.base._adds_special_tokens(full)
        full_ids = self.tokenizer(full, add_special_tokens=flag)["input_ids"]
        extra = expanded_length - len(full_ids)  # tokens the processor added for all images

        def position(text: str, n_images: int) -> int:
            ids = self.tokenizer(text, add_special_tokens=flag)["input_ids"]
            if ids != full_ids[: len(ids)]:
                raise DataError(
                    f"the chat template of {type(self.processor).__name__} renders the conversation up to a turn "
                    f"differently from the whole (it rewrites earlier turns), so labels cannot be placed exactly"
                )
            if n_images == 0:
                return len(ids)
            if n_images == len(images):
                return len(ids) + extra
            encoded = self.base.encode_image_lists([text], [images[:n_images]], "right")
            return int(encoded["attention_mask"].sum())

        bounds = []
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                n_images = count_images(messages[:index])
                start = position(self.render(messages[:index], generation_prompt=True), n_images)
                bounds.append((start, position(self.render(messages[: index + 1]), n_images)))
        return bounds

    def label_end(self, ids: torch.Tensor, start: int, stop: int) -> int:
        """One past the turn's end-of-turn token: its last special token in [start, stop), else stop."""
        special = [pos for pos in range(start, stop) if int(ids[pos]) in self.base.special_ids]
        return special[-1] + 1 if special else stop


def cut_to_fit(sample: dict, bounds: list[tuple[int, int]], max_length: int) -> Optional[dict]:
    """The sample without the turns after its last assistant turn that ends within `max_length` (None: none does)."""
    fitting = [n for n, (_, stop) in enumerate(bounds) if stop <= max_length]
    if not fitting:
        return None
    assistants = [i for i, m in enumerate(sample["messages"]) if m["role"] == "assistant"]
    messages = sample["messages"][: assistants[fitting[-1]] + 1]
    return {**sample, "messages": messages, "images": sample["images"][: count_images(messages)]}


def caption_item(sample: dict, processor: Any) -> dict:
    """A one-question, one-image conversation as a caption item (families without turns).

    Raises:
        DataError: the conversation has more turns, a system turn, or not exactly one image.
    """
    roles = [m["role"] for m in sample["messages"]]
    if roles != ["user", "assistant"] or len(sample["images"]) != 1:
        raise DataError(
            f"{type(processor).__name__} has no chat turns (prefix/suffix or plain format): it takes one user "
            f"turn, one answer and one image; this sample has turns {roles} and {len(sample['images'])} image(s)"
        )
    return {
        "image_id": sample["image_id"],
        "image": sample["images"][0],
        "prompt": turn_text(sample["messages"][0]),
        "caption": turn_text(sample["messages"][1]),
        "captions": list(sample.get("answers") or [turn_text(sample["messages"][1])]),
    }


def _as_caption_items(samples: list[dict], processor, on_error: str) -> tuple[list[dict], list[dict]]:
    items, skipped = [], []
    for sample in samples:
        try:
            items.append(caption_item(sample, processor))
        except DataError as error:
            if on_error == "raise":
                raise DataError(f"sample {sample['image_id']}: {error}") from None
            skipped.append({"image_id": sample["image_id"], "reason": str(error)})
    return items, skipped


class ChatTrainCollator:
    """Training batches of conversations: items -> model inputs with `labels`, plus "skipped".

    Args:
        processor: the model's processor.
        data_cfg: the `data` section.
        keep_vision_busy: when a batch has no image, add a dummy image sample without labels, so that every
            trainable vision parameter gets a gradient (several processes: DDP waits for all of them).
    Returns (call):
        as `TrainCollator`: tensors and "skipped", or only {"skipped": [...]} when every item was dropped; the
        rows hold the samples with images first (`images_first`).
    """

    def __init__(self, processor: Any, data_cfg: DataConfig, keep_vision_busy: bool = False):
        self.encoder = ChatEncoder(processor, data_cfg)
        self.keep_vision_busy = keep_vision_busy
        self.captions = None if self.encoder.has_turns else TrainCollator(processor, data_cfg)

    def __call__(self, items: list[Optional[dict]]) -> dict:
        samples, skipped = _split_none(items)
        if self.captions is not None:
            samples, dropped = _as_caption_items(samples, self.encoder.processor, self.encoder.base.on_error)
            batch, more = self.captions._collate(samples) if samples else (None, [])
            skipped += dropped + more
        else:
            batch, more = self._collate(samples) if samples else (None, [])
            skipped += more
        if batch is None:
            return {"skipped": skipped}
        batch["skipped"] = skipped
        return batch

    def _encode(self, samples: list[dict]):
        """Processor output and, per sample, the assistant turns' (start, stop) bounds."""
        encoder = self.encoder
        texts = [encoder.render(s["messages"]) for s in samples]
        encoded = encoder.base.encode_image_lists(texts, [encoder.images(s) for s in samples], "right")
        fill_image_rows(encoded)
        lengths = encoded["attention_mask"].sum(1).tolist()
        return encoded, [encoder.turn_bounds(s, n) for s, n in zip(samples, lengths)]

    def _collate(self, samples: list[dict]) -> tuple[Optional[dict], list[dict]]:
        if self.keep_vision_busy and not any(s["images"] for s in samples):
            samples = [*samples, dummy_sample()]
        samples, encoded, skipped = self.encoder.base.encode_robust(images_first(samples), self._encode)
        if encoded is None:
            return None, skipped
        encoded, bounds = encoded
        max_length = self.encoder.max_length
        lengths = encoded["attention_mask"].sum(1).tolist()
        if any(n > max_length for n in lengths):  # cut (or drop) those samples, then encode the batch again
            kept = []
            for sample, sample_bounds, length in zip(samples, bounds, lengths):
                cut = sample if length <= max_length else cut_to_fit(sample, sample_bounds, max_length)
                if sample.get("dummy"):
                    continue  # added again below when the batch still has no image
                if cut is None:
                    skipped.append(_too_long(sample, sample_bounds[0][1], max_length, "even the first exchange"))
                else:
                    if cut is not sample:
                        logger.warning("sample %s: cut after its turns that fit data.max_length", sample["image_id"])
                    kept.append(cut)
            batch, more = self._collate(kept) if kept else (None, [])
            return batch, skipped + more
        return self._labelled(encoded, samples, bounds), skipped

    def _labelled(self, encoded, samples: list[dict], bounds: list[list[tuple[int, int]]]) -> dict:
        width = max(int(n) for n in encoded["attention_mask"].sum(1))
        batch = {key: value for key, value in encoded.items() if key != "labels"}
        for key in SEQUENCE_KEYS:  # [B, T, ...] -> [B, width, ...]: drops padding only
            if key in batch:
                batch[key] = batch[key][:, :width]
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)  # [B, width]
        for row, (sample, turns) in enumerate(zip(samples, bounds)):
            if sample.get("dummy"):
                continue  # the dummy image sample carries no loss
            for start, stop in turns[-1:] if self.encoder.train_on == "last" else turns:
                end = self.encoder.label_end(batch["input_ids"][row], start, stop)
                labels[row, start:end] = batch["input_ids"][row, start:end]
        batch["labels"] = labels
        return batch


class ChatGenerateCollator:
    """Generation batches of conversations: the turns before the last answer, with the generation prompt, LEFT
    padded. Returns `(inputs, meta)` as `GenerateCollator`, meta with "questions" (the last user turn's text)
    and "references" (the sample's answers); None when every item was dropped."""

    def __init__(self, processor: Any, data_cfg: DataConfig):
        self.encoder = ChatEncoder(processor, data_cfg)
        self.captions = None if self.encoder.has_turns else GenerateCollator(processor, data_cfg)

    @staticmethod
    def context(sample: dict) -> list[dict]:
        """The turns before the last assistant turn (the question and what came before it)."""
        return sample["messages"][:-1]

    def _encode(self, samples: list[dict]):
        encoder = self.encoder
        texts = [encoder.render(self.context(s), generation_prompt=True) for s in samples]
        encoded = encoder.base.encode_image_lists(texts, [encoder.images(s) for s in samples], "left")
        fill_image_rows(encoded)
        return encoded

    def __call__(self, items: list[Optional[dict]]) -> Optional[tuple[dict, dict]]:
        samples, skipped = _split_none(items)
        samples = images_first(samples)
        if self.captions is not None:
            samples, dropped = _as_caption_items(samples, self.encoder.processor, self.encoder.base.on_error)
            result = self.captions(samples) if samples else None
            if result is not None:
                result[1]["skipped"] = skipped + dropped + result[1]["skipped"]
                result[1]["questions"] = [s["prompt"] for s in samples if s["image_id"] in result[1]["image_ids"]]
            return result
        encoded = generation_inputs(self.encoder.base, samples, self._encode, _too_long_question)
        if encoded is None:
            return None
        samples, inputs, dropped = encoded
        meta = {
            "image_ids": [s["image_id"] for s in samples],
            "references": [list(s["answers"]) for s in samples],
            "questions": [turn_text(self.context(s)[-1]) for s in samples],
            "skipped": skipped + dropped,
        }
        return inputs, meta


def is_conversation_set(dataset) -> bool:
    """Whether `dataset` (or the set a `Subset` draws from) holds conversations."""
    from vlm_tune.data.conversation_dataset import ConversationDataset

    return isinstance(getattr(dataset, "dataset", dataset), ConversationDataset)


def train_collator_for(dataset, processor: Any, data_cfg: DataConfig, keep_vision_busy: bool = False):
    """The training collator of `dataset`: `ChatTrainCollator` for conversations, else `TrainCollator`."""
    if is_conversation_set(dataset):
        return ChatTrainCollator(processor, data_cfg, keep_vision_busy)
    return TrainCollator(processor, data_cfg)


def generate_collator_for(dataset, processor: Any, data_cfg: DataConfig):
    """The generation collator of `dataset`: `ChatGenerateCollator` for conversations, else `GenerateCollator`."""
    return (
        ChatGenerateCollator(processor, data_cfg)
        if is_conversation_set(dataset)
        else GenerateCollator(processor, data_cfg)
    )
