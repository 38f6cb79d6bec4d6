"""Hostile or odd inputs: image paths that leave the image folder, images far bigger than any model needs,
annotation files that are not UTF-8. Each is a named bad sample or one error line, never a file read from
elsewhere, a gigabyte decode or a traceback."""

from __future__ import annotations

import json

import pytest
from data_fixtures import data_cfg, make_image, source, write_coco, write_jsonl
from PIL import Image, ImageFile

from vlm_tune.data import DataError, build_dataset


def _outside_and_inside(tmp_path):
    """A set in tmp_path/set naming one image inside it, one by `../` and one by an absolute path outside."""
    make_image(tmp_path / "set" / "images" / "inside.png")
    secret = make_image(tmp_path / "private" / "secret.png")
    rows = [
        {"image": "inside.png", "caption": "inside"},
        {"image": "../../private/secret.png", "caption": "climbs out"},
        {"image": str(secret), "caption": "absolute"},
    ]
    return write_jsonl(tmp_path / "set" / "captions.jsonl", rows), secret


def test_image_paths_outside_the_image_folder_are_named_bad_samples(tmp_path):
    annotations, secret = _outside_and_inside(tmp_path)
    dataset = build_dataset(source(annotations, "jsonl", images=str(tmp_path / "set" / "images")), data_cfg(), True)
    assert [record.file for record in dataset.records] == [str(tmp_path / "set" / "images" / "inside.png")]
    assert [bad["file"] for bad in dataset.bad_samples] == ["../../private/secret.png", str(secret)]
    assert all("leads outside the image folder" in bad["reason"] for bad in dataset.bad_samples)
    assert all("allow_outside_paths: true" in bad["reason"] for bad in dataset.bad_samples)

    allowed = source(annotations, "jsonl", images=str(tmp_path / "set" / "images"), allow_outside_paths=True)
    assert len(build_dataset(allowed, data_cfg(), True)) == 3


def test_coco_and_conversation_paths_are_confined_too(tmp_path):
    annotations = write_coco(tmp_path / "coco", {"a.png": ["a"]})
    raw = json.loads(annotations.read_text())
    raw["images"].append({**raw["images"][0], "id": 7, "file_name": "../../../etc/passwd"})
    raw["annotations"].append({"image_id": 7, "id": 99, "caption": "not an image of this set"})
    annotations.write_text(json.dumps(raw))
    coco = build_dataset(source(annotations, images=str(tmp_path / "coco" / "val2017")), data_cfg(), True)
    assert len(coco) == 1 and coco.bad_samples[0]["file"] == "../../../etc/passwd"

    make_image(tmp_path / "chat" / "a.png")
    turns = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "red"}]
    chat = write_jsonl(
        tmp_path / "chat" / "chat.jsonl",
        [{"messages": turns, "images": ["a.png"]}, {"messages": turns, "images": ["../coco/val2017/a.png"]}],
    )
    conversations = build_dataset(source(chat, "messages"), data_cfg(), True)
    assert len(conversations) == 1 and "leads outside the image folder" in conversations.bad_samples[0]["reason"]


def _decodes(monkeypatch) -> list:
    """Record every decode (ImageFile.load) from here on."""
    calls = []
    real = ImageFile.ImageFile.load

    def counting(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    return calls


def test_an_image_over_the_pixel_cap_is_skipped_and_named_before_it_is_decoded(tmp_path, monkeypatch):
    make_image(tmp_path / "huge.png", size=(2000, 1500))
    make_image(tmp_path / "small.png")
    rows = [{"image": "huge.png", "caption": "huge"}, {"image": "small.png", "caption": "small"}]
    dataset = build_dataset(source(write_jsonl(tmp_path / "set.jsonl", rows), "jsonl"), data_cfg(), True)
    assert dataset[0]["image"].size == (2000, 1500)  # the default cap, 40 MP, lets it through
    capped = build_dataset(source(tmp_path / "set.jsonl", "jsonl"), data_cfg(max_image_pixels=1_000_000), True)
    decodes = _decodes(monkeypatch)
    skipped, small = capped[0], capped[1]
    assert skipped["file"] == str(tmp_path / "huge.png") and set(decodes) == {(24, 16)}  # only the small one decoded
    assert "2000x1500 pixels (3 MP) is over data.max_image_pixels (1 MP)" in skipped["reason"]
    assert small["image"].size == (24, 16)


def test_a_jpeg_over_the_pixel_cap_is_downscaled_while_it_is_decoded(tmp_path, monkeypatch):
    from vlm_tune.data.images import load_rgb

    Image.new("RGB", (2000, 1500), (200, 30, 30)).save(tmp_path / "big.jpg", quality=90)
    decodes = _decodes(monkeypatch)
    image = load_rgb(tmp_path / "big.jpg", max_pixels=1_000_000)
    assert image.size == (1000, 750) and set(decodes) == {(1000, 750)}  # the decoder itself reduced it, 1/2 a side


def test_annotation_files_that_are_not_utf8_name_the_line(tmp_path):
    make_image(tmp_path / "a.png")
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_bytes(b'{"image": "a.png", "caption": "fine"}\n{"image": "a.png", "caption": "caf\xe9"}\n')
    dataset = build_dataset(source(jsonl, "jsonl"), data_cfg(), True)
    assert dataset[0]["captions"] == ["fine"]
    assert dataset.bad_samples[0]["reason"] == "broken record: line 2 is not UTF-8 text (byte 0xe9 at column 35)"

    csv_file = tmp_path / "set.csv"
    csv_file.write_bytes(b"image,caption\na.png,fine\na.png,caf\xe9\n")
    with pytest.raises(DataError, match=r"set.csv: not UTF-8 text \(byte 0xe9 on line 3\); save the file as UTF-8"):
        build_dataset(source(csv_file, "csv"), data_cfg(), True)
    chat = tmp_path / "chat.json"
    chat.write_bytes(b'[{"conversations": [{"from": "human", "value": "caf\xe9"}]}]')
    with pytest.raises(DataError, match=r"chat.json: not UTF-8 text \(byte 0xe9 on line 1\)"):
        build_dataset(source(chat, "llava"), data_cfg(), True)
