"""speed.vision_states: needed: mllama's vision encoders keep only the outputs the model reads, same loss and grads."""

import gc
import weakref

import pytest
import torch
from tiny import tiny_vlm
from vlm_batches import PROMPT, loss_and_grads, make_batch, randomize_lora_b, test_image

from vlm_tune.model.components import find_components
from vlm_tune.model.load import _enable_checkpointing
from vlm_tune.model.speed import apply_speed
from vlm_tune.model.targeting import apply_targeting
from vlm_tune.model.vision_states import keep_needed_vision_states
from vlm_tune.recipe import ComponentConfig, ModelConfig, SpeedConfig

LORA = ComponentConfig(mode="lora", rank=4, alpha=8.0)


def _model(components: dict):
    """Tiny mllama, LoRA on the language model and the cross-attention (vision frozen), checkpointing on."""
    model, processor = tiny_vlm("mllama", 0)
    _enable_checkpointing(model)
    model, _ = apply_targeting(model, components)
    randomize_lora_b(model)
    model.train()
    return model, processor


def _two_sample_batch(processor) -> dict:
    """Two samples of one image each: one tile and a padding tile, and two tiles."""
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red square on the left"}]},
    ]
    text = processor.apply_chat_template(chat, tokenize=False)
    images = [[test_image(32, 32)], [test_image(64, 32)]]
    batch = dict(processor(images=images, text=[text] * 2, return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _alive_local_outputs(model, batch) -> list[int]:
    """Which local-encoder layer outputs are still alive when the global encoder starts (a forward)."""
    vision = model.get_base_model().model.vision_model
    outputs, alive = [], []
    keep = lambda module, args, output: outputs.append(weakref.ref(output))  # noqa: E731
    hooks = [layer.register_forward_hook(keep) for layer in vision.transformer.layers]

    def count(module, args):
        gc.collect()
        alive.extend(i for i, ref in enumerate(outputs) if ref() is not None)

    hooks.append(vision.global_transformer.register_forward_pre_hook(count))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return alive


@pytest.mark.parametrize("speed", [{}, {"loss": "model", "padding_tiles": "keep"}])
def test_needed_vision_states_keep_the_loss_and_gradients(speed):
    model, processor = _model({"language": LORA, "cross_attention": LORA})
    batch = _two_sample_batch(processor)
    cmap = find_components(model.get_base_model())
    speed = SpeedConfig(**speed, vision_states="model")
    other = apply_speed(model, speed, ModelConfig(gradient_checkpointing=True), cmap)
    plain = loss_and_grads(model, batch)
    handle = keep_needed_vision_states(model)
    patched = loss_and_grads(model, batch)
    assert plain[0] == patched[0]
    assert plain[1].keys() == patched[1].keys() and any("cross_attn" in name for name in plain[1])
    for name, grad in plain[1].items():
        assert torch.equal(patched[1][name], grad), name
    handle.remove()
    other.remove()


def test_needed_vision_states_free_the_other_layer_outputs():
    model, processor = _model({"language": LORA})
    vision = model.get_base_model().model.vision_model
    batch = make_batch("mllama", processor)
    layers = len(vision.transformer.layers)
    assert _alive_local_outputs(model, batch) == list(range(layers))  # the model's tuple keeps every output
    handle = keep_needed_vision_states(model)
    needed = sorted({i % layers for i in vision.intermediate_layers_indices} | {layers - 1})  # the last: returned
    assert needed != list(range(layers))
    assert _alive_local_outputs(model, batch) == needed
    handle.remove()
    assert "forward" not in vision.transformer.__dict__ and "forward" not in vision.global_transformer.__dict__
    assert _alive_local_outputs(model, batch) == list(range(layers))


def test_apply_speed_installs_it_on_mllama_only():
    model, _ = _model({"language": LORA})
    patches = apply_speed(model, SpeedConfig(), ModelConfig(), find_components(model.get_base_model()))
    vision = model.get_base_model().model.vision_model
    assert "forward" in vision.transformer.__dict__
    patches.remove()
    assert "forward" not in vision.transformer.__dict__
    qwen, _ = tiny_vlm("qwen2_5_vl", 0)
    qwen, _ = apply_targeting(qwen, {"language": LORA})
    speed = SpeedConfig(loss="model", vision_attention="model")
    patches = apply_speed(qwen, speed, ModelConfig(), find_components(qwen.get_base_model()))
    assert patches.handles == []
    with pytest.raises(ValueError, match="no mllama vision model"):
        keep_needed_vision_states(qwen)
