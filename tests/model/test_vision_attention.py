"""speed.vision_attention: Qwen's vision segments attend in batched calls, and the result does not change."""

import pytest
import torch
from PIL import Image
from test_model_speed import _assert_same, _targeted
from vlm_batches import loss_and_grads, make_batch

from vlm_tune.model import vision_attention
from vlm_tune.model.components import find_components
from vlm_tune.model.speed import apply_speed
from vlm_tune.model.vision_attention import install_batched_vision_attention, segment_attention
from vlm_tune.recipe import ComponentConfig, ModelConfig, SpeedConfig

LORA = ComponentConfig(mode="lora", rank=4, alpha=8.0)


def _one_by_one(query, key, value, bounds, scaling):
    """The reference: one sdpa call per segment, as transformers runs them."""
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1)[None] for t in (query, key, value))  # [1, H, L, d]
        pieces.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)[0].transpose(0, 1))
    return torch.cat(pieces)


@pytest.mark.parametrize("bounds", [[0, 4, 8, 12], [0, 4, 8, 11, 15, 17], [0, 9]])
def test_segments_attend_within_themselves_as_one_call_each_would(bounds):
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(bounds[-1], 2, 8, generator=generator, requires_grad=True) for _ in range(3))
    plan = vision_attention._SegmentPlan(torch.tensor(bounds))
    assert sum(segments for _, segments, _ in plan.groups) == len(bounds) - 1
    batched = segment_attention(query, key, value, plan, 0.3)
    reference = _one_by_one(query, key, value, bounds, 0.3)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(batched.square().sum(), (query, key, value))
    reference_grads = torch.autograd.grad(reference.square().sum(), (query, key, value))
    for grad, reference_grad in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6)


def _mixed_size_batch(processor) -> dict:
    """Two images of different sizes: Qwen2.5-VL's window blocks see windows of two lengths."""
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 168 * 168}
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    text = processor.apply_chat_template(chat, tokenize=False)
    images = [Image.new("RGB", (168, 112), (10, 200, 30)), Image.new("RGB", (112, 84), (100, 20, 30))]
    batch = dict(processor(images=images, text=[text] * 2, return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("images", ["same size", "mixed sizes"])
def test_batched_vision_attention_gives_the_same_loss_and_gradients(arch, images, monkeypatch):
    model, processor = _targeted(arch, {"language": LORA, "vision": LORA})  # vision trains: its gradients count
    batch = make_batch(arch, processor, batch_size=2) if images == "same size" else _mixed_size_batch(processor)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    plain = loss_and_grads(model, batch)
    plain_calls, calls[:] = len(calls), []
    patches = apply_speed(model, SpeedConfig(), ModelConfig(), find_components(model.get_base_model()))
    batched = loss_and_grads(model, batch)
    if arch == "qwen2_vl" and images == "mixed sizes":  # two images of two lengths: one call each either way
        assert len(calls) == plain_calls
    else:
        assert len(calls) < plain_calls  # the vision blocks made fewer calls
    _assert_same(plain, batched)
    patches.remove()
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_only_sdpa_blocks_of_the_qwen_families_are_patched():
    model, _ = _targeted("qwen2_5_vl", {"language": LORA})
    vision_config = model.get_base_model().config.vision_config
    vision_config._attn_implementation = "eager"  # the user's explicit choice stays
    assert install_batched_vision_attention(model) == []
    vision_config._attn_implementation = "sdpa"
    assert len(install_batched_vision_attention(model)) == vision_config.depth
    other, _ = _targeted("idefics3", {"language": LORA})
    assert install_batched_vision_attention(other) == []


def test_vision_attention_model_keeps_the_models_own_path():
    model, _ = _targeted("qwen2_5_vl", {"language": LORA})
    apply_speed(model, SpeedConfig(vision_attention="model"), ModelConfig(), find_components(model.get_base_model()))
    blocks = [m for m in model.modules() if type(m).__name__ == "Qwen2_5_VLVisionAttention"]
    assert blocks and not any("forward" in block.__dict__ for block in blocks)


@pytest.mark.parametrize("setting", ["batched", "model"])
def test_generation_loads_take_the_recipes_vision_attention(setting, tmp_path):
    from tiny import tiny_vlm_folder

    from vlm_tune.model.build import load_for_inference
    from vlm_tune.recipe import recipe_from_dict

    folder = tiny_vlm_folder("qwen2_5_vl", tmp_path)
    raw = {"model": {"name_or_path": str(folder), "dtype": "float32"}, "components": {"language": {"mode": "lora"}}}
    raw["speed"] = {"vision_attention": setting}
    model, _ = load_for_inference(recipe_from_dict(raw))
    blocks = [m for m in model.modules() if type(m).__name__ == "Qwen2_5_VLVisionAttention"]
    assert blocks and all(("forward" in block.__dict__) == (setting == "batched") for block in blocks)
