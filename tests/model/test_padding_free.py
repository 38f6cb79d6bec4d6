"""speed.padding_free: a padded batch as one row of its real tokens gives the padded batch's loss and gradients."""

import pytest
import torch
from tiny import tiny_vlm
from vlm_batches import loss_and_grads, randomize_lora_b, test_image

from vlm_tune.model.components import find_components
from vlm_tune.model.padding_free import FLATTENERS, flatten_batch
from vlm_tune.model.speed import SpeedError, apply_speed
from vlm_tune.model.targeting import apply_targeting
from vlm_tune.recipe import ComponentConfig, ModelConfig, RecipeError, SpeedConfig, recipe_from_dict

LORA = ComponentConfig(mode="lora", rank=4, alpha=8.0)
CAPTIONS = ["a red square on the left", "a square", "a big blue square on the right side of the picture"]


def _targeted(arch: str):
    model, processor = tiny_vlm(arch, 0)
    model, _ = apply_targeting(model, {"language": LORA})
    randomize_lora_b(model)
    model.train()
    return model, processor


def _padded_batch(processor, size: int = 3) -> dict:
    """Image + prompt + captions of different lengths, padded; labels on the captions (the first 6 real tokens
    and the padding masked)."""
    texts = []
    for caption in CAPTIONS[:size]:
        chat = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]},
        ]
        texts.append(processor.apply_chat_template(chat, tokenize=False))
    images = [test_image(48 + 8 * i, 40) for i in range(size)]
    batch = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for row, mask in enumerate(batch["attention_mask"]):
        labels[row, mask.nonzero()[:6, 0]] = -100
    return {**batch, "labels": labels}


@pytest.mark.parametrize("arch", sorted(FLATTENERS))
def test_one_row_of_real_tokens_gives_the_padded_loss_and_gradients(arch):
    model, processor = _targeted(arch)
    batch = _padded_batch(processor)
    assert not batch["attention_mask"].all()  # the batch has padding to drop
    loss, grads = loss_and_grads(model, batch)
    base = model.get_base_model()
    rows = []
    base.get_input_embeddings().register_forward_hook(lambda module, args, out: rows.append(tuple(args[0].shape)))
    patches = apply_speed(model, SpeedConfig(padding_free=True), ModelConfig(), find_components(base))  # + chunked loss
    free_loss, free_grads = loss_and_grads(model, batch)
    assert rows == [(1, int(batch["attention_mask"].sum()))]  # one row, no padding token
    assert free_loss == pytest.approx(loss, rel=1e-5)
    assert free_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(free_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    patches.remove()


@pytest.mark.parametrize("arch", ["idefics3", "qwen2_5_vl"])
def test_a_text_only_sample_among_image_samples_keeps_the_loss_and_gradients(arch):
    model, processor = _targeted(arch)
    texts = []
    for caption, image in (("a text-only answer long enough to pad the others", False), ("a square", True)):
        content = [{"type": "image"}] * image + [{"type": "text", "text": "Describe the image."}]
        answer = [{"type": "text", "text": caption}]
        chat = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        texts.append(processor.apply_chat_template(chat, tokenize=False))
    images = [[], [test_image()]] if arch == "idefics3" else [test_image()]
    batch = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss, grads = loss_and_grads(model, batch)
    apply_speed(model, SpeedConfig(padding_free=True), ModelConfig(), find_components(model.get_base_model()))
    free_loss, free_grads = loss_and_grads(model, batch)
    assert free_loss == pytest.approx(loss, rel=1e-5)
    for name in grads:
        torch.testing.assert_close(free_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_batches_without_padding_and_evaluation_go_through_unchanged():
    model, processor = _targeted("idefics3")
    base = model.get_base_model()
    batch = _padded_batch(processor)
    single = _padded_batch(processor, size=1)
    assert flatten_batch(base, single) is single
    apply_speed(model, SpeedConfig(padding_free=True, loss="model"), ModelConfig(), find_components(base))
    model.eval()
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_other_families_and_combinations_are_refused_naming_the_fix():
    model, _ = _targeted("mllama")
    with pytest.raises(SpeedError, match=r"not checked on mllama models \(valid: llava, llava_next"):
        apply_speed(model, SpeedConfig(padding_free=True), ModelConfig(), find_components(model.get_base_model()))
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(
            {
                "components": {"language": {"mode": "prompt"}},
                "relevance": {"enabled": True},
                "speed": {"padding_free": True},
            }
        )
    message = str(error.value)
    assert "speed.padding_free: relevance scores each sample's own rows" in message
    assert "speed.padding_free does not combine with components.language mode prompt" in message
