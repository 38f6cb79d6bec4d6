"""The shipped shapes set: deterministic, captions that state what is drawn, held-out combinations."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_tune.data import build_dataset
from vlm_tune.data.shapes import (
    COLOURS,
    NOVEL_COMBINATIONS,
    SPLIT_SIZES,
    annotation_bytes,
    draw_scene,
    file_name,
    main,
    make_scene,
    scene_captions,
    split_annotations,
)
from vlm_tune.recipe import DataConfig, DataSourceConfig

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "shapes"
SMALL = ["--train", "12", "--val", "3", "--test", "3", "--test-novel", "4"]


def _blobs(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask (small images only)."""
    seen, blobs = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        blob, queue = [], deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        blobs.append(blob)
    return blobs


def test_regeneration_is_bit_identical(tmp_path):
    main(["--out", str(tmp_path / "one"), *SMALL])
    main(["--out", str(tmp_path / "two"), *SMALL])
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 4 + 12 + 3 + 3 + 4
    for relative in files:
        assert (tmp_path / "one" / relative).read_bytes() == (tmp_path / "two" / relative).read_bytes()


def test_shipped_annotations_equal_a_regeneration():
    for split, count in SPLIT_SIZES.items():
        committed = (SHIPPED / f"captions_{split}.json").read_bytes()
        assert committed == annotation_bytes(split_annotations(split, count)), split


def test_shipped_images_equal_a_regeneration_pixel_for_pixel():
    for split, count in SPLIT_SIZES.items():
        for index in range(0, count, 37):
            with Image.open(SHIPPED / "images" / file_name(split, index)) as committed:
                assert committed.size == (64, 64)
                assert committed.convert("RGB").tobytes() == draw_scene(make_scene(split, index)).tobytes()


def test_shipped_set_is_coco_layout_and_loads():
    raw = json.loads((SHIPPED / "captions_val.json").read_text())
    assert set(raw["images"][0]) == {"id", "file_name", "width", "height"}
    assert set(raw["annotations"][0]) == {"id", "image_id", "caption"}
    per_image = {}
    for annotation in raw["annotations"]:
        per_image[annotation["image_id"]] = per_image.get(annotation["image_id"], 0) + 1
    assert len(per_image) == 200 and all(3 <= n <= 5 for n in per_image.values())
    dataset = build_dataset(
        DataSourceConfig(format="coco", path=str(SHIPPED / "captions_val.json")), DataConfig(), train=False
    )
    assert len(dataset) == 200 and dataset[0]["image"].size == (64, 64)


def test_novel_combinations_appear_only_in_test_novel():
    for split, count in SPLIT_SIZES.items():
        for index in range(count):
            looks = {(s.colour, s.kind) for s in make_scene(split, index).shapes}
            assert bool(looks & set(NOVEL_COMBINATIONS)) == (split == "test_novel"), (split, index)


@pytest.mark.parametrize("split", ["train", "test_novel"])
def test_captions_state_what_is_drawn(split):
    word_of_count = {1: None, 2: "two", 3: "three"}
    phrasings = set()
    for index in range(150):
        scene = make_scene(split, index)
        captions = scene_captions(scene, split, index)
        assert 3 <= len(captions) == len(set(captions)) <= 5
        pixels = np.asarray(draw_scene(scene)).astype(int)
        for shape in scene.shapes:  # the shape's colour is drawn at its centre, and named in every caption
            assert tuple(pixels[shape.y, shape.x]) == COLOURS[shape.colour]
            assert all(shape.colour in c and shape.kind in c for c in captions), captions
        blobs = _blobs((pixels != 255).any(axis=2))
        assert len(blobs) == len(scene.shapes)
        if scene.layout == "count":
            assert all(c.split()[0] in (word_of_count[len(blobs)], "there") for c in captions)
        if scene.layout == "single":
            ys, xs = zip(*blobs[0])
            centre_y, centre_x = np.mean(ys), np.mean(xs)
            expected = {
                "left": centre_x < 26,
                "right": centre_x > 38,
                "top": centre_y < 26,
                "bottom": centre_y > 38,
                "centre": 26 <= centre_x <= 38 and 26 <= centre_y <= 38,
            }
            assert expected[scene.arrangement], (index, scene)
            assert any(scene.arrangement in c for c in captions) or all(len(c.split()) <= 4 for c in captions)
        phrasings.update(" ".join("X" if w in COLOURS else w for w in c.split()) for c in captions)
    assert len(phrasings) > 40  # wording varies, not one template


def test_different_content_gives_different_captions():
    seen: dict[tuple, set] = {}
    for index in range(300):
        scene = make_scene("train", index)
        key = tuple(sorted((s.colour, s.kind) for s in scene.shapes))
        seen.setdefault(key, set()).update(scene_captions(scene, "train", index))
    keys = list(seen)
    overlaps = [seen[a] & seen[b] for i, a in enumerate(keys) for b in keys[i + 1 :]]
    assert not any(overlaps)
