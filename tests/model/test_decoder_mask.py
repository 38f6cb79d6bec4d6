"""speed.padding_read: early: mllama reads its padding mask before the vision tower; same loss and gradients."""

import pytest
import torch
from tiny import tiny_vlm
from vlm_batches import PROMPT, loss_and_grads, randomize_lora_b, test_image

from vlm_tune.model.components import find_components
from vlm_tune.model.decoder_mask import causal_padding_mask, install_early_padding_read
from vlm_tune.model.load import _enable_checkpointing
from vlm_tune.model.speed import apply_speed
from vlm_tune.model.targeting import apply_targeting
from vlm_tune.recipe import ComponentConfig, ModelConfig, SpeedConfig

LORA = ComponentConfig(mode="lora", rank=4, alpha=8.0)


def _model():
    """Tiny mllama (sdpa), LoRA on the language model and the cross-attention, checkpointing on."""
    model, processor = tiny_vlm("mllama", 0)
    _enable_checkpointing(model)
    model, _ = apply_targeting(model, {"language": LORA, "cross_attention": LORA})
    randomize_lora_b(model)
    model.train()
    return model, processor


def _batch(processor, captions: list[str]) -> dict:
    """One image per sample (one real tile and a padding tile), right-padded as the train collator pads."""
    texts = []
    for caption in captions:
        chat = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]},
        ]
        texts.append(processor.apply_chat_template(chat, tokenize=False))
    images = [[test_image(32, 32)] for _ in captions]
    processor.tokenizer.padding_side = "right"
    batch = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _text_masks(model, batch) -> list:
    """The attention masks the text model receives in one forward."""
    seen = []
    text_model = model.get_base_model().model.language_model
    hook = text_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return seen


def test_causal_padding_mask_lets_each_token_see_earlier_tokens_that_are_not_padding():
    mask = causal_padding_mask(torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert mask[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]


@pytest.mark.parametrize("captions", [["a red square", "a red square on the left of a blue circle"], ["a", "b"]])
def test_early_padding_read_keeps_the_loss_and_gradients(captions):
    model, processor = _model()
    batch = _batch(processor, captions)
    assert bool(batch["attention_mask"].all()) == (captions == ["a", "b"])  # padded, then not
    cmap = find_components(model.get_base_model())
    others = apply_speed(model, SpeedConfig(padding_read="model"), ModelConfig(gradient_checkpointing=True), cmap)
    plain = loss_and_grads(model, batch)
    handle = install_early_padding_read(model)
    masks = _text_masks(model, batch)
    patched = loss_and_grads(model, batch)
    handle.remove()
    others.remove()
    length = batch["input_ids"].shape[1]
    if bool(batch["attention_mask"].all()):
        assert masks == [None]  # nothing padded: no mask, as transformers leaves it to sdpa's causality
    else:
        assert masks[0].shape == (2, 1, length, length) and masks[0].dtype == torch.bool
    assert plain[0] == patched[0]
    assert plain[1].keys() == patched[1].keys() and any("cross_attn" in name for name in plain[1])
    for name, grad in plain[1].items():
        assert torch.equal(patched[1][name], grad), name


def test_early_padding_read_leaves_evaluation_and_other_attention_implementations_alone():
    model, processor = _model()
    batch = _batch(processor, ["a red square", "a red square on the left of a blue circle"])
    handle = install_early_padding_read(model)
    model.eval()
    assert _text_masks(model, batch)[0].dim() == 2  # evaluation and generate: transformers' own path
    model.train()
    text_config = model.get_base_model().model.language_model.config
    text_config._attn_implementation = "eager"
    assert _text_masks(model, batch)[0].dim() == 2
    handle.remove()


def test_early_padding_read_refuses_other_families():
    model, _ = tiny_vlm("qwen2_vl", 0)
    with pytest.raises(ValueError, match="not an mllama model"):
        install_early_padding_read(model)
