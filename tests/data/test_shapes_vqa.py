"""The shipped shapes VQA set: a byte-for-byte regeneration, answers that the pixels confirm, held-out images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_shapes_set import _blobs

from vlm_tune.data import build_dataset
from vlm_tune.data.shapes import COLOURS, NOVEL_COMBINATIONS, POSITIONS, make_scene
from vlm_tune.data.shapes_vqa import REFERENCES_PER_QUESTION, main
from vlm_tune.recipe import DataConfig, DataSourceConfig

ROOT = Path(__file__).resolve().parents[2] / "data"
SPLITS = ("train", "val", "test", "test_novel")


def _lines(split: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "shapes_vqa" / f"{split}.jsonl").read_text().splitlines()]


def test_shipped_files_equal_a_regeneration(tmp_path):
    main(["--out", str(tmp_path / "shapes_vqa"), "--shapes", str(tmp_path / "shapes")])  # same relative paths
    for split in SPLITS:
        assert (tmp_path / "shapes_vqa" / f"{split}.jsonl").read_bytes() == (
            ROOT / "shapes_vqa" / f"{split}.jsonl"
        ).read_bytes()


def _shapes_in(image: Image.Image) -> list[tuple[str, float, float]]:
    """(colour name, centre x, centre y) of every shape drawn, from the pixels."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    found = []
    for name, rgb in COLOURS.items():
        for blob in _blobs(np.abs(pixels - np.array(rgb)).sum(-1) < 30):
            if len(blob) > 8:
                ys, xs = zip(*blob)
                found.append((name, sum(xs) / len(xs), sum(ys) / len(ys)))
    return found


def _place(question: str) -> str | None:
    return next((place for place in POSITIONS if question.endswith(f"{place}?")), None)


@pytest.mark.parametrize("split", ["val", "test_novel"])
def test_answers_agree_with_the_pixels(split):
    checked = 0
    for line in _lines(split)[:120]:
        question, answer = line["messages"][0]["content"][1]["text"], line["messages"][1]["content"][0]["text"]
        shapes = _shapes_in(Image.open(ROOT / "shapes_vqa" / line["images"][0]))
        assert len(line["answers"]) == REFERENCES_PER_QUESTION and answer in line["answers"]
        if line["kind"] == "count" and question.startswith("How many shapes"):
            assert int(answer) == len(shapes), line["id"]
        elif line["kind"] == "colour":
            colours = {name for name, _, _ in shapes}
            place = _place(question)
            if place is not None:  # "the shape on the left": the leftmost / topmost / ... shape
                key = {
                    "left": lambda s: s[1],
                    "right": lambda s: -s[1],
                    "top": lambda s: s[2],
                    "bottom": lambda s: -s[2],
                }
                colours = {min(shapes, key=key[place])[0]}
            assert colours == {answer}, line["id"]
        elif line["kind"] == "position" and len(shapes) == 1:
            _, x, y = shapes[0]
            nearest = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)
            assert nearest == answer, line["id"]
        else:
            continue
        checked += 1
    assert checked > 40


def test_test_novel_asks_about_held_out_combinations_and_train_never_shows_them():
    for line in _lines("test_novel"):
        index = int(line["id"].split("_")[2])
        scene = make_scene("test_novel", index)
        assert any((s.colour, s.kind) in NOVEL_COMBINATIONS for s in scene.shapes)
        assert line["images"] == [f"../shapes/images/test_novel_{index:05d}.png"]
    for line in _lines("train"):
        scene = make_scene("train", int(line["id"].split("_")[1]))
        assert not any((s.colour, s.kind) in NOVEL_COMBINATIONS for s in scene.shapes)


def test_shipped_set_loads_as_conversations():
    path = str(ROOT / "shapes_vqa" / "train.jsonl")  # its images are ../shapes/images/...
    train = build_dataset(DataSourceConfig(format="messages", path=path, allow_outside_paths=True), DataConfig(), True)
    assert len(train) == 2000 and train.bad_samples == []
    item = train[0]
    assert [m["role"] for m in item["messages"]] == ["user", "assistant"] * 3 and len(item["images"]) == 1
    assert item["images"][0].size == (64, 64)
