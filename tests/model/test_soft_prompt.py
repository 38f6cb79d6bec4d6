"""Soft prompts per family: virtual tokens must act exactly as the same tokens written into the input.

prompt: the trained vectors set to the embeddings of three real tokens give the logits (and greedy captions) of
the model reading those tokens at the start of its input. prefix: the trained keys / values set to what the model
computes for three real tokens placed before the input (at positions -3..-1, so the input keeps its own positions)
give the logits of that longer input. Both through each family's own image-token, position (M-RoPE) and mask code.
"""

import pytest
import torch
import transformers as tf
from tiny import TINY_ARCHS, tiny_vlm
from vlm_batches import make_batch, open_visual_path

from vlm_tune.model.components import find_components
from vlm_tune.model.soft_prompt import (
    CHECKED_FAMILIES,
    SoftPromptError,
    _self_attention,
    attach_soft_prompt,
    insert_placeholders,
)
from vlm_tune.model.targeting import apply_targeting
from vlm_tune.recipe import ComponentConfig

P = 3
ARCHS = [*TINY_ARCHS, "smolvlm"]


def _model(arch: str):
    """The tiny model of `arch`; smolvlm is the tiny idefics3 rebuilt as transformers' SmolVLM class."""
    if arch != "smolvlm":
        model, processor = tiny_vlm(arch)
    else:
        idefics3, processor = tiny_vlm("idefics3")
        config = idefics3.config
        torch.manual_seed(0)
        model = tf.SmolVLMForConditionalGeneration(
            tf.SmolVLMConfig(
                vision_config=tf.SmolVLMVisionConfig(**config.vision_config.to_dict()),
                text_config=config.text_config.to_dict(),
                image_token_id=config.image_token_id,
                scale_factor=config.scale_factor,
            )
        )
    open_visual_path(model)
    return model.eval(), processor


def _batch_arch(arch: str) -> str:
    return "idefics3" if arch == "smolvlm" else arch


def _literal(batch: dict, processor, arch: str, causal: bool = False):
    """The batch with three real tokens written where the virtual tokens go, and those tokens' ids."""
    ids = torch.tensor([40, 41, 42]) + len(getattr(processor, "tokenizer", processor).all_special_ids)
    literal, virtual, slot = insert_placeholders(batch, P, 0)
    literal["input_ids"] = torch.where(virtual, ids[slot], literal["input_ids"])
    if causal and arch == "paligemma":  # the written tokens read causally, as a prefix of keys would be read
        literal["token_type_ids"] = torch.where(virtual, 1, literal["token_type_ids"])
    return literal, ids


def _wrap(model, processor, mode: str):
    cmap = find_components(model)
    cfg = ComponentConfig(mode=mode, num_virtual_tokens=P)
    peft_model, _ = apply_targeting(model, {"language": cfg, "projector": ComponentConfig(mode="full")}, cmap)
    return attach_soft_prompt(peft_model, cfg, cmap, processor, seed=0).eval()


def _batch(arch: str, processor) -> dict:
    return make_batch(_batch_arch(arch), processor, batch_size=1 if arch in ("mllama", "gemma3") else 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_tokens_act_as_the_same_tokens_in_the_input(arch):
    model, processor = _model(arch)
    batch = _batch(arch, processor)
    literal, ids = _literal(batch, processor, arch)
    with torch.no_grad():
        expected = model(**literal)
        wrapper = _wrap(model, processor, "prompt")
        wrapper.soft_prompt.embeddings.copy_(model.get_input_embeddings()(ids))
        got = wrapper(**batch)
    assert torch.allclose(got.logits, expected.logits, atol=1e-5)
    assert got.loss.item() == pytest.approx(expected.loss.item(), abs=1e-5)
    if arch in ("idefics3", "qwen2_5_vl", "mllama"):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            new = wrapper.generate(**inputs, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
            ref = model.generate(
                **{k: v for k, v in literal.items() if k != "labels"}, max_new_tokens=4, do_sample=False
            )
        assert torch.equal(new, ref[:, literal["input_ids"].shape[1] :])


def _positions(arch: str, model, batch: dict) -> torch.Tensor:
    """Position ids of the literal prefix + the input: the input keeps its own, the prefix sits before them."""
    rows, length = batch["input_ids"].shape
    if arch.startswith("qwen"):
        types = batch.get("mm_token_type_ids", (batch["input_ids"] == model.config.image_token_id).int())
        own, _ = model.model.get_rope_index(
            batch["input_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=types,
        )  # [3, B, T]
        return torch.cat([own[..., :1] - P + torch.arange(P), own], dim=-1)
    if arch == "blip2":  # learned absolute positions: the prefix may take the input's first positions again
        return torch.cat([torch.arange(P), torch.arange(length)])[None].expand(rows, -1)
    first = 1 if arch == "paligemma" else 0
    return (torch.arange(length + P) - P + first)[None].expand(rows, -1)


@pytest.mark.parametrize("arch,attention", [(arch, "sdpa") for arch in ARCHS] + [("idefics3", "eager")])
def test_prefix_keys_act_as_a_real_prefix(arch, attention):
    model, processor = _model(arch)
    model.set_attn_implementation(attention)
    batch = _batch(arch, processor)
    literal, _ = _literal(batch, processor, arch, causal=True)
    with torch.no_grad():
        expected = model(**literal, position_ids=_positions(arch, model, batch), use_cache=True)
    outputs = expected.language_model_outputs if arch == "blip2" else expected
    cache = outputs.past_key_values
    attention_modules = _self_attention(model.get_decoder())
    wrapper = _wrap(model, processor, "prefix")
    with torch.no_grad():
        for index, module in enumerate(attention_modules):
            layer = cache.layers[module.layer_idx]
            wrapper.soft_prompt.keys[index].copy_(layer.keys[0, :, :P])
            wrapper.soft_prompt.values[index].copy_(layer.values[0, :, :P])
        got = wrapper(**batch)
    assert torch.allclose(got.logits, expected.logits[:, P:], atol=1e-5)


@pytest.mark.parametrize("arch", ["idefics3", "qwen2_5_vl", "mllama"])
def test_prefix_generation_follows_its_own_forward_and_trains_the_prefix(arch):
    model, processor = _model(arch)
    wrapper = _wrap(model, processor, "prefix")
    batch = _batch(arch, processor)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        new = wrapper.generate(**inputs, max_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1] :]
    assert new.shape[1] == 3
    first = wrapper(**inputs).logits[:, -1].argmax(-1)  # the cached decode steps read the prefix as prefill did
    assert torch.equal(new[:, 0], first)
    wrapper.train()
    wrapper(**batch).loss.backward()
    assert wrapper.soft_prompt.keys.grad.abs().sum() > 0 and wrapper.soft_prompt.values.grad.abs().sum() > 0


def test_prompt_tokens_follow_left_padding_in_generation():
    model, processor = _model("idefics3")
    processor.tokenizer.padding_side = "left"
    chat = lambda text: processor.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], add_generation_prompt=True
    )
    image = __import__("vlm_batches").test_image()
    inputs = dict(
        processor(
            images=[[image], [image]],
            text=[chat("Hi."), chat("Describe it in detail.")],
            return_tensors="pt",
            padding=True,
        )
    )
    assert (inputs["attention_mask"][:, 0] == 0).any()  # one row is left-padded
    literal, ids = _literal(inputs, processor, "idefics3")
    wrapper = _wrap(model, processor, "prompt")
    with torch.no_grad():
        wrapper.soft_prompt.embeddings.copy_(model.get_input_embeddings()(ids))
        new = wrapper.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        ref = wrapper.model.generate(**literal, max_new_tokens=4, do_sample=False)[:, literal["input_ids"].shape[1] :]
    assert torch.equal(new, ref)
    assert torch.equal(
        wrapper.generate(**inputs, max_new_tokens=1)[:, : inputs["input_ids"].shape[1]], inputs["input_ids"]
    )


def test_unchecked_family_and_flash_attention_are_refused_naming_them(monkeypatch):
    model, processor = _model("llava")
    monkeypatch.delitem(CHECKED_FAMILIES, "llava")
    with pytest.raises(
        SoftPromptError, match=r"mode: prompt is not supported on llava models \(checked on: .*idefics3"
    ):
        _wrap(model, processor, "prompt")
    monkeypatch.undo()
    model, processor = _model("llava")
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(
        SoftPromptError, match="prefix runs on sdpa or eager attention.*model.attn_implementation: sdpa"
    ):
        _wrap(model, processor, "prefix")
