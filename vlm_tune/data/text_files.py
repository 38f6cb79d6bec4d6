"""Annotation text files read as UTF-8: a byte that is not UTF-8 is named with its line, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from vlm_tune.data.bad_samples import BadSampleLog, DataError


def utf8_lines(path: Path, log: BadSampleLog) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of `path`; a line that is not UTF-8 is a bad record (then skipped)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                log.add(
                    None,
                    None,
                    f"broken record: line {number} is not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1})",
                )


def read_utf8(path: Path) -> str:
    """The whole file as text.

    Raises:
        DataError: naming the file and the line of the first byte that is not UTF-8.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} on line {line}); save the file as UTF-8"
        ) from None
