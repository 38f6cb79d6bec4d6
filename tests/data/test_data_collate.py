"""Collators per architecture: labels are exactly the caption + end-of-turn, generation inputs are
left padded, truncation never cuts image tokens, and the image budget bounds image tokens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny import TINY_ARCHS, tiny_processor, tiny_vlm

from vlm_tune.data import DataError, GenerateCollator, TrainCollator
from vlm_tune.recipe import DataConfig

# The end-of-turn token each family's chat format closes the answer with.
END_OF_TURN = {
    "llava": "</s>",
    "llava_next": "</s>",
    "idefics3": "<end_of_utterance>",
    "qwen2_vl": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "mllama": "<|eot_id|>",
    "paligemma": "<eos>",
    "blip2": "</s>",
    "gemma3": "<end_of_turn>",
}
CAPTIONS = ["a red circle", "two small blue squares side by side", "three green triangles in a row"]


def _item(index: int, caption: str, size=(40, 30), prompt: str = "Describe the image.") -> dict:
    image = Image.new("RGB", size, ((50 * index) % 255, 100, 200))
    return {
        "image_id": f"img{index}",
        "image": image,
        "captions": [caption, "another reference"],
        "caption": caption,
        "prompt": prompt,
    }


def _image_token_id(processor) -> int:
    tokenizer = processor.tokenizer
    for name in ("image_token_id",):
        if isinstance(getattr(processor, name, None), int):
            return getattr(processor, name)
    token = getattr(processor, "image_token", None) or tokenizer.image_token
    return tokenizer.convert_tokens_to_ids(str(token))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_labels_decode_to_exactly_the_caption_and_end_of_turn(arch):
    processor = tiny_processor(arch)
    prompts = ["Describe the image.", "What is shown here?", "Caption:"]
    items = [_item(i, caption, prompt=prompt) for i, (caption, prompt) in enumerate(zip(CAPTIONS, prompts))]
    batch = TrainCollator(processor, DataConfig())(items)
    assert batch.pop("skipped") == []
    labels, input_ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert labels.shape == input_ids.shape and labels.shape[0] == 3
    image_id = _image_token_id(processor)
    for row, caption in enumerate(CAPTIONS):
        kept = labels[row] != -100
        decoded = processor.tokenizer.decode(labels[row][kept].tolist())
        assert decoded.strip() == caption + END_OF_TURN[arch], decoded
        assert torch.equal(labels[row][kept], input_ids[row][kept])
        assert not (kept & (mask[row] == 0)).any()  # padding is never a target
        positions = kept.nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[-1] + 1))  # one contiguous answer
        image_positions = (input_ids[row] == image_id).nonzero().flatten()
        if arch != "mllama" or len(image_positions):  # all image tokens sit before the answer
            assert len(image_positions) and image_positions.max() < positions[0]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generation_inputs_are_left_padded_and_match_single_generation(arch):
    model, processor = tiny_vlm(arch)
    items = [_item(0, CAPTIONS[0]), None, _item(1, CAPTIONS[1], size=(64, 48), prompt="What is shown here?")]
    collator = GenerateCollator(processor, DataConfig())
    inputs, meta = collator(items)
    assert processor.tokenizer.padding_side == "right"  # unchanged: the left padding is per call
    assert meta["image_ids"] == ["img0", "img1"]
    assert meta["references"] == [[CAPTIONS[0], "another reference"], [CAPTIONS[1], "another reference"]]
    assert meta["skipped"] == [{"image_id": None, "file": None, "reason": "image could not be read"}]
    assert "labels" not in inputs and (inputs["attention_mask"][:, -1] == 1).all()
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum()  # row 0 padded on the left

    def first_scores(batch_inputs):
        with torch.no_grad():
            out = model.generate(
                **batch_inputs, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        return out.scores[0]

    together = first_scores(inputs)
    alone, _ = collator([items[0]])
    assert torch.allclose(together[0], first_scores(alone)[0], atol=1e-4)


@pytest.mark.parametrize("arch", ["llava", "idefics3", "qwen2_5_vl", "mllama", "paligemma", "blip2"])
def test_truncation_shortens_the_caption_never_the_image(arch):
    processor = tiny_processor(arch)
    long_caption = " ".join(["red circle"] * 30)
    full = TrainCollator(processor, DataConfig())([_item(0, long_caption)])
    answer_start = int((full["labels"][0] != -100).nonzero()[0])
    budget = answer_start + 3  # room for three caption tokens
    batch = TrainCollator(processor, DataConfig(max_length=budget))([_item(0, long_caption), _item(1, "a dot")])
    assert batch["input_ids"].shape[1] == budget and batch["skipped"] == []
    image_id = _image_token_id(processor)
    assert (batch["input_ids"][0] == image_id).sum() == (full["input_ids"][0] == image_id).sum()
    kept = batch["labels"][0][batch["labels"][0] != -100]
    assert torch.equal(kept, full["labels"][0][answer_start : answer_start + 3])  # the caption's first tokens
    short = batch["labels"][1][batch["labels"][1] != -100]
    assert processor.tokenizer.decode(short.tolist()).strip() == "a dot" + END_OF_TURN[arch]
    for key in ("attention_mask", "token_type_ids", "cross_attention_mask", "mm_token_type_ids"):
        if key in batch:
            assert batch[key].shape[:2] == batch["input_ids"].shape


def test_a_sample_whose_prompt_does_not_fit_is_dropped_and_reported():
    processor = tiny_processor("qwen2_5_vl")
    small, large = _item(0, "a dot", size=(30, 30)), _item(1, "a dot", size=(200, 200))
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}  # large -> more tokens
    lengths = [int(TrainCollator(processor, DataConfig())([item])["attention_mask"].sum()) for item in (small, large)]
    collator = TrainCollator(processor, DataConfig(max_length=lengths[0] + 1))
    batch = collator([small, large])
    assert batch["input_ids"].shape[0] == 1 and len(batch["skipped"]) == 1
    assert batch["skipped"][0]["image_id"] == "img1" and batch["skipped"][0]["reason"].startswith("too long")
    nothing_left = collator([large])  # no tensors, only the record of what was dropped
    assert set(nothing_left) == {"skipped"} and nothing_left["skipped"][0]["image_id"] == "img1"
    unreadable = TrainCollator(processor, DataConfig())([None, None])
    assert set(unreadable) == {"skipped"} and len(unreadable["skipped"]) == 2
    inputs, meta = GenerateCollator(processor, DataConfig(max_length=lengths[0]))([small, large])
    assert meta["image_ids"] == ["img0"] and meta["skipped"][0]["image_id"] == "img1"


def _image_tokens(processor, data_cfg, size=(200, 150)) -> int:
    batch = TrainCollator(processor, data_cfg)([_item(0, "a dot", size=size)])
    return int((batch["input_ids"][0] == _image_token_id(processor)).sum())


def test_qwen_image_budget_bounds_image_tokens():
    processor = tiny_processor("qwen2_5_vl")
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 1000 * 1000}
    unbounded = _image_tokens(processor, DataConfig())
    by_pixels = [_image_tokens(processor, DataConfig(max_pixels=p)) for p in (160 * 120, 112 * 84, 56 * 56)]
    by_edge = [_image_tokens(processor, DataConfig(image_size=s)) for s in (160, 112, 56)]
    assert unbounded > by_pixels[0] > by_pixels[1] > by_pixels[2] >= 1
    assert by_edge[0] > by_edge[1] > by_edge[2] >= 1
    assert by_pixels[2] <= 56 * 56 // (28 * 28)  # 28x28 pixels per token after the 2x2 merge


def test_idefics3_image_budget_bounds_image_tokens():
    processor = tiny_processor("idefics3")
    processor.image_processor.do_image_splitting = True  # as SmolVLM: tiles of max_image_size
    processor.image_processor.size = {"longest_edge": 128}
    counts = [_image_tokens(processor, DataConfig(image_size=s)) for s in (128, 96, 64, 32)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert _image_tokens(processor, DataConfig(max_pixels=32 * 32)) == counts[-1]


def test_tiled_families_get_fewer_tiles_with_a_smaller_budget():
    mllama = tiny_processor("mllama")
    tiles = [
        int(
            TrainCollator(mllama, DataConfig(image_size=s))([_item(0, "a dot", size=(200, 150))])[
                "cross_attention_mask"
            ][0]
            .amax(0)
            .sum()
        )
        for s in (None, 32)
    ]
    assert tiles == [2, 1]
    llava_next = tiny_processor("llava_next")
    assert _image_tokens(llava_next, DataConfig(image_size=32)) < _image_tokens(llava_next, DataConfig())


def test_processor_failure_drops_only_that_sample_or_raises():
    processor = tiny_processor("qwen2_5_vl")
    good, thin = _item(0, "a dot"), _item(1, "a line", size=(2, 900))  # aspect ratio Qwen refuses
    batch = TrainCollator(processor, DataConfig())([good, thin])
    assert batch["input_ids"].shape[0] == 1
    assert batch["skipped"][0]["image_id"] == "img1" and "processor failed" in batch["skipped"][0]["reason"]
    with pytest.raises(DataError, match="image img1: processor failed.*data.on_error"):
        TrainCollator(processor, DataConfig(on_error="raise"))([good, thin])


def test_unreadable_items_are_dropped_and_counted():
    processor = tiny_processor("llava")
    batch = TrainCollator(processor, DataConfig())([None, _item(0, "a dot"), None])
    assert batch["input_ids"].shape[0] == 1 and len(batch["skipped"]) == 2


def test_a_processor_without_chat_template_is_a_clear_error():
    processor = tiny_processor("llava")
    processor.chat_template = None
    with pytest.raises(DataError, match="LlavaProcessor has no chat template"):
        TrainCollator(processor, DataConfig())


def test_a_template_without_end_of_turn_token_gets_eos_appended():
    processor = tiny_processor("llava")  # a turn format like llava-hf's: the answer ends with a space only
    processor.chat_template = (
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    batch = TrainCollator(processor, DataConfig())([_item(0, "a red circle")])
    labels = batch["labels"][0]
    decoded = processor.tokenizer.decode(labels[labels != -100].tolist())
    assert decoded.endswith("</s>") and decoded[: -len("</s>")].strip() == "a red circle"
