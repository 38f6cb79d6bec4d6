"""Each source format reads the exact layout of the real files into the same samples."""

from __future__ import annotations

import os

import pytest
from data_fixtures import (
    COLOURS,
    data_cfg,
    make_image,
    near,
    source,
    write_coco,
    write_csv,
    write_jsonl,
    write_karpathy_coco,
    write_karpathy_flickr,
)

from vlm_tune.data import DataError, build_dataset


def test_coco_groups_captions_per_image_and_loads_lazily(tmp_path):
    path = write_coco(
        tmp_path, {"000000397133.jpg": ["A red thing.", "  Something   red \n"], "000000037777.jpg": ["A green thing."]}
    )
    dataset = build_dataset(source(path, images=str(tmp_path / "val2017")), data_cfg(), train=False)
    assert len(dataset) == 2
    first = dataset[0]
    assert first["image_id"] == "397133"
    assert first["captions"] == ["A red thing.", "Something red"]  # whitespace normalised
    assert first["caption"] == "A red thing." and first["prompt"] == "Describe the image."
    assert first["image"].mode == "RGB" and first["image"].size == (24, 16)
    assert near(first["image"].getpixel((3, 3)), COLOURS[0])
    assert near(dataset[1]["image"].getpixel((3, 3)), COLOURS[1])
    assert dataset.bad_samples == []


def test_coco_default_images_folder_is_next_to_the_file_or_its_images_subfolder(tmp_path):
    path = write_coco(tmp_path, {"a.png": ["x"]}, image_dir="images", annotation_name="captions_val.json")
    dataset = build_dataset(source(path), data_cfg(), train=False)
    assert os.path.samefile(dataset.records[0].file, tmp_path / "images" / "a.png")


def test_coco_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    write_coco(tmp_path / "set", {"a.png": ["x"]})
    monkeypatch.chdir(tmp_path)
    dataset = build_dataset(
        source("set/annotations/captions_val2017.json", images="set/val2017"), data_cfg(), train=False
    )
    assert dataset[0]["captions"] == ["x"]


def test_coco_rejects_a_split_and_a_karpathy_file(tmp_path):
    path = write_coco(tmp_path, {"a.png": ["x"]})
    with pytest.raises(DataError, match="holds one split"):
        build_dataset(source(path, split="val"), data_cfg(), train=False)
    with pytest.raises(DataError, match="format: karpathy"):
        build_dataset(source(write_karpathy_coco(tmp_path), "coco"), data_cfg(), train=False)


def test_karpathy_coco_split_filepath_and_joined_splits(tmp_path):
    path = write_karpathy_coco(tmp_path)
    train = build_dataset(source(path, "karpathy", split="train"), data_cfg(), train=False)
    assert [s["image_id"] for s in train] == ["391897", "391899"]
    assert train[0]["captions"] == ["A shape number 2.", "Colour 2"]
    assert near(train[0]["image"].getpixel((1, 1)), COLOURS[2])
    joined = build_dataset(source(path, "karpathy", split="train+restval"), data_cfg(), train=False)
    assert len(joined) == 3
    everything = build_dataset(source(path, "karpathy"), data_cfg(), train=False)
    assert len(everything) == 5
    with pytest.raises(DataError, match="splits in the file"):
        build_dataset(source(path, "karpathy", split="testing"), data_cfg(), train=False)


def test_karpathy_flickr_without_filepath(tmp_path):
    path = write_karpathy_flickr(tmp_path)
    dataset = build_dataset(
        source(path, "karpathy", split="test", images=str(tmp_path / "flickr30k-images")), data_cfg(), train=False
    )
    assert len(dataset) == 1 and dataset[0]["image_id"] == "2"
    assert dataset[0]["captions"] == ["Two young guys number 2."]


def test_jsonl_custom_columns_merges_rows_and_caption_lists(tmp_path):
    make_image(tmp_path / "imgs" / "a.png", COLOURS[0])
    make_image(tmp_path / "imgs" / "b.png", COLOURS[1])
    path = write_jsonl(
        tmp_path / "set.jsonl",
        [
            {"file": "imgs/a.png", "text": "first of a"},
            {"file": "imgs/b.png", "text": ["b one", "b two"]},
            {"file": "imgs/a.png", "text": "second of a"},
        ],
    )
    dataset = build_dataset(source(path, "jsonl", image_column="file", caption_column="text"), data_cfg(), train=False)
    assert [s["captions"] for s in dataset] == [["first of a", "second of a"], ["b one", "b two"]]
    assert near(dataset[1]["image"].getpixel((0, 0)), COLOURS[1])


def test_jsonl_wrong_column_name_lists_the_columns(tmp_path):
    make_image(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "set.jsonl", [{"image": "a.png", "text": "x"}])
    with pytest.raises(DataError, match=r"no column \['caption'\].*columns: \['image', 'text'\]"):
        build_dataset(source(path, "jsonl"), data_cfg(), train=False)


def test_csv_with_split_column(tmp_path):
    for name, colour in zip("abc", COLOURS):
        make_image(tmp_path / f"{name}.jpg", colour)
    path = write_csv(
        tmp_path / "set.csv",
        ["path", "caption", "split"],
        [
            ["a.jpg", "an a", "train"],
            ["b.jpg", "a b", "val"],
            ["c.jpg", "a c", "train"],
            ["a.jpg", "another a", "train"],
        ],
    )
    dataset = build_dataset(source(path, "csv", image_column="path", split="train"), data_cfg(), train=False)
    assert [s["captions"] for s in dataset] == [["an a", "another a"], ["a c"]]
    assert dataset[1]["image"].getpixel((0, 0))[2] > 150  # c.jpg is blue (JPEG, so near the colour)


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_imagefolder_metadata_and_split_subfolder(tmp_path, metadata):
    folder = tmp_path / "set" / "train"
    make_image(folder / "x.png", COLOURS[3])
    make_image(folder / "sub" / "y.png", COLOURS[4])
    if metadata.endswith("jsonl"):
        write_jsonl(
            folder / metadata, [{"file_name": "x.png", "text": "yellow"}, {"file_name": "sub/y.png", "text": "purple"}]
        )
    else:
        write_csv(folder / metadata, ["file_name", "text"], [["x.png", "yellow"], ["sub/y.png", "purple"]])
    dataset = build_dataset(
        source(tmp_path / "set", "imagefolder", split="train", caption_column="text"), data_cfg(), train=False
    )
    assert [s["captions"][0] for s in dataset] == ["yellow", "purple"]
    assert near(dataset[1]["image"].getpixel((0, 0)), COLOURS[4])
    with pytest.raises(DataError, match="no metadata.jsonl or metadata.csv"):
        build_dataset(source(tmp_path, "imagefolder"), data_cfg(), train=False)


def test_hf_dataset_with_image_feature_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = [str(make_image(tmp_path / f"{i}.png", COLOURS[i])) for i in range(3)]
    table = datasets.Dataset.from_dict(
        {"img": paths, "sentences": [["zero", "nil"], ["one"], ["two"]], "image_id": ["i0", "i1", "i2"]}
    )
    table = table.cast_column("img", datasets.Image())
    datasets.DatasetDict({"train": table, "test": table.select([2])}).save_to_disk(str(tmp_path / "hf"))
    for path in paths:  # save_to_disk embeds the image bytes: rows load without the files
        os.remove(path)
    config = source(tmp_path / "hf", "hf", split="train", image_column="img", caption_column="sentences")
    dataset = build_dataset(config, data_cfg(), train=False)
    assert [s["image_id"] for s in dataset] == ["i0", "i1", "i2"]
    assert dataset[0]["captions"] == ["zero", "nil"]
    assert near(dataset[2]["image"].getpixel((0, 0)), COLOURS[2])
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]"):
        build_dataset(
            source(tmp_path / "hf", "hf", image_column="img", caption_column="sentences"), data_cfg(), train=False
        )


def test_hf_dataset_with_path_column_checks_files_at_build_time(tmp_path):
    datasets = pytest.importorskip("datasets")
    make_image(tmp_path / "images" / "a.png", COLOURS[1])
    table = datasets.Dataset.from_dict({"image": ["a.png", "gone.png"], "caption": ["a", "gone"]})
    table.save_to_disk(str(tmp_path / "hf"))
    dataset = build_dataset(source(tmp_path / "hf", "hf", images=str(tmp_path / "images")), data_cfg(), train=False)
    assert len(dataset) == 1 and dataset[0]["image"].getpixel((0, 0)) == COLOURS[1]
    assert dataset.bad_samples[0]["reason"] == "image file not found"
    assert dataset.bad_samples[0]["file"].endswith("gone.png")


def test_limit_keeps_the_first_usable_images(tmp_path):
    path = write_coco(tmp_path, {"missing.png": ["gone"], "a.png": ["a"], "b.png": ["b"], "c.png": ["c"]})
    dataset = build_dataset(source(path, images=str(tmp_path / "val2017"), limit=2), data_cfg(), train=False)
    assert [s["captions"][0] for s in dataset] == ["a", "b"]


def test_unknown_format_lists_the_valid_ones(tmp_path):
    with pytest.raises(DataError, match="expected one of.*coco.*karpathy"):
        build_dataset(source(tmp_path / "x.json", "parquet"), data_cfg(), train=False)


def test_hf_folder_of_parquet_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = str(make_image(tmp_path / "a.png", COLOURS[3]))
    table = datasets.Dataset.from_dict({"image": [path], "caption": ["yellow"]}).cast_column("image", datasets.Image())
    (tmp_path / "pq" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    dataset = build_dataset(source(tmp_path / "pq", "hf"), data_cfg(), train=False)
    assert dataset[0]["captions"] == ["yellow"] and near(dataset[0]["image"].getpixel((0, 0)), COLOURS[3])
