"""Conversation sets: LLaVA JSON, chat-style `messages` JSONL and Hugging Face datasets with a messages column.

Every reader produces `Conversation` records in one layout, the Hugging Face chat layout with content parts:
    messages = [{"role": "system" | "user" | "assistant", "content": [{"type": "image"} | {"type": "text", "text"}]}]
    images   = the image files in the order of their placeholders (text-only conversations have none)
    answers  = the reference answers of the last assistant turn (VQA scoring): the record's "answers", else its text
A record is bad (named, then skipped or fatal under `data.on_error`) when its roles or parts are unknown, it has
no assistant turn or does not end with one, an assistant turn holds an image or no text, the placeholders and
images differ in number, or an image is a URL (nothing is downloaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vlm_tune.data.bad_samples import BadSampleLog, DataError
from vlm_tune.data.images import OutsideImageFolder, image_path
from vlm_tune.data.text_files import read_utf8, utf8_lines
from vlm_tune.recipe import DataSourceConfig

IMAGE_PLACEHOLDER = "<image>"  # in LLaVA values and in string contents of `messages`
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


class BadConversation(ValueError):
    """A record that cannot be used; the message says why."""


@dataclass
class Conversation:
    """One conversation as read from the annotations (images not loaded)."""

    sample_id: str
    messages: list[dict]
    images: list[str] = field(default_factory=list)  # files, in placeholder order (empty for format hf tables)
    answers: list[str] = field(default_factory=list)
    row: Optional[int] = None  # format hf with images stored in the table: the row holding them
    image_count: int = 0


# ----------------------------------------------------------------------------------------------
# Parts and turns
# ----------------------------------------------------------------------------------------------


def _text_parts(text: str) -> list[dict]:
    """A string with `<image>` placeholders -> text and image parts (whitespace next to a placeholder dropped)."""
    parts: list[dict] = []
    for position, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if position:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _image_source(part: dict) -> Optional[str]:
    """The path an image part names itself (`image`, `path`, `url` or OpenAI's `image_url`), or None."""
    for key in ("image", "path", "url"):
        if isinstance(part.get(key), str) and part[key]:
            return part[key]
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    return url if isinstance(url, str) and url else None


def _content_parts(content: Any, named_images: list[Optional[str]]) -> list[dict]:
    """One turn's content (a string or a list of parts) -> normalised parts; image sources go to `named_images`."""
    if isinstance(content, str):
        parts = _text_parts(content)
        named_images += [None] * sum(p["type"] == "image" for p in parts)
        return parts
    if not isinstance(content, list):
        raise BadConversation(f"content is {type(content).__name__}, expected a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts += _text_parts(part["text"])
            named_images += [None] * sum(p["type"] == "image" for p in _text_parts(part["text"]))
        elif kind in ("image", "image_url"):
            parts.append({"type": "image"})
            named_images.append(_image_source(part))
        else:
            raise BadConversation(f"unknown content part {part!r}; expected type text or image")
    return parts


def _check_turns(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise BadConversation("no assistant turn: nothing to learn or to score")
    if roles[-1] != "assistant":
        raise BadConversation(f"the last turn is a {roles[-1]} turn; a conversation ends with an assistant turn")
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            if any(p["type"] == "image" for p in message["content"]):
                raise BadConversation(f"turn {index} (assistant) holds an image; images belong to user turns")
            if not turn_text(message):
                raise BadConversation(f"turn {index} (assistant) has no text")


def turn_text(message: dict) -> str:
    """The text of one turn (its text parts joined by spaces)."""
    return " ".join(p["text"] for p in message["content"] if p["type"] == "text").strip()


def count_images(messages: list[dict]) -> int:
    """Image placeholders in `messages`."""
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def _resolve_images(named: list[Optional[str]], listed: list, root: Path, allow_outside: bool) -> list[str]:
    """Image files in placeholder order: a part's own path, else the next entry of the record's image list."""
    listed = list(listed)
    if any(n is None for n in named) and any(n is not None for n in named):
        raise BadConversation("some image parts name a file and others do not; name all, or list them in 'images'")
    if all(n is None for n in named):
        if len(listed) != len(named):
            raise BadConversation(f"{len(named)} image placeholder(s) but {len(listed)} image(s)")
        named = listed
    elif listed and listed != named:
        raise BadConversation("image parts name files and 'images' lists others; give the files one way")
    files = []
    for entry in named:
        entry = entry.get("path") if isinstance(entry, dict) else entry
        if not isinstance(entry, str) or not entry:
            raise BadConversation(f"image entry {entry!r} is not a path")
        if entry.startswith(("http://", "https://")):
            raise BadConversation(f"image {entry} is a URL; nothing is downloaded: give a local path")
        try:
            files.append(image_path(root, entry.removeprefix("file://"), allow_outside))
        except OutsideImageFolder as exc:
            raise BadConversation(str(exc)) from None
    return files


def _answers(raw: Any, messages: list[dict]) -> list[str]:
    if raw is None:
        return [turn_text(messages[-1])]
    answers = [raw] if isinstance(raw, str) else raw
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise BadConversation(f"'answers' must be a non-empty list of strings, got {raw!r}")
    return [" ".join(a.split()) for a in answers]


def make_conversation(
    sample_id: str,
    turns: list[tuple[str, Any]],
    listed_images: Any,
    answers: Any,
    root: Path,
    in_table: bool = False,
    allow_outside: bool = False,
) -> Conversation:
    """Validate one record: `turns` = [(role, content)], `listed_images` = the record's image list (paths inside
    `root`, unless `allow_outside`).

    Raises:
        BadConversation: the record breaks one of the rules of the module docstring.
    """
    named: list[Optional[str]] = []
    messages = []
    for index, (role, content) in enumerate(turns):
        if role not in ROLES:
            raise BadConversation(f"turn {index} has role {role!r}; expected one of {list(ROLES)}")
        messages.append({"role": role, "content": _content_parts(content, named)})
    _check_turns(messages)
    listed = [] if listed_images is None else listed_images
    if not isinstance(listed, list):
        listed = [listed]
    if in_table:
        if len(listed) != len(named):
            raise BadConversation(f"{len(named)} image placeholder(s) but {len(listed)} image(s)")
        return Conversation(sample_id, messages, [], _answers(answers, messages), image_count=len(named))
    files = _resolve_images(named, listed, root, allow_outside)
    return Conversation(sample_id, messages, files, _answers(answers, messages), image_count=len(files))


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def _entries(path: Path, log: BadSampleLog, what: str) -> list[tuple[str, Any]]:
    """(where, entry) for a JSON list file or a JSONL file."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found (check data.<train|eval>.path)")
    with path.open("rb") as handle:
        is_list = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    if is_list:
        try:
            return [(f"entry {i}", entry) for i, entry in enumerate(json.loads(read_utf8(path)))]
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not a valid JSON list of {what} records ({exc})") from None
    entries = []
    for number, line in utf8_lines(path, log):
        if not line.strip():
            continue
        try:
            entries.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            log.add(None, None, f"broken record: line {number} is not valid JSON ({exc.msg})")
    return entries


def _root(source: DataSourceConfig, default: Path) -> Path:
    return Path(source.images) if source.images else default


def _llava_turns(entry: dict) -> list[tuple[str, Any]]:
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadConversation("needs a list 'conversations' of {from, value} turns")
    for index, turn in enumerate(turns):
        if turn.get("from") not in LLAVA_ROLES or not isinstance(turn.get("value"), str):
            raise BadConversation(f"turn {index} needs 'from' in {sorted(LLAVA_ROLES)} and a string 'value'")
    return [(LLAVA_ROLES[t["from"]], t["value"]) for t in turns]


def _messages_turns(entry: dict, column: str = "messages") -> list[tuple[str, Any]]:
    turns = entry.get(column)
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "content" in t for t in turns):
        raise BadConversation(f"needs a list '{column}' of {{role, content}} turns")
    return [(t.get("role"), _drop_none(t["content"])) for t in turns]


def _drop_none(content: Any) -> Any:
    """Parts as `datasets` stores them: every part has every key, unused ones None."""
    if isinstance(content, list):
        return [
            {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part for part in content
        ]
    return content


def _read_records(source: DataSourceConfig, log: BadSampleLog, what: str, turns_of) -> list[Conversation]:
    path = Path(source.path)
    if source.split:
        raise DataError(f"{path}: split '{source.split}' given, but a {what} file holds one split; remove split")
    root = _root(source, path.parent)
    records = []
    for where, entry in _entries(path, log, what):
        if not isinstance(entry, dict):
            log.add(None, None, f"broken record: {where} is not a JSON object")
            continue
        sample_id = str(entry.get("id", where.replace(" ", "_")))
        images = entry.get("image", entry.get("images")) if what == "LLaVA" else entry.get("images")
        try:
            turns, answers, allow = turns_of(entry), entry.get("answers"), source.allow_outside_paths
            records.append(make_conversation(sample_id, turns, images, answers, root, allow_outside=allow))
        except BadConversation as exc:
            log.add(sample_id, None, f"broken record: {where}: {exc}")
    return records


def read_llava(source: DataSourceConfig, log: BadSampleLog) -> list[Conversation]:
    """LLaVA JSON (a list) or JSONL: `{"id", "image": str | [str], "conversations": [{"from", "value"}]}`."""
    return _read_records(source, log, "LLaVA", _llava_turns)


def read_messages(source: DataSourceConfig, log: BadSampleLog) -> list[Conversation]:
    """JSONL in the chat layout: `{"id"?, "messages": [{"role", "content"}], "images"?: [...], "answers"?: [...]}`."""
    return _read_records(source, log, "messages", _messages_turns)


def read_hf_conversations(source: DataSourceConfig, log: BadSampleLog, table) -> tuple[list[Conversation], Any]:
    """A local `datasets` table with `messages_column` and (optional) `images_column` (Image features or paths).

    Returns:
        (records, the images column alone and undecoded, or None when the images are paths or absent)
    """
    import datasets

    images_column = source.images_column if source.images_column in table.column_names else None
    feature = table.features[images_column] if images_column else None
    inner = getattr(feature, "feature", None) if isinstance(feature, (list, datasets.Sequence)) else None
    if isinstance(feature, list) and feature:
        inner = feature[0]
    in_table = isinstance(inner, datasets.Image)
    rows = table.select_columns(
        [c for c in (source.messages_column, images_column, "id", "answers") if c in table.column_names]
    )
    if in_table:
        rows = rows.cast_column(images_column, datasets.Sequence(datasets.Image(decode=False)))
    root = _root(source, Path(source.path))
    records = []
    for row, entry in enumerate(rows):
        sample_id = str(entry.get("id", row))
        images = entry.get(images_column) if images_column else None
        try:
            turns = _messages_turns(entry, source.messages_column)
            record = make_conversation(
                sample_id, turns, images, entry.get("answers"), root, in_table, source.allow_outside_paths
            )
        except BadConversation as exc:
            log.add(sample_id, None, f"broken record: row {row}: {exc}")
            continue
        record.row = row if in_table else None
        records.append(record)
    image_table = rows.select_columns([images_column]) if in_table else None
    return records, image_table
