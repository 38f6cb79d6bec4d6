"""Bad-sample bookkeeping: the error type, the skip-or-raise policy, and the JSONL record.

A bad sample (missing or unreadable image, empty caption, broken record, too long for
`data.max_length`) is either skipped and recorded (`data.on_error: skip`, the default) or turned
into a `DataError` naming the file and the record (`data.on_error: raise`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from vlm_tune.errors import VlmTuneError

logger = logging.getLogger("vlm_tune.data")

SHOWN_IN_LOG = 5  # offenders named in the warning; the JSONL file holds all of them


class DataError(VlmTuneError, ValueError):
    """A data set or sample that cannot be used; the message names the file, the record and the fix."""


def bad_record(image_id: Optional[str], file: Optional[str], reason: str) -> dict:
    """One bad-sample record as saved in the run folder."""
    return {"image_id": image_id, "file": file, "reason": reason}


class SkippedSample(dict):
    """What a dataset gives for a sample it skips (`data.on_error: skip`): that sample's bad-sample record.

    Collators leave it out of the batch and list it in the batch's "skipped", so bad_samples.jsonl names
    the image and the reason even when the image was read in a DataLoader worker.
    """


def is_skipped(item) -> bool:
    """True for the item of a skipped sample (a `SkippedSample`, or None from a dataset that returns None)."""
    return item is None or isinstance(item, SkippedSample)


class BadSampleLog:
    """Collects bad samples of one source under the `data.on_error` policy.

    Args:
        source: the annotation file or folder, named in errors.
        on_error: "skip" records the sample; "raise" raises `DataError` at once.
    """

    def __init__(self, source: str, on_error: str):
        self.source = source
        self.on_error = on_error
        self.records: list[dict] = []

    def add(self, image_id: Optional[str], file: Optional[str], reason: str) -> None:
        """Record one bad sample, or raise when `on_error` is "raise".

        Raises:
            DataError: naming the source, the image file / record and how to skip instead.
        """
        if self.on_error == "raise":
            where = f"image {file}" if file else f"record {image_id}"
            raise DataError(
                f"{self.source}: {where}: {reason} (set data.on_error: skip to skip and count such samples)"
            )
        self.records.append(bad_record(image_id, file, reason))

    def counts(self) -> dict[str, int]:
        """Number of bad samples per reason kind (the text before the first ':' or '(')."""
        return dict(Counter(reason_kind(r["reason"]) for r in self.records))

    def warn(self) -> None:
        """Log one warning with the counts and the first few offenders (nothing when clean)."""
        if not self.records:
            return
        shown = "; ".join(f"{r['file'] or r['image_id']}: {r['reason']}" for r in self.records[:SHOWN_IN_LOG])
        more = f" (and {len(self.records) - SHOWN_IN_LOG} more)" if len(self.records) > SHOWN_IN_LOG else ""
        logger.warning(
            "%s: skipped %d bad sample(s) %s: %s%s", self.source, len(self.records), self.counts(), shown, more
        )


def reason_kind(reason: str) -> str:
    """The short kind of a reason text, e.g. 'image file not found' from 'image file not found: x.jpg'."""
    return reason.split(":")[0].split("(")[0].strip()


def write_bad_samples(records: Iterable[dict], path: str | Path, append: bool = True) -> int:
    """Save bad-sample records as JSONL (one `{"image_id", "file", "reason", ...}` object a line).

    Args:
        records: dicts such as `CaptionDataset.bad_samples` or a batch's `"skipped"` list.
        path: the JSONL file, typically `<run folder>/bad_samples.jsonl`; parent folders are created.
        append: add to an existing file (the train loop appends each batch's skips) instead of replacing it.
    Returns:
        The number of records written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("a" if append else "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            written += 1
    return written
