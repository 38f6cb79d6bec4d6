"""Readers for the image-caption layouts people have, all producing the same `Record` list.

Formats (`data.<train|eval>.format`): coco, karpathy, jsonl, csv, imagefolder, hf. A reader
parses annotations only; images stay on disk until a sample is used. A broken record is reported
to the `BadSampleLog` (skipped and counted, or fatal with `data.on_error: raise`); a file that is
not the announced format at all is always a `DataError`, since nothing in it could be used.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vlm_tune.data.bad_samples import BadSampleLog, DataError
from vlm_tune.data.images import OutsideImageFolder, image_path
from vlm_tune.data.text_files import read_utf8, utf8_lines
from vlm_tune.recipe import DataSourceConfig


@dataclass
class Record:
    """One image and its raw captions, as read from the annotations."""

    image_id: str
    captions: list[Any]  # raw values; cleaned (and empty ones reported) by the dataset builder
    file: Optional[str] = None  # image file path
    row: Optional[int] = None  # row of a Hugging Face dataset holding the image (format hf)


@dataclass
class SourceData:
    """What a reader returns: the records and, for format hf, the table that holds the images."""

    records: list[Record]
    image_table: Any = None  # datasets.Dataset with only the image column, not decoded (format hf)
    image_column: Optional[str] = None


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found (check data.<train|eval>.path)")
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not a valid JSON {what} file ({exc})") from None


def _images_root(source: DataSourceConfig, default: Path) -> Path:
    return Path(source.images) if source.images else default


def _image_file(root: Path, entry: str, allow_outside: bool, log: BadSampleLog, image_id) -> Optional[str]:
    """The path of an annotation's image inside the set's image folder, or None (a bad sample, logged)."""
    try:
        return image_path(root, entry, allow_outside)
    except OutsideImageFolder as exc:
        log.add(str(image_id), entry, str(exc))
        return None


def _wanted_splits(source: DataSourceConfig) -> Optional[set[str]]:
    return set(source.split.split("+")) if source.split else None


def _no_split(source: DataSourceConfig, fmt: str) -> None:
    if source.split:
        raise DataError(
            f"{source.path}: split '{source.split}' given, but a {fmt} file holds one split; "
            f"point data.<train|eval>.path at that split's file and remove split"
        )


# ----------------------------------------------------------------------------------------------
# COCO captions: {"images": [{id, file_name, ...}], "annotations": [{id, image_id, caption}]}
# ----------------------------------------------------------------------------------------------


def read_coco(source: DataSourceConfig, log: BadSampleLog) -> SourceData:
    """COCO captions annotation JSON; image `file_name`s are relative to `images` (default: the
    JSON's folder, or its `images/` subfolder when the files are there)."""
    path = Path(source.path)
    _no_split(source, "COCO captions")
    raw = _read_json(path, "COCO captions annotation")
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("images"), list)
        or not isinstance(raw.get("annotations"), list)
    ):
        raise DataError(
            f"{path}: not a COCO captions file: expected top-level lists 'images' and "
            f"'annotations' (for Karpathy's dataset_*.json use format: karpathy)"
        )
    by_id: dict[Any, Record] = {}
    for position, entry in enumerate(raw["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            log.add(
                str(entry.get("id")) if isinstance(entry, dict) else None,
                None,
                f"broken record: images[{position}] needs 'id' and 'file_name'",
            )
            continue
        if entry["id"] in by_id:
            log.add(str(entry["id"]), entry["file_name"], f"broken record: images[{position}] repeats id {entry['id']}")
            continue
        by_id[entry["id"]] = Record(image_id=str(entry["id"]), captions=[], file=entry["file_name"])
    for position, annotation in enumerate(raw["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if image_id not in by_id or "caption" not in annotation:
            log.add(
                None if image_id is None else str(image_id),
                None,
                f"broken record: annotations[{position}] needs 'caption' and the 'image_id' of a listed image",
            )
            continue
        by_id[image_id].captions.append(annotation["caption"])
    records = list(by_id.values())
    root = _images_root(source, path.parent)
    first = records[0].file if records else None
    if not source.images and first and not (root / first).exists() and (root / "images" / first).exists():
        root = root / "images"  # the common <set>/captions_*.json + <set>/images/ layout
    for record in records:
        record.file = _image_file(root, record.file, source.allow_outside_paths, log, record.image_id)
    return SourceData([record for record in records if record.file is not None])


# ----------------------------------------------------------------------------------------------
# Karpathy splits: {"images": [{filepath?, filename, split, sentences: [{raw}], cocoid|imgid}]}
# ----------------------------------------------------------------------------------------------


def read_karpathy(source: DataSourceConfig, log: BadSampleLog) -> SourceData:
    """Karpathy split JSON (dataset_coco.json, dataset_flickr30k.json); `split` keeps one split
    ('train+restval' joins several); images live at `images`/filepath/filename."""
    path = Path(source.path)
    raw = _read_json(path, "Karpathy split")
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise DataError(
            f"{path}: not a Karpathy split file: expected a top-level list 'images' "
            f"(for COCO annotation files use format: coco)"
        )
    wanted = _wanted_splits(source)
    root = _images_root(source, path.parent)
    records, seen_splits = [], set()
    for position, entry in enumerate(raw["images"]):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("filename"), str)
            or not isinstance(entry.get("sentences"), list)
        ):
            log.add(None, None, f"broken record: images[{position}] needs 'filename' and a list 'sentences'")
            continue
        seen_splits.add(entry.get("split"))
        if wanted is not None and entry.get("split") not in wanted:
            continue
        image_id = entry.get("cocoid", entry.get("imgid", entry["filename"]))
        captions = [s.get("raw") if isinstance(s, dict) else None for s in entry["sentences"]]
        entry_path = os.path.join(entry.get("filepath", ""), entry["filename"])
        file = _image_file(root, entry_path, source.allow_outside_paths, log, image_id)
        if file is not None:
            records.append(Record(str(image_id), captions, file))
    if wanted is not None and not records and raw["images"]:
        raise DataError(
            f"{path}: no image in split '{source.split}'; splits in the file: {sorted(str(s) for s in seen_splits)}"
        )
    return SourceData(records)


# ----------------------------------------------------------------------------------------------
# Tables: JSONL / CSV / imagefolder metadata, one row per (image, caption) or (image, [captions])
# ----------------------------------------------------------------------------------------------


def _jsonl_rows(path: Path, log: BadSampleLog):
    for line_number, line in utf8_lines(path, log):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            log.add(None, None, f"broken record: line {line_number} is not valid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            log.add(None, None, f"broken record: line {line_number} is not a JSON object")
            continue
        yield line_number, row


def _csv_rows(path: Path, log: BadSampleLog):
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    for row in reader:
        if None in row or None in row.values():  # more or fewer cells than header columns
            log.add(
                None,
                None,
                f"broken record: line {reader.line_num} does not have the "
                f"{len(reader.fieldnames or [])} cells of the header",
            )
            continue
        yield reader.line_num, row


def _group_table(
    path: Path,
    rows,
    image_column: str,
    caption_column: str,
    root: Path,
    log: BadSampleLog,
    wanted: Optional[set[str]],
    field_hint: str,
    allow_outside: bool = False,
) -> list[Record]:
    """Group rows by image path, keeping first-seen order; a caption cell may be a list."""
    by_image: dict[str, Record] = {}
    checked_columns = False
    for line_number, row in rows:
        if not checked_columns:  # a wrong column name is a recipe error, not a bad sample
            missing = [c for c in (image_column, caption_column) if c not in row]
            if missing:
                raise DataError(
                    f"{path}: no column {missing} (columns: {sorted(row)}); set "
                    f"{field_hint}.image_column / caption_column to the right names"
                )
            if wanted is not None and "split" not in row:
                raise DataError(
                    f"{path}: split '{'+'.join(sorted(wanted))}' given but the rows have no "
                    f"'split' column (columns: {sorted(row)}); remove {field_hint}.split"
                )
            checked_columns = True
        if wanted is not None and row.get("split") not in wanted:
            continue
        image = row.get(image_column)
        if not isinstance(image, str) or not image.strip():
            log.add(None, None, f"broken record: line {line_number} has no image path in '{image_column}'")
            continue
        if caption_column not in row:
            log.add(image, str(root / image), f"broken record: line {line_number} has no '{caption_column}'")
            continue
        record = by_image.get(image)
        if record is None:
            image_id = str(row.get("image_id", image))
            file = _image_file(root, image, allow_outside, log, image_id)
            if file is None:
                continue
            record = by_image[image] = Record(image_id, [], file)
        caption = row[caption_column]
        record.captions.extend(caption if isinstance(caption, list) else [caption])
    return list(by_image.values())


def _read_table(source: DataSourceConfig, log: BadSampleLog, kind: str, rows) -> SourceData:
    path = Path(source.path)
    if not path.is_file():
        raise DataError(f"{path}: {kind} file not found (check data.<train|eval>.path)")
    records = _group_table(
        path,
        rows(path, log),
        source.image_column,
        source.caption_column,
        _images_root(source, path.parent),
        log,
        _wanted_splits(source),
        "data.<train|eval>",
        source.allow_outside_paths,
    )
    return SourceData(records)


def read_jsonl(source: DataSourceConfig, log: BadSampleLog) -> SourceData:
    """JSON Lines, one object per line with `image_column` (a path) and `caption_column`
    (a string or a list of strings); rows of the same image are merged."""
    return _read_table(source, log, "JSONL", _jsonl_rows)


def read_csv(source: DataSourceConfig, log: BadSampleLog) -> SourceData:
    """CSV with a header row, an `image_column` (a path) and a `caption_column`; rows of the same
    image are merged."""
    return _read_table(source, log, "CSV", _csv_rows)


def read_imagefolder(source: DataSourceConfig, log: BadSampleLog) -> SourceData:
    """Hugging Face imagefolder: a folder (or its `split` subfolder) with the images and a
    metadata.jsonl or metadata.csv whose `file_name` column names each image."""
    folder = Path(source.path)
    if source.split and (folder / source.split).is_dir():
        folder = folder / source.split
    image_column = "file_name" if source.image_column == "image" else source.image_column
    for name, rows in (("metadata.jsonl", _jsonl_rows), ("metadata.csv", _csv_rows)):
        metadata = folder / name
        if metadata.is_file():
            records = _group_table(
                metadata,
                rows(metadata, log),
                image_column,
                source.caption_column,
                _images_root(source, folder),
                log,
                None,
                "data.<train|eval>",
                source.allow_outside_paths,
            )
            return SourceData(records)
    raise DataError(
        f"{folder}: no metadata.jsonl or metadata.csv in the image folder "
        f"(the Hugging Face imagefolder layout; check data.<train|eval>.path / split)"
    )


# ----------------------------------------------------------------------------------------------
# Local Hugging Face datasets (save_to_disk folders, or folders of parquet/json/csv files)
# ----------------------------------------------------------------------------------------------


def _load_local_hf(source: DataSourceConfig):
    import datasets  # heavy import, only for this format

    folder = Path(source.path)
    if not folder.exists():
        raise DataError(f"{folder}: dataset folder not found (check data.<train|eval>.path)")
    saved = any((folder / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json"))
    try:
        loaded = datasets.load_from_disk(str(folder)) if saved else datasets.load_dataset(str(folder))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{folder}: not a local Hugging Face dataset ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if source.split is None and len(splits) != 1:
            raise DataError(f"{folder}: the dataset has splits {splits}; set data.<train|eval>.split to one")
        if source.split is not None and source.split not in loaded:
            raise DataError(f"{folder}: no split '{source.split}'; the dataset has splits {splits}")
        return loaded[source.split or splits[0]]
    return loaded


def read_hf(source: DataSourceConfig, log: BadSampleLog) -> SourceData:
    """A local Hugging Face `datasets` dataset; `image_column` holds images (Image feature) or
    paths, `caption_column` a string or a list of strings per row."""
    import datasets

    table = _load_local_hf(source)
    missing = [c for c in (source.image_column, source.caption_column) if c not in table.column_names]
    if missing:
        raise DataError(
            f"{source.path}: no column {missing} (columns: {table.column_names}); set "
            f"data.<train|eval>.image_column / caption_column"
        )
    id_column = "image_id" if "image_id" in table.column_names else None
    ids = table[id_column] if id_column else range(len(table))
    in_table = isinstance(table.features[source.image_column], datasets.Image)
    paths = None if in_table else table[source.image_column]
    root = _images_root(source, Path(source.path))
    records = []
    for row, (image_id, caption) in enumerate(zip(ids, table[source.caption_column])):
        captions = caption if isinstance(caption, list) else [caption]
        if in_table:  # image stored in the table: loaded from its row when used
            records.append(Record(str(image_id), captions, row=row))
        elif isinstance(paths[row], str) and paths[row]:
            file = _image_file(root, paths[row], source.allow_outside_paths, log, image_id)
            records.extend([Record(str(image_id), captions, file=file)] if file else [])
        else:
            log.add(str(image_id), None, f"broken record: row {row} has no image path in '{source.image_column}'")
    image_table = None
    if in_table:  # keep only the image column, undecoded: rows are decoded one at a time when used
        image_table = table.select_columns([source.image_column]).cast_column(
            source.image_column, datasets.Image(decode=False)
        )
    return SourceData(records, image_table=image_table, image_column=source.image_column)


SOURCE_READERS: dict[str, Callable[[DataSourceConfig, BadSampleLog], SourceData]] = {
    "coco": read_coco,
    "karpathy": read_karpathy,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "imagefolder": read_imagefolder,
    "hf": read_hf,
}


def read_source(source: DataSourceConfig, log: BadSampleLog) -> SourceData:
    """Parse the annotations of one source with the reader of its format.

    Raises:
        DataError: unknown format (valid names listed), missing file, or a file not in that format.
    """
    reader = SOURCE_READERS.get(source.format)
    if reader is None:
        raise DataError(
            f"{source.path}: unknown data format '{source.format}', expected one of {sorted(SOURCE_READERS)}"
        )
    return reader(source, log)
