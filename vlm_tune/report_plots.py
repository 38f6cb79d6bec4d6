"""What an evaluation shows a person: the contact sheet PNG and the markdown tables (summary, comparison)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont, ImageOps

from vlm_tune.data.bad_samples import is_skipped

THUMB_SIZE = 192  # pixels of each image on the contact sheet (small images are scaled up)
TEXT_LINES = {"question": 2, "prediction": 3, "reference": 3}  # wrapped lines shown per text kind
COLOURS = {"image_id": (90, 90, 90), "question": (60, 60, 60), "prediction": (20, 60, 190), "reference": (20, 120, 40)}
LABELS = {"question": "Q: ", "prediction": "pred: ", "reference": "ref: "}
PADDING = 8


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends with an ellipsis when text was cut."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and draw.textlength(lines[-1] + " …", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += " …"
    return lines or [""]


def contact_entries(dataset, rows: list[dict], limit: int) -> list[dict]:
    """The first `limit` captioned images (or answered questions) again, read from the dataset, with their texts.

    A conversation shows its first image (a blank square when it has none) and its question."""
    by_id = {row["image_id"]: row for row in rows}
    entries = []
    for index in range(len(dataset)):
        if len(entries) >= min(limit, len(rows)):
            break
        item = dataset[index]
        row = by_id.pop(str(item["image_id"]), None) if not is_skipped(item) else None
        if row is not None:
            images = [item["image"]] if "image" in item else item["images"]
            entries.append(
                {
                    "image": images[0] if images else Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), "white"),
                    "image_id": row["image_id"],
                    **({"question": row["question"]} if "question" in row else {}),
                    "prediction": row["prediction"],
                    "reference": row["references"][0] if row["references"] else "",
                }
            )
    return entries


def contact_sheet(entries: list[dict], path: str | Path, columns: int = 4) -> Path:
    """Draw images in a grid, each with its id, question (grey, if any), prediction (blue) and first reference
    (green).

    Args:
        entries: dicts with "image" (PIL image), "image_id", "prediction", "reference", optionally "question".
        path: the PNG file to write.
        columns: images per row.
    Returns:
        The PNG path.
    Raises:
        ValueError: no entries.
    """
    if not entries:
        raise ValueError("contact_sheet: no images to draw")
    font = _font()
    line_height = int(sum(font.getmetrics()) * 1.15) if hasattr(font, "getmetrics") else 14
    kinds = [k for k in TEXT_LINES if k != "question" or any("question" in e for e in entries)]
    text_height = line_height * (1 + sum(TEXT_LINES[k] for k in kinds))
    cell_width, cell_height = THUMB_SIZE + 2 * PADDING, THUMB_SIZE + text_height + 3 * PADDING
    columns = max(1, min(columns, len(entries)))
    rows = -(-len(entries) // columns)
    sheet = Image.new("RGB", (columns * cell_width, rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, entry in enumerate(entries):
        left, top = (index % columns) * cell_width + PADDING, (index // columns) * cell_height + PADDING
        thumb = ImageOps.contain(entry["image"].convert("RGB"), (THUMB_SIZE, THUMB_SIZE))
        sheet.paste(thumb, (left + (THUMB_SIZE - thumb.width) // 2, top + (THUMB_SIZE - thumb.height) // 2))
        draw.rectangle([left - 1, top - 1, left + THUMB_SIZE, top + THUMB_SIZE], outline=(200, 200, 200))
        y = top + THUMB_SIZE + PADDING
        draw.text((left, y), f"id {entry['image_id']}", fill=COLOURS["image_id"], font=font)
        y += line_height
        for kind in kinds:
            text = LABELS[kind] + (entry.get(kind) or "(empty)")
            for line in _wrap(draw, text, font, THUMB_SIZE, TEXT_LINES[kind]):
                draw.text((left, y), line, fill=COLOURS[kind], font=font)
                y += line_height
    path = Path(path)
    sheet.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------------------------


def _first(references: list) -> str:
    return references[0] if references else ""


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def summary_markdown(info: dict, rows: list[dict], examples: int = 10) -> str:
    """The evaluation folder's summary.md: metrics, settings and a few predictions.

    Args:
        info: the content of metrics.json ("metrics" plus the run description).
        rows: predictions as written to predictions.jsonl.
        examples: predictions shown.
    """
    decoding = "greedy" if info["num_beams"] == 1 else f"beam search ({info['num_beams']} beams)"
    lines = [
        f"# Evaluation of {info['model']}"
        + (f" ({Path(info['checkpoint']).name})" if info.get("checkpoint") else " (base model)"),
        "",
    ]
    lines += ["| metric | score |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.4f} |" for name, value in info["metrics"].items()]
    vqa = info.get("task") == "vqa"
    if "METEOR" not in info["metrics"] and not vqa:
        lines += ["", "METEOR was skipped: it needs Java (" + info.get("tokenizer", "") + " tokenizer used)."]
    lines += [
        "",
        f"- evaluation set: `{info['data']}`"
        + (f" (split `{info['split']}`)" if info.get("split") else "")
        + f", {info['num_images']} "
        + ("questions" if vqa else "images")
        + " scored"
        + (f", {info['skipped_images']} skipped (unreadable)" if info.get("skipped_images") else ""),
        f"- decoding: {decoding}, at most {info['max_new_tokens']} new tokens",
        f"- checkpoint: `{info['checkpoint']}`" if info.get("checkpoint") else "- checkpoint: none (base model)",
        "- exact match, VQA accuracy and ANLS in [0, 1] (vlm_tune/vqa_metrics.py)"
        if vqa
        else f"- tokenizer: {info.get('tokenizer')}; BLEU, METEOR, ROUGE-L in [0, 1], CIDEr-D on its 0-10 scale",
        "",
        f"## First {min(examples, len(rows))} predictions",
        "",
    ]
    if vqa:
        lines += ["| sample | question | prediction | first reference |", "| --- | --- | --- | --- |"]
    else:
        lines += ["| image | prediction | first reference |", "| --- | --- | --- |"]
    lines += [
        f"| {_cell(r['image_id'])} |"
        + (f" {_cell(r.get('question', ''))} |" if vqa else "")
        + f" {_cell(r['prediction'])} | {_cell(_first(r['references']))} |"
        for r in rows[:examples]
    ]
    return "\n".join(lines) + "\n"


def compare_markdown(
    name_a: str, info_a: dict, rows_a: list[dict], name_b: str, info_b: dict, rows_b: list[dict], examples: int = 5
) -> str:
    """Two evaluations side by side: metrics with deltas (B - A), then predictions of shared images.

    Args:
        name_a, name_b: labels of the two evaluations (e.g. their folders).
        info_a, info_b: their metrics.json contents.
        rows_a, rows_b: their predictions.jsonl rows.
        examples: shared images whose predictions are shown.
    """
    metrics_a, metrics_b = info_a["metrics"], info_b["metrics"]
    names = list(metrics_a) + [n for n in metrics_b if n not in metrics_a]
    lines = [
        "# Comparison",
        "",
        f"- A: `{name_a}` ({_describe(info_a)})",
        f"- B: `{name_b}` ({_describe(info_b)})",
        "",
        "| metric | A | B | B - A |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in names:
        a, b = metrics_a.get(name), metrics_b.get(name)
        delta = f"{b - a:+.4f}" if a is not None and b is not None else "n/a"
        lines.append(f"| {name} | {_number(a)} | {_number(b)} | {delta} |")
    if info_a.get("data") != info_b.get("data") or info_a.get("split") != info_b.get("split"):
        lines += ["", "**Warning:** the two evaluations used different evaluation sets; the scores are not comparable."]
    by_id_b = {r["image_id"]: r for r in rows_b}
    shared = [r for r in rows_a if r["image_id"] in by_id_b][:examples]
    if shared:
        lines += ["", "## Examples", "", "| image | A | B | first reference |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {_cell(r['image_id'])} | {_cell(r['prediction'])} | {_cell(by_id_b[r['image_id']]['prediction'])} "
            f"| {_cell(r['references'][0] if r['references'] else '')} |"
            for r in shared
        ]
    return "\n".join(lines) + "\n"


def _describe(info: dict) -> str:
    checkpoint = info.get("checkpoint")
    return (
        f"{info.get('model')}, "
        + (f"checkpoint {Path(checkpoint).name}" if checkpoint else "base model")
        + f", {info.get('num_images')} images"
    )


def _number(value: Optional[float]) -> str:
    return f"{value:.4f}" if value is not None else "n/a"
