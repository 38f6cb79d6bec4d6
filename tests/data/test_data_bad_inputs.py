"""Bad data: skipped, counted, named in the log and saved (on_error: skip), or fatal naming the file (raise)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from data_fixtures import data_cfg, make_image, source, write_coco, write_csv, write_jsonl

from vlm_tune.data import DataError, build_dataset, write_bad_samples
from vlm_tune.data.bad_samples import is_skipped


def _coco(tmp_path, captions):
    path = write_coco(tmp_path, captions)
    return source(path, images=str(tmp_path / "val2017"))


def test_missing_image_skip_counts_and_names_it(tmp_path, caplog):
    config = _coco(tmp_path, {"a.png": ["a"], "missing_b.png": ["b"], "c.png": ["c"]})
    with caplog.at_level(logging.WARNING, logger="vlm_tune.data"):
        dataset = build_dataset(config, data_cfg(), train=True)
    assert [s["captions"] for s in dataset] == [["a"], ["c"]]
    assert len(dataset.bad_samples) == 1
    bad = dataset.bad_samples[0]
    assert bad["image_id"] == "397134" and bad["file"].endswith("missing_b.png")
    assert bad["reason"] == "image file not found"
    assert "missing_b.png" in caplog.text and "skipped 1 bad sample" in caplog.text


def test_missing_image_raise_names_the_file_and_the_setting(tmp_path):
    config = _coco(tmp_path, {"a.png": ["a"], "missing_b.png": ["b"]})
    with pytest.raises(DataError, match=r"missing_b\.png: image file not found.*data\.on_error"):
        build_dataset(config, data_cfg(on_error="raise"), train=True)


def test_unreadable_image_skip_names_the_image_and_the_reason_and_logs(tmp_path, caplog):
    config = _coco(tmp_path, {"a.png": ["a"], "b.png": ["b"]})
    (tmp_path / "val2017" / "b.png").write_bytes(b"\x89PNG broken")
    dataset = build_dataset(config, data_cfg(), train=True)
    assert len(dataset) == 2  # found lazily, not at build time
    with caplog.at_level(logging.WARNING, logger="vlm_tune.data"):
        skipped = dataset[1]
    assert is_skipped(skipped) and not is_skipped(dataset[0])
    assert skipped["image_id"] == dataset.records[1].image_id and skipped["file"] == str(tmp_path / "val2017" / "b.png")
    assert skipped["reason"].startswith("unreadable image") and "b.png" in caplog.text


def test_unreadable_image_raise_names_the_file(tmp_path):
    config = _coco(tmp_path, {"a.png": ["a"], "b.png": ["b"]})
    (tmp_path / "val2017" / "b.png").write_bytes(b"\x89PNG broken")
    dataset = build_dataset(config, data_cfg(on_error="raise"), train=True)
    with pytest.raises(DataError, match=r"b\.png: unreadable image.*data\.on_error"):
        dataset[1]


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_empty_caption(tmp_path, on_error):
    config = _coco(tmp_path, {"a.png": ["a", "   "], "b.png": [""], "c.png": ["c"]})
    if on_error == "raise":
        with pytest.raises(DataError, match=r"a\.png: empty caption"):
            build_dataset(config, data_cfg(on_error=on_error), train=True)
        return
    dataset = build_dataset(config, data_cfg(on_error=on_error), train=True)
    assert [s["captions"] for s in dataset] == [["a"], ["c"]]  # b had no caption left
    assert [(b["image_id"], b["reason"]) for b in dataset.bad_samples] == [
        ("397133", "empty caption"),
        ("397134", "empty caption"),
    ]


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_broken_coco_annotation(tmp_path, on_error):
    path = write_coco(tmp_path, {"a.png": ["a"], "b.png": ["b"]})
    raw = json.loads(path.read_text())
    raw["annotations"].append({"image_id": 999, "id": 7, "caption": "orphan"})
    raw["annotations"].append({"image_id": 397133, "id": 8})  # no caption key
    path.write_text(json.dumps(raw))
    config = source(path, images=str(tmp_path / "val2017"))
    if on_error == "raise":
        with pytest.raises(DataError, match=r"record 999: broken record: annotations\[2\]"):
            build_dataset(config, data_cfg(on_error=on_error), train=True)
        return
    dataset = build_dataset(config, data_cfg(), train=True)
    assert len(dataset) == 2
    assert [b["reason"].split(":")[0] for b in dataset.bad_samples] == ["broken record"] * 2


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_broken_jsonl_line_and_csv_row(tmp_path, on_error):
    make_image(tmp_path / "a.png")
    jsonl = write_jsonl(tmp_path / "set.jsonl", [{"image": "a.png", "caption": "a"}])
    with jsonl.open("a") as handle:
        handle.write('{"image": "a.png", "caption": \n')
    csv_path = write_csv(tmp_path / "set.csv", ["image", "caption"], [["a.png", "a"], ["a.png", "b", "extra"]])
    for config in (source(jsonl, "jsonl"), source(csv_path, "csv")):
        if on_error == "raise":
            with pytest.raises(DataError, match=r"broken record: line [23]"):
                build_dataset(config, data_cfg(on_error=on_error), train=True)
            continue
        dataset = build_dataset(config, data_cfg(), train=True)
        assert dataset[0]["captions"] == ["a"] and len(dataset.bad_samples) == 1


def test_corrupt_annotation_file_is_always_fatal(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text('{"images": [')
    with pytest.raises(DataError, match="not a valid JSON"):
        build_dataset(source(path), data_cfg(), train=True)
    with pytest.raises(DataError, match="file not found"):
        build_dataset(source(tmp_path / "nothing.json"), data_cfg(), train=True)


def test_a_set_that_ends_up_empty_is_a_clear_error(tmp_path):
    config = _coco(tmp_path, {"missing_a.png": ["a"], "missing_b.png": ["b"], "c.png": [" "]})
    with pytest.raises(
        DataError,
        match=r"no usable sample: read 3 image.*'image file not found': 2.*"
        r"'empty caption': 1",
    ):
        build_dataset(config, data_cfg(), train=True)


def test_bad_samples_are_saved_as_jsonl(tmp_path):
    config = _coco(tmp_path, {"a.png": ["a"], "missing_b.png": ["b"]})
    dataset = build_dataset(config, data_cfg(), train=True)
    out = tmp_path / "run" / "bad_samples.jsonl"
    assert write_bad_samples(dataset.bad_samples, out) == 1
    assert write_bad_samples([{"image_id": "x", "reason": "too long"}], out) == 1  # appends
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["file"].endswith("missing_b.png") and lines[1]["image_id"] == "x"


def test_one_bad_jpeg_does_not_stop_a_worker_dataloader(tmp_path):
    config = _coco(tmp_path, {f"{i}.jpg": [f"image {i}"] for i in range(8)})
    (tmp_path / "val2017" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dataset = build_dataset(config, data_cfg(), train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=list)
    items = [item for batch in loader for item in batch]
    assert [item["caption"] for item in items if not is_skipped(item)] == [f"image {i}" for i in range(8) if i != 3]
    skipped = [item for item in items if is_skipped(item)]  # the record crosses from the worker process
    assert len(skipped) == 1 and skipped[0]["file"].endswith("3.jpg") and "unreadable image" in skipped[0]["reason"]
