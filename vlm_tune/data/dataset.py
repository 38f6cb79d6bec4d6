"""`build_dataset`: one recipe source -> a `CaptionDataset` of lazily loaded image-caption samples.

Build time reads the annotations, cleans captions and checks that image files exist (cheap);
images are decoded only in `__getitem__`, where an unreadable file gives None (on_error: skip) or
a `DataError` naming the file (on_error: raise), so one bad JPEG never stops a long run.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Optional

from torch.utils.data import Dataset

from vlm_tune.data.bad_samples import BadSampleLog, DataError, SkippedSample, bad_record, is_skipped
from vlm_tune.data.images import ImageLoadError, load_rgb
from vlm_tune.data.sources import Record, SourceData, read_source
from vlm_tune.recipe import DataConfig, DataSourceConfig

logger = logging.getLogger("vlm_tune.data")


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A random generator that depends only on (seed, epoch, index), never on global state,
    so a resumed run or another worker draws the same caption and prompt for a sample."""
    return random.Random(f"vlm_tune:{seed}:{epoch}:{index}")  # str seeds are hashed with SHA-512


def clean_caption(caption: Any) -> Optional[str]:
    """Whitespace-normalised caption text, or None when it is empty or not text."""
    if not isinstance(caption, str):
        return None
    text = " ".join(caption.split())
    return text or None


class CaptionDataset(Dataset):
    """Image-caption samples of one source.

    An item is `{"image_id", "image" (PIL RGB), "captions" (all references), "caption" (the one
    drawn for this epoch in training, the first one in evaluation), "prompt"}`, or a `SkippedSample`
    naming the image and why when it cannot be decoded and `data.on_error` is "skip".

    Attributes:
        bad_samples: `[{"image_id", "file", "reason"}]` found while building (missing images,
            empty captions, broken records); save them with `write_bad_samples`.
        source_path: the annotation file or folder this set was read from.
    """

    def __init__(
        self,
        records: list[Record],
        source: SourceData,
        data_cfg: DataConfig,
        train: bool,
        seed: int,
        source_path: str,
        bad_samples: list[dict],
    ):
        self.records = records
        self.image_table = source.image_table
        self.image_column = source.image_column
        self.prompts = [data_cfg.prompt] if isinstance(data_cfg.prompt, str) else list(data_cfg.prompt)
        self.on_error = data_cfg.on_error
        self.max_image_pixels = data_cfg.max_image_pixels
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.source_path = source_path
        self.bad_samples = bad_samples

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose caption and prompt draws `__getitem__` returns."""
        self.epoch = epoch

    def caption_lengths(self) -> list[int]:
        """Mean caption length in words per sample: the length proxy for `group_by_length`."""
        return [round(sum(len(c.split()) for c in r.captions) / len(r.captions)) for r in self.records]

    def _load_image(self, record: Record):
        if record.file is not None:
            return load_rgb(record.file, max_pixels=self.max_image_pixels)
        value = self.image_table[record.row][self.image_column]  # {"bytes", "path"}, undecoded
        name = f"row {record.row} of {self.source_path}"
        if isinstance(value, dict) and value.get("bytes"):
            return load_rgb(value["bytes"], name=name, max_pixels=self.max_image_pixels)
        if isinstance(value, dict) and value.get("path"):
            return load_rgb(value["path"], max_pixels=self.max_image_pixels)
        raise ImageLoadError(name, f"no image in column '{self.image_column}'")

    def __getitem__(self, index: int) -> Optional[dict]:
        record = self.records[index]
        image = load_or_skip(lambda: self._load_image(record), record.image_id, self)
        if is_skipped(image):
            return image
        if self.train:
            rng = sample_rng(self.seed, self.epoch, index)
            caption, prompt = rng.choice(record.captions), rng.choice(self.prompts)
        else:  # evaluation is the same every time: first caption as the loss target, first prompt
            caption, prompt = record.captions[0], self.prompts[0]
        return {
            "image_id": record.image_id,
            "image": image,
            "captions": list(record.captions),
            "caption": caption,
            "prompt": prompt,
        }


def load_or_skip(load, sample_id: str, dataset) -> Any:
    """`load()`, or the sample's `SkippedSample` record (logged) when it raises `ImageLoadError` and
    `dataset.on_error` is "skip".

    Raises:
        DataError: naming `dataset.source_path`, the sample and the image, when `on_error` is "raise".
    """
    try:
        return load()
    except ImageLoadError as exc:
        if dataset.on_error == "raise":
            raise DataError(
                f"{dataset.source_path}: sample {sample_id}: {exc} "
                f"(set data.on_error: skip to skip and count such samples)"
            ) from None
        logger.warning("skipping sample %s: %s", sample_id, exc)
        return SkippedSample(bad_record(sample_id, exc.image, exc.reason or str(exc)))


def _usable_records(records: list[Record], log: BadSampleLog, limit: Optional[int]) -> list[Record]:
    """Clean captions and check image files, in order, until `limit` usable records are found."""
    usable = []
    for record in records:
        if limit is not None and len(usable) >= limit:
            break
        captions = []
        for raw in record.captions:
            text = clean_caption(raw)
            if text is None:
                kind = "empty caption" if raw is None or isinstance(raw, str) else f"caption is not text ({raw!r})"
                log.add(record.image_id, record.file, kind)
            else:
                captions.append(text)
        if not captions:
            if not record.captions:
                log.add(record.image_id, record.file, "no caption for this image")
            continue
        if record.file is not None and not os.path.isfile(record.file):
            log.add(record.image_id, record.file, "image file not found")
            continue
        record.captions = captions
        usable.append(record)
    return usable


def build_dataset(source: DataSourceConfig, data_cfg: DataConfig, train: bool, seed: int = 0) -> CaptionDataset:
    """Read one recipe source (`data.train` or `data.eval`) into a lazily loading dataset (a
    `ConversationDataset` for conversation sets, see vlm_tune/data/conversations.py).

    Args:
        source: format, path, images folder, split, column names and limit of the set.
            Relative paths resolve against the current working directory.
        data_cfg: the `data` section (prompt, on_error).
        train: draw one caption per epoch (training) or keep the first as target (evaluation).
        seed: base of the per-(epoch, index) caption and prompt draws.
    Returns:
        The `CaptionDataset`; its `bad_samples` lists what was skipped while building.
    Raises:
        DataError: unreadable annotations, a bad sample with `data.on_error: raise`, or no usable
            sample left (the message counts what was skipped and why).
    """
    from vlm_tune.data.conversation_dataset import build_conversation_dataset, holds_conversations

    if holds_conversations(source):  # llava, messages, or hf with a messages column: ConversationDataset
        return build_conversation_dataset(source, data_cfg)
    if source.task == "vqa":
        raise DataError(
            f"{source.path}: task vqa needs conversations, but the set has a caption column "
            f"'{source.caption_column}' and is read as captions; point data.<train|eval>.caption_column elsewhere"
        )
    log = BadSampleLog(str(Path(source.path)), data_cfg.on_error)
    data = read_source(source, log)
    records = _usable_records(data.records, log, source.limit)
    if not records:
        skipped = log.counts() or "nothing"
        raise DataError(
            f"{source.path} ({source.format}): no usable sample: read {len(data.records)} image "
            f"record(s), skipped {skipped}; check the path, images folder, split and column names"
        )
    log.warn()
    return CaptionDataset(records, data, data_cfg, train, seed, str(source.path), log.records)
