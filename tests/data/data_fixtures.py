"""Tiny on-disk caption sets in the exact layouts of the real files, written into tmp_path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image

from vlm_tune.recipe import DataConfig, DataSourceConfig

COLOURS = [(200, 30, 30), (30, 160, 60), (40, 70, 210), (230, 200, 40), (120, 50, 160)]


def make_image(path: Path, colour=(200, 30, 30), size=(24, 16), mode: str = "RGB") -> Path:
    """Write a flat-colour image (any Pillow mode) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path


def write_coco(
    root: Path,
    captions: dict[str, list[str]],
    image_dir: str = "val2017",
    annotation_name: str = "annotations/captions_val2017.json",
) -> Path:
    """COCO 2017 captions layout: annotations/captions_val2017.json + val2017/<file_name>.

    Args:
        captions: file name -> its captions (a file that should be missing is simply not created
            when its name starts with 'missing').
    """
    images, annotations = [], []
    for number, (name, texts) in enumerate(captions.items()):
        image_id = 397133 + number
        if not name.startswith("missing"):
            make_image(root / image_dir / name, COLOURS[number % len(COLOURS)])
        images.append(
            {
                "license": 4,
                "file_name": name,
                "coco_url": f"http://images.cocodataset.org/val2017/{name}",
                "height": 16,
                "width": 24,
                "date_captured": "2013-11-14 17:02:52",
                "flickr_url": "http://farm7.staticflickr.com/6116/6255196340_da26cf2c9e_z.jpg",
                "id": image_id,
            }
        )
        for text in texts:
            annotations.append({"image_id": image_id, "id": 38 + len(annotations), "caption": text})
    raw = {
        "info": {
            "description": "COCO 2017 Dataset",
            "url": "http://cocodataset.org",
            "version": "1.0",
            "year": 2017,
            "contributor": "COCO Consortium",
            "date_created": "2017/09/01",
        },
        "licenses": [
            {
                "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
                "id": 1,
                "name": "Attribution-NonCommercial-ShareAlike License",
            }
        ],
        "images": images,
        "annotations": annotations,
    }
    path = root / annotation_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))
    return path


def write_karpathy_coco(root: Path) -> Path:
    """dataset_coco.json layout: images[] with filepath, filename, split, sentences[].raw, cocoid."""
    entries = []
    layout = [
        ("val2014", "test"),
        ("val2014", "val"),
        ("train2014", "train"),
        ("val2014", "restval"),
        ("train2014", "train"),
    ]
    for number, (folder, split) in enumerate(layout):
        name = f"COCO_{folder}_{number:012d}.jpg"
        make_image(root / folder / name, COLOURS[number])
        sentences = [
            {
                "tokens": ["a", "shape", str(number)],
                "raw": f"A shape number {number}. ",
                "imgid": number,
                "sentid": 10 * number,
            },
            {"tokens": ["colour", str(number)], "raw": f"Colour {number}", "imgid": number, "sentid": 10 * number + 1},
        ]
        entries.append(
            {
                "filepath": folder,
                "sentids": [10 * number, 10 * number + 1],
                "filename": name,
                "imgid": number,
                "split": split,
                "sentences": sentences,
                "cocoid": 391895 + number,
            }
        )
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def write_karpathy_flickr(root: Path) -> Path:
    """dataset_flickr30k.json layout: no filepath, no cocoid; images in flickr30k-images/."""
    entries = []
    for number, split in enumerate(["train", "train", "test"]):
        name = f"10000927{number}.jpg"
        make_image(root / "flickr30k-images" / name, COLOURS[number])
        sentences = [
            {"tokens": ["two", "guys"], "raw": f"Two young guys number {number}.", "imgid": number, "sentid": number}
        ]
        entries.append({"sentids": [number], "imgid": number, "sentences": sentences, "split": split, "filename": name})
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def source(path: Path | str, fmt: str = "coco", **fields) -> DataSourceConfig:
    return DataSourceConfig(format=fmt, path=str(path), **fields)


def data_cfg(**fields) -> DataConfig:
    return DataConfig(**fields)


def near(pixel, colour, tolerance: int = 8) -> bool:
    """Whether an RGB pixel matches a colour up to JPEG error."""
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))
