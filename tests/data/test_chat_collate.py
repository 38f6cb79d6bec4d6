"""Conversation collators per architecture: labels are exactly the assistant turns and their end-of-turn token,
several images keep their order, text-only samples mix with image samples, and a too-long conversation is cut
at a turn boundary (never inside an image) or named."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_data_collate import END_OF_TURN, _image_token_id
from tiny import tiny_processor, tiny_vlm

from vlm_tune.data.chat_collate import ChatGenerateCollator, ChatTrainCollator
from vlm_tune.data.collate import refuses_mixed_batches
from vlm_tune.data.keepalive import DUMMY_ID
from vlm_tune.recipe import DataConfig

ARCHS = ["llava", "qwen2_5_vl", "idefics3", "mllama", "gemma3"]
RED, BLUE = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (40, 30), (30, 30, 200))


def user(*parts) -> dict:
    """A user turn; None stands for an image placeholder."""
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def sample(sample_id: str, images: list, *messages) -> dict:
    return {"image_id": sample_id, "images": images, "messages": list(messages), "answers": ["x"]}


SYSTEM = {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}
TWO_IMAGES = sample(
    "two", [RED, BLUE], SYSTEM, user(None, "What colour?"), assistant("red"), user(None, "And this one?"),
    assistant("a blue one"),
)  # fmt: skip
TEXT_ONLY = sample("text", [], user("Say hello."), assistant("hello there"), user("Again?"), assistant("hello"))
ONE_IMAGE = sample("one", [RED], user(None, "What is it?"), assistant("a red square"))
ANSWERS = {"two": ["red", "a blue one"], "text": ["hello there", "hello"], "one": ["a red square"]}


def _label_runs(labels: torch.Tensor) -> list[list[int]]:
    """The labelled token ids of one row, one list per contiguous run."""
    runs, current = [], []
    for value in labels.tolist() + [-100]:
        if value != -100:
            current.append(value)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.mark.parametrize("arch", [*ARCHS, "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_labels_decode_to_exactly_the_assistant_turns(arch, train_on):
    processor = tiny_processor(arch)
    batch = ChatTrainCollator(processor, DataConfig(train_on=train_on))([TWO_IMAGES, TEXT_ONLY, ONE_IMAGE])
    assert batch.pop("skipped") == []
    labels, input_ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    image_id = _image_token_id(processor)
    for row, name in enumerate(["two", "one", "text"]):  # rows: the samples with images first
        expected = ANSWERS[name] if train_on == "all" else ANSWERS[name][-1:]
        runs = _label_runs(labels[row])
        decoded = [processor.tokenizer.decode(run).strip() for run in runs]
        assert decoded == [answer + END_OF_TURN[arch] for answer in expected], decoded
        kept = labels[row] != -100
        assert torch.equal(labels[row][kept], input_ids[row][kept])
        assert not (kept & (mask[row] == 0)).any() and not (kept & (input_ids[row] == image_id)).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_image_samples_keep_their_order(arch):
    model, processor = tiny_vlm(arch)
    collator = ChatTrainCollator(processor, DataConfig())

    def pixels_of_sample(images: list) -> torch.Tensor:
        return collator([{**TWO_IMAGES, "images": images}])["pixel_values"].flatten()

    def pixels_alone(image) -> torch.Tensor:
        return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"].flatten()

    red, blue = pixels_alone(RED), pixels_alone(BLUE)
    assert torch.allclose(pixels_of_sample([RED, BLUE]), torch.cat([red, blue]))  # the placeholders' order
    assert torch.allclose(pixels_of_sample([BLUE, RED]), torch.cat([blue, red]))
    batch = collator([TWO_IMAGES])
    batch.pop("skipped")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_only_samples_mix_with_image_samples_in_one_batch(arch):
    model, processor = tiny_vlm(arch)
    collator = ChatTrainCollator(processor, DataConfig())
    mixed, alone = collator([TEXT_ONLY, ONE_IMAGE, TEXT_ONLY]), collator([ONE_IMAGE])
    assert mixed.pop("skipped") == [] and alone.pop("skipped") == []
    assert mixed["input_ids"].shape[0] == 3
    row = int((mixed["input_ids"] == _image_token_id(processor)).any(1).nonzero()[0])  # the image sample's row
    with torch.no_grad():
        out_mixed, out_alone = model(**mixed), model(**alone)
    assert torch.isfinite(out_mixed.loss)
    length = int(alone["attention_mask"][0].sum())  # right padding: the image sample reads the same in both
    assert torch.equal(mixed["input_ids"][row, :length], alone["input_ids"][0])
    assert torch.allclose(out_mixed.logits[row, :length], out_alone.logits[0, :length], atol=1e-4)
    only_text = collator([TEXT_ONLY])  # a batch without any image
    assert only_text.pop("skipped") == [] and "pixel_values" not in only_text
    with torch.no_grad():
        assert torch.isfinite(model(**only_text).loss)


def test_an_mllama_processor_that_refuses_mixed_batches_still_gets_them(monkeypatch):
    _, processor = tiny_vlm("mllama")
    collator = ChatTrainCollator(processor, DataConfig())
    accepted = collator([ONE_IMAGE, TEXT_ONLY])
    checked = type(processor).validate_inputs

    def refusing(self, images=None, text=None, **kwargs):  # transformers 5.17's check
        if images is not None and any(len(sample) == 0 for sample in images):
            raise ValueError("there should be either no images or at least one image per sample")
        return checked(self, images=images, text=text, **kwargs)

    monkeypatch.setattr(type(processor), "validate_inputs", refusing)
    assert refuses_mixed_batches(processor) and not refuses_mixed_batches(tiny_vlm("qwen2_5_vl")[1])
    refused = collator([ONE_IMAGE, TEXT_ONLY])
    assert refused.keys() == accepted.keys()
    assert all(torch.equal(refused[key], accepted[key]) for key in accepted if key != "skipped")
    assert "validate_inputs" not in processor.__dict__  # the check is back after the call
    with pytest.raises(ValueError, match="at least one image"):
        processor(text=["<|image|>a", "b"], images=[[RED], []])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_too_long_conversation_is_cut_at_a_turn_boundary_or_named(arch):
    processor = tiny_processor(arch)
    full = ChatTrainCollator(processor, DataConfig())([TWO_IMAGES])
    first_turn = ChatTrainCollator(processor, DataConfig())([sample("cut", [RED], *TWO_IMAGES["messages"][:3])])
    length, first_length = int(full["attention_mask"].sum()), int(first_turn["attention_mask"].sum())
    assert first_length < length
    cut = ChatTrainCollator(processor, DataConfig(max_length=length - 1))([TWO_IMAGES, ONE_IMAGE])
    assert cut["skipped"] == []
    assert torch.equal(cut["input_ids"][0, :first_length], first_turn["input_ids"][0])  # ends after turn one
    assert int(cut["attention_mask"][0].sum()) == first_length
    image_id = _image_token_id(processor)
    assert (cut["input_ids"][0] == image_id).sum() == (first_turn["input_ids"][0] == image_id).sum()  # whole image
    runs = _label_runs(cut["labels"][0])
    assert [processor.tokenizer.decode(r).strip() for r in runs] == ["red" + END_OF_TURN[arch]]
    short = sample("short", [], user("Hi"), assistant("ok"))
    named = ChatTrainCollator(processor, DataConfig(max_length=first_length - 1))([TWO_IMAGES, short])
    assert named["input_ids"].shape[0] == 1 and [s["image_id"] for s in named["skipped"]] == ["two"]
    assert named["skipped"][0]["reason"].startswith("too long: even the first exchange")


def test_generation_inputs_end_with_the_question_and_carry_the_references():
    processor = tiny_processor("qwen2_5_vl")
    inputs, meta = ChatGenerateCollator(processor, DataConfig())([TWO_IMAGES, None, TEXT_ONLY])
    assert meta["image_ids"] == ["two", "text"] and meta["questions"] == ["And this one?", "Again?"]
    assert meta["references"] == [["x"], ["x"]] and len(meta["skipped"]) == 1
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padded
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert text.endswith("And this one?<|im_end|>\n<|im_start|>assistant\n") and "a blue one" not in text
    assert "red" in text  # earlier answers stay as context


@pytest.mark.parametrize("arch", ["paligemma", "blip2"])
def test_families_without_turns_take_one_question_one_answer_and_one_image(arch):
    processor = tiny_processor(arch)
    batch = ChatTrainCollator(processor, DataConfig())([ONE_IMAGE, TWO_IMAGES, TEXT_ONLY])
    assert batch["input_ids"].shape[0] == 1
    runs = _label_runs(batch["labels"][0])
    assert [processor.tokenizer.decode(r).strip() for r in runs] == ["a red square" + END_OF_TURN[arch]]
    assert [s["image_id"] for s in batch["skipped"]] == ["two", "text"]
    assert all("takes one user turn, one answer and one image" in s["reason"] for s in batch["skipped"])
    inputs, meta = ChatGenerateCollator(processor, DataConfig())([ONE_IMAGE, TEXT_ONLY])
    assert meta["image_ids"] == ["one"] and meta["questions"] == ["What is it?"] and len(meta["skipped"]) == 1


def test_a_text_only_batch_gets_a_dummy_image_without_labels_when_asked():
    model, processor = tiny_vlm("idefics3")
    plain = ChatTrainCollator(processor, DataConfig())([TEXT_ONLY])
    busy = ChatTrainCollator(processor, DataConfig(), keep_vision_busy=True)([TEXT_ONLY])
    assert busy.pop("skipped") == [] and plain.pop("skipped") == []
    assert "pixel_values" not in plain and busy["input_ids"].shape[0] == 2  # the dummy row holds an image
    assert (busy["labels"][0] == -100).all()  # the dummy comes first (images first) and has no labels
    assert torch.equal(busy["labels"][1][busy["labels"][1] != -100], plain["labels"][0][plain["labels"][0] != -100])
    with torch.no_grad():
        assert torch.allclose(model(**busy).loss, model(**plain).loss, atol=1e-5)  # the loss is unchanged
    with_image = ChatTrainCollator(processor, DataConfig(), keep_vision_busy=True)([TEXT_ONLY, ONE_IMAGE])
    assert with_image["input_ids"].shape[0] == 2 and DUMMY_ID not in str(with_image["skipped"])


def test_a_template_that_rewrites_earlier_turns_is_named():
    processor = tiny_processor("llava")  # shows only the last answer: turn prefixes stop being prefixes
    processor.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% elif m['role'] != 'assistant' or loop.last and loop.length == 1 and m == messages[-1] %}{{ c['text'] }}"
        "{% endif %}{% endfor %}</s>{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    batch = ChatTrainCollator(processor, DataConfig())([TWO_IMAGES])
    assert set(batch) == {"skipped"} and "rewrites earlier turns" in batch["skipped"][0]["reason"]
