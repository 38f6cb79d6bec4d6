"""`ConversationDataset`: conversation records of one source, images loaded lazily when a sample is used.

An item is `{"image_id" (the sample's id), "images" (PIL RGB, in placeholder order), "messages", "answers"}`,
or a `SkippedSample` naming the image and why when one of its images cannot be decoded (`data.on_error: skip`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from vlm_tune.data.bad_samples import BadSampleLog, DataError, is_skipped
from vlm_tune.data.conversations import Conversation, read_hf_conversations, read_llava, read_messages, turn_text
from vlm_tune.data.dataset import load_or_skip
from vlm_tune.data.images import ImageLoadError, load_rgb
from vlm_tune.recipe import DataConfig, DataSourceConfig

logger = logging.getLogger("vlm_tune.data")

CONVERSATION_READERS = {"llava": read_llava, "messages": read_messages}


class ConversationDataset(Dataset):
    """Conversations of one source (the same interface as `CaptionDataset`).

    Attributes:
        bad_samples: `[{"image_id", "file", "reason"}]` found while building.
        source_path: the annotation file or folder this set was read from.
    """

    def __init__(self, records: list[Conversation], image_table, data_cfg: DataConfig, source_path: str, bad_samples):
        self.records = records
        self.image_table = image_table
        self.on_error = data_cfg.on_error
        self.max_image_pixels = data_cfg.max_image_pixels
        self.source_path = source_path
        self.bad_samples = bad_samples

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Conversations draw nothing per epoch; kept for the loop's interface."""

    def caption_lengths(self) -> list[int]:
        """Words per conversation: the length proxy for `group_by_length`."""
        return [sum(len(turn_text(m).split()) for m in r.messages) + 16 * r.image_count for r in self.records]

    def _load_images(self, record: Conversation) -> list:
        cap = self.max_image_pixels
        if record.row is None:
            return [load_rgb(path, max_pixels=cap) for path in record.images]
        name = f"row {record.row} of {self.source_path}"
        values = self.image_table[record.row][self.image_table.column_names[0]]  # [{"bytes", "path"}], undecoded
        images = []
        for value in values:
            if isinstance(value, dict) and value.get("bytes"):
                images.append(load_rgb(value["bytes"], name=name, max_pixels=cap))
            elif isinstance(value, dict) and value.get("path"):
                images.append(load_rgb(value["path"], max_pixels=cap))
            else:
                raise ImageLoadError(name, "an empty image")
        return images

    def __getitem__(self, index: int) -> Optional[dict]:
        record = self.records[index]
        images = load_or_skip(lambda: self._load_images(record), record.sample_id, self)
        if is_skipped(images):
            return images
        return {
            "image_id": record.sample_id,
            "images": images,
            "messages": record.messages,
            "answers": list(record.answers),
        }


def holds_conversations(source: DataSourceConfig) -> bool:
    """Whether `source` is read as conversations: formats llava and messages, or an hf set whose
    messages column is there and whose caption column is not."""
    if source.format in CONVERSATION_READERS:
        return True
    if source.format != "hf":
        return False
    from vlm_tune.data.sources import _load_local_hf

    columns = _load_local_hf(source).column_names
    return source.messages_column in columns and source.caption_column not in columns


def build_conversation_dataset(source: DataSourceConfig, data_cfg: DataConfig) -> ConversationDataset:
    """Read one conversation source into a lazily loading dataset.

    Raises:
        DataError: unreadable annotations, a bad sample with `data.on_error: raise`, or no usable sample left.
    """
    log = BadSampleLog(str(Path(source.path)), data_cfg.on_error)
    image_table = None
    if source.format == "hf":
        from vlm_tune.data.sources import _load_local_hf

        records, image_table = read_hf_conversations(source, log, _load_local_hf(source))
    else:
        records = CONVERSATION_READERS[source.format](source, log)
    usable = []
    for record in records:
        if source.limit is not None and len(usable) >= source.limit:
            break
        missing = next((path for path in record.images if not os.path.isfile(path)), None)
        if missing is not None:
            log.add(record.sample_id, missing, "image file not found")
            continue
        usable.append(record)
    if not usable:
        raise DataError(
            f"{source.path} ({source.format}): no usable conversation: read {len(records)} record(s), skipped "
            f"{log.counts() or 'nothing'}; check the path, the images folder and the layout (see the README)"
        )
    log.warn()
    return ConversationDataset(usable, image_table, data_cfg, str(source.path), log.records)
