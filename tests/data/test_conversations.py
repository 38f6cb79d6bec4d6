"""Conversation sets: LLaVA JSON / JSONL, messages JSONL and Hugging Face tables read into one layout; bad
records are named; the recipe fields that go with them are checked."""

from __future__ import annotations

import json

import pytest
from data_fixtures import COLOURS, data_cfg, make_image, near, source, write_jsonl

from vlm_tune.data import DataError, build_dataset
from vlm_tune.data.conversation_dataset import ConversationDataset
from vlm_tune.recipe import RecipeError, recipe_from_dict

IMAGE, TEXT = {"type": "image"}, "text"


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def test_llava_json_turns_become_chat_messages_with_images_in_placeholder_order(tmp_path):
    for n, colour in enumerate(COLOURS[:2]):
        make_image(tmp_path / "imgs" / f"{n}.png", colour)
    records = [
        {
            "id": "a",
            "image": ["imgs/0.png", "imgs/1.png"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "A red thing."},
                {"from": "human", "value": "And <image> this?"},
                {"from": "gpt", "value": "A green thing."},
            ],
        },
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    dataset = build_dataset(source(path, "llava"), data_cfg(), train=True)
    assert isinstance(dataset, ConversationDataset) and len(dataset) == 2
    first = dataset[0]
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert first["messages"][1]["content"] == [IMAGE, _text("What is this?")]
    assert first["messages"][3]["content"] == [_text("And"), IMAGE, _text("this?")]
    assert near(first["images"][0].getpixel((1, 1)), COLOURS[0]) and near(
        first["images"][1].getpixel((1, 1)), COLOURS[1]
    )
    assert first["answers"] == ["A green thing."]  # the last answer is the VQA reference by default
    assert dataset[1]["images"] == [] and dataset[1]["image_id"] == "b"  # text-only
    jsonl = write_jsonl(tmp_path / "llava.jsonl", records)  # the same records as JSON Lines
    assert build_dataset(source(jsonl, "llava"), data_cfg(), train=True)[0]["messages"] == first["messages"]


def test_messages_jsonl_takes_part_paths_or_the_images_list_and_answers(tmp_path):
    make_image(tmp_path / "red.png", COLOURS[0])
    make_image(tmp_path / "blue.png", COLOURS[2])
    rows = [
        {
            "id": "listed",
            "messages": [
                {"role": "user", "content": [IMAGE, _text("first?")]},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "and <image>?"},
                {"role": "assistant", "content": [_text("blue")]},
            ],
            "images": ["blue.png", "red.png"],
            "answers": ["Blue", "dark blue"],
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "path": "red.png"}, _text("colour?")]},
                {"role": "assistant", "content": "red"},
            ]
        },
    ]
    dataset = build_dataset(source(write_jsonl(tmp_path / "m.jsonl", rows), "messages"), data_cfg(), train=False)
    listed, named = dataset[0], dataset[1]
    assert near(listed["images"][0].getpixel((1, 1)), COLOURS[2]) and near(
        listed["images"][1].getpixel((1, 1)), COLOURS[0]
    )
    assert listed["messages"][1]["content"] == [_text("red")] and listed["messages"][2]["content"] == [
        _text("and"),
        IMAGE,
        _text("?"),
    ]
    assert listed["answers"] == ["Blue", "dark blue"]
    assert named["image_id"] == "line_2" and near(named["images"][0].getpixel((1, 1)), COLOURS[0])


BAD_RECORDS = {
    "count": (
        {
            "messages": [
                {"role": "user", "content": [IMAGE, IMAGE, _text("q")]},
                {"role": "assistant", "content": "a"},
            ],
            "images": ["x.png"],
        },
        "2 image placeholder(s) but 1 image(s)",
    ),
    "url": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "https://e.org/a.jpg"}]},
                {"role": "assistant", "content": "a"},
            ]
        },
        "is a URL; nothing is downloaded",
    ),
    "no_answer": ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    "ends_with_user": (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q2"},
            ]
        },
        "the last turn is a user turn",
    ),
    "role": ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "role 'robot'"),
    "empty_answer": (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        "has no text",
    ),
    "missing_file": (
        {
            "messages": [{"role": "user", "content": [IMAGE, _text("q")]}, {"role": "assistant", "content": "a"}],
            "images": ["missing.png"],
        },
        "image file not found",
    ),
}


def test_bad_conversations_are_named_and_skipped_or_raised(tmp_path):
    make_image(tmp_path / "x.png")
    good = {"id": "good", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [good] + [{"id": name, **record} for name, (record, _) in BAD_RECORDS.items()]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    dataset = build_dataset(source(path, "messages"), data_cfg(), train=True)
    assert len(dataset) == 1
    reasons = {record["image_id"]: record["reason"] for record in dataset.bad_samples}
    assert set(reasons) == set(BAD_RECORDS)
    for name, (_, expected) in BAD_RECORDS.items():
        assert expected in reasons[name], (name, reasons[name])
    with pytest.raises(DataError, match=r"record count: broken record: line 2: 2 image placeholder.*data.on_error"):
        build_dataset(source(path, "messages"), data_cfg(on_error="raise"), train=True)


def test_hf_table_with_messages_and_image_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images = [[Image.new("RGB", (8, 8), COLOURS[0]), Image.new("RGB", (8, 8), COLOURS[1])], []]
    messages = [
        [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "a?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "b?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "green"}]},
        ],
        [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        ],
    ]
    features = datasets.Features(
        {
            "messages": [
                {
                    "role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                }
            ],
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    datasets.Dataset.from_dict({"messages": messages, "images": images}, features=features).save_to_disk(
        tmp_path / "set"
    )
    dataset = build_dataset(source(tmp_path / "set", "hf"), data_cfg(), train=True)
    assert isinstance(dataset, ConversationDataset) and len(dataset) == 2
    first = dataset[0]
    assert first["messages"][0]["content"] == [IMAGE, _text("a?")]
    assert near(first["images"][0].getpixel((1, 1)), COLOURS[0]) and near(
        first["images"][1].getpixel((1, 1)), COLOURS[1]
    )
    assert dataset[1]["images"] == [] and dataset[1]["answers"] == ["hello"]


def test_recipe_fields_of_conversation_data_are_checked():
    base = {"components": {"language": {"mode": "lora"}}}
    recipe = recipe_from_dict(
        {**base, "data": {"train_on": "last", "eval": {"format": "messages", "path": "x.jsonl", "task": "vqa"}}}
    )
    assert (
        recipe.data.train_on == "last"
        and recipe.data.eval.task == "vqa"
        and recipe.data.eval.messages_column == "messages"
    )
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(
            {**base, "data": {"train_on": "first", "eval": {"format": "coco", "path": "x.json", "task": "vqa"}}}
        )
    message = str(error.value)
    assert "data.train_on: expected one of 'all', 'last', got 'first'" in message
    assert "data.eval.task: vqa scores answers to questions, which format coco cannot hold" in message


def test_hf_table_with_image_paths_or_no_images_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    make_image(tmp_path / "set" / "pics" / "a.png", COLOURS[2])
    turns = [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
    ]
    datasets.Dataset.from_dict({"messages": [turns], "images": [["pics/a.png"]]}).save_to_disk(tmp_path / "set")
    item = build_dataset(source(tmp_path / "set", "hf"), data_cfg(), train=True)[0]
    assert near(item["images"][0].getpixel((1, 1)), COLOURS[2])  # paths relative to the dataset folder
    text_only = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    datasets.Dataset.from_dict({"chat": text_only}).save_to_disk(tmp_path / "text")
    dataset = build_dataset(source(tmp_path / "text", "hf", messages_column="chat"), data_cfg(), train=True)
    assert dataset[0]["images"] == [] and dataset[0]["messages"][1]["content"] == [_text("hello")]
