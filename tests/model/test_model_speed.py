"""Speed levers compute what the plain path computes: chunked loss, mllama padding tiles, checkpointing, optimizers."""

import pytest
import torch
from PIL import Image
from tiny import tiny_vlm
from vlm_batches import loss_and_grads, make_batch, randomize_lora_b

from vlm_tune.model.components import find_components
from vlm_tune.model.load import _enable_checkpointing
from vlm_tune.model.loss import install_chunked_loss, label_positions_loss
from vlm_tune.model.speed import apply_speed, build_optimizer, checkpoint_layers, keep_lora_inputs_16bit
from vlm_tune.model.targeting import apply_targeting
from vlm_tune.model.tiles import install_padding_tile_drop
from vlm_tune.recipe import ComponentConfig, ModelConfig, RecipeError, SpeedConfig, recipe_from_dict

LORA = ComponentConfig(mode="lora", rank=4, alpha=8.0)


def _targeted(arch: str, components: dict, seed: int = 0):
    model, processor = tiny_vlm(arch, seed)
    model, _ = apply_targeting(model, components)
    randomize_lora_b(model)
    model.train()
    return model, processor


def _assert_same(plain, patched, rtol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = plain, patched
    assert loss_b == pytest.approx(loss_a, rel=rtol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=1e-7, msg=name)


def _caption_only_labels(batch: dict, caption_tokens: int = 5) -> dict:
    """Labels on the last tokens of each sample only, as a caption batch has them."""
    labels = torch.full_like(batch["input_ids"], -100)
    lengths = batch["attention_mask"].sum(1)
    for row, length in enumerate(lengths.tolist()):
        labels[row, length - caption_tokens : length] = batch["input_ids"][row, length - caption_tokens : length]
    return {**batch, "labels": labels}


# --- chunked loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mllama", "qwen2_5_vl", "idefics3"])
def test_chunked_loss_gives_the_models_loss_and_gradients(arch):
    model, processor = _targeted(arch, {"language": LORA})
    batch = _mllama_tile_batch(processor) if arch == "mllama" else make_batch(arch, processor, batch_size=2)
    batch = _caption_only_labels(batch)
    plain = loss_and_grads(model, batch)
    handle = install_chunked_loss(model, chunk_tokens=3)  # several chunks per batch
    output = model(**batch)
    assert output.logits is None
    patched = loss_and_grads(model, batch)
    _assert_same(plain, patched)
    handle.remove()
    assert model(**batch).logits.shape[-1] == model.get_base_model().get_output_embeddings().out_features
    _assert_same(plain, loss_and_grads(model, batch))


def test_chunked_loss_never_builds_full_vocabulary_logits():
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[0, 4:], labels[1, 2] = torch.tensor([3, 7]), 9  # three label positions (shifted: 3, 4 of row 0, 1 of row 1)
    widths = []
    head.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[0]))
    loss = label_positions_loss(hidden, labels, head, chunk_tokens=2)
    loss.backward()
    reference = torch.nn.functional.cross_entropy(
        head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert max(widths[:-1]) <= 2 and sum(widths[:2]) == 3  # rows of label positions only, two at a time


def test_chunked_loss_puts_the_head_back_when_the_forward_fails():
    model, processor = _targeted("qwen2_5_vl", {"language": LORA})
    batch = make_batch("qwen2_5_vl", processor)
    install_chunked_loss(model)
    head = model.get_base_model().lm_head
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the forward
        model(**{**batch, "image_grid_thw": batch["image_grid_thw"] * 2})
    assert model.get_base_model().lm_head is head


def test_chunked_loss_with_no_label_gives_zero_and_a_graph():
    head = torch.nn.Linear(4, 10)
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    loss = label_positions_loss(hidden, torch.full((1, 3), -100), head)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None


# --- mllama padding tiles ----------------------------------------------------------------------------


def _mllama_tile_batch(processor, widths=(32, 64)) -> dict:
    """One image per sample, 32 px high and `widths` wide (32: one tile and a padding tile; 64: two tiles)."""
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red square on the left"}]},
    ]
    text = processor.apply_chat_template(chat, tokenize=False)
    images = [Image.new("RGB", (width, 32), (200, 30, 30 + 40 * i)) for i, width in enumerate(widths)]
    for image in images:
        image.paste((20, 220, 20), (0, 0, 20, 20))
    batch = processor(
        images=[[image] for image in images], text=[text] * len(images), return_tensors="pt", padding=True
    )
    assert batch["aspect_ratio_mask"].tolist() == [[[1, int(width > 32)]] for width in widths]
    return _caption_only_labels(dict(batch))


@pytest.mark.parametrize("widths", [(32, 64), (32, 32)])
def test_dropping_padding_tiles_keeps_the_loss_and_gradients(widths):
    components = {"cross_attention": LORA, "language": LORA, "projector": ComponentConfig(mode="full")}
    model, processor = _targeted("mllama", components)
    batch = _mllama_tile_batch(processor, widths)
    keys = []  # cross-attention keys per sample, as the language model receives them
    model.get_base_model().model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: keys.append(kwargs["cross_attention_states"].numel() // len(widths) // 32),
        with_kwargs=True,
    )
    plain = loss_and_grads(model, batch)
    handle = install_padding_tile_drop(model)
    patched = loss_and_grads(model, batch)
    per_tile = model.get_base_model().model.vision_model.num_patches
    assert keys == [2 * per_tile, max(widths) // 32 * per_tile]  # the most real tiles of one sample
    assert any("multi_modal_projector" in name for name in patched[1])
    _assert_same(plain, patched)
    model.eval()  # evaluation and generate run the model's own path
    model(**batch)
    assert keys[-1] == 2 * per_tile
    handle.remove()


def test_padding_tiles_refuses_other_families():
    model, _ = _targeted("qwen2_5_vl", {"language": LORA})
    with pytest.raises(ValueError, match="not an mllama"):
        install_padding_tile_drop(model)


# --- checkpointing -----------------------------------------------------------------------------------


def test_checkpoint_every_second_layer_of_one_component_keeps_the_gradients():
    model, processor = tiny_vlm("qwen2_5_vl")
    _enable_checkpointing(model)
    model, _ = apply_targeting(model, {"language": LORA, "vision": LORA})
    randomize_lora_b(model)
    model.train()
    batch = make_batch("qwen2_5_vl", processor, batch_size=2)
    everywhere = loss_and_grads(model, batch)
    cmap = find_components(model.get_base_model())
    kept = checkpoint_layers(model, cmap, ["language"], every=2)
    assert kept == {"language": 1, "vision": 0}  # 2 decoder layers -> the first; vision layers off
    flags = {
        name: module.gradient_checkpointing
        for name, module in model.get_base_model().named_modules()
        if hasattr(module, "gradient_checkpointing") and name.endswith(("layers.0", "layers.1", "blocks.0"))
    }
    assert flags == {
        "model.visual.blocks.0": False,
        "model.language_model.layers.0": True,
        "model.language_model.layers.1": False,
    }
    _assert_same(everywhere, loss_and_grads(model, batch))


def test_apply_speed_installs_what_the_section_asks():
    model, processor = _targeted("mllama", {"language": LORA})
    cmap = find_components(model.get_base_model())
    patches = apply_speed(model, SpeedConfig(), ModelConfig(), cmap)
    assert len(patches.handles) == 4 and patches.checkpointed == {}
    patches.remove()
    plain = apply_speed(
        model,
        SpeedConfig(loss="model", padding_tiles="keep", vision_states="model", padding_read="model"),
        ModelConfig(),
        cmap,
    )
    assert plain.handles == []
    assert model(**make_batch("mllama", processor)).logits is not None


# --- LoRA inputs under autocast ------------------------------------------------------------------------


def _mixed_precision_model(arch: str, component: ComponentConfig):
    """A bf16 model whose trained weights are fp32, as build_model leaves it under train.mixed_precision."""
    model, processor = _targeted(arch, {"language": component})
    model.to(torch.bfloat16)
    for param in model.parameters():
        param.data = param.data.float() if param.requires_grad else param.data
    return model, make_batch(arch, processor, batch_size=2, model=model)


def _autocast_step(model, batch) -> tuple[tuple[float, dict], int]:
    """Loss and gradients of one bf16-autocast step, and the dtype casts it ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = loss_and_grads(model, batch)
    return result, sum(event.count for event in prof.key_averages() if event.key == "aten::_to_copy")


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "idefics3"])
def test_lora_inputs_left_to_autocast_give_the_same_loss_and_gradients_with_fewer_casts(arch):
    model, batch = _mixed_precision_model(arch, LORA)
    flags = [module.__dict__.get("cast_input_dtype_enabled", "unset") for module in model.modules()]
    plain, plain_casts = _autocast_step(model, batch)
    handle = keep_lora_inputs_16bit(model)
    assert len(handle.layers) > 0
    patched, casts = _autocast_step(model, batch)
    _assert_same(plain, patched, rtol=0)  # autocast cast the fp32 copy back to the same 16-bit values
    assert plain_casts - casts == 4 * len(handle.layers)  # input cast and recast, and both their backwards
    handle.remove()
    assert [module.__dict__.get("cast_input_dtype_enabled", "unset") for module in model.modules()] == flags
    _assert_same(plain, _autocast_step(model, batch)[0], rtol=0)


def test_dora_layers_keep_their_input_cast_and_apply_speed_leaves_inputs_without_autocast():
    model, _ = _mixed_precision_model("idefics3", ComponentConfig(mode="dora", rank=4, alpha=8.0))
    assert keep_lora_inputs_16bit(model).layers == []
    model, _ = _targeted("idefics3", {"language": LORA})
    cmap = find_components(model.get_base_model())
    assert apply_speed(model, SpeedConfig(loss="model"), ModelConfig(), cmap).handles == []  # no autocast
    assert apply_speed(model, SpeedConfig(loss="model", lora_input="fp32"), ModelConfig(), cmap, True).handles == []
    patches = apply_speed(model, SpeedConfig(loss="model"), ModelConfig(), cmap, autocast=True)
    assert [type(handle).__name__ for handle in patches.handles] == ["_InputCasts"]


# --- optimizers and recipe checks --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "adamw_fused", "paged_adamw_8bit"])
def test_every_optimizer_steps_the_groups(name):
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64))]
    groups = [{"name": "a", "params": weights[:1], "lr": 1e-2}, {"name": "b", "params": weights[1:], "lr": 1e-3}]
    before = [w.detach().clone() for w in weights]
    with pytest.warns(UserWarning) if name == "paged_adamw_8bit" else _nothing():  # paged: CPU falls back
        optimizer = build_optimizer(groups + [{"name": "empty", "params": []}], SpeedConfig(optimizer=name), 1e-4)
        for weight in weights:
            weight.grad = torch.ones_like(weight)
        optimizer.step()
    assert [g["name"] for g in optimizer.param_groups] == ["a", "b"]
    moved = [float((w.detach() - b).abs().max()) for w, b in zip(weights, before)]
    assert moved[0] == pytest.approx(1e-2, rel=0.05) and moved[1] == pytest.approx(1e-3, rel=0.05)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_speed_section_errors_name_the_field():
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(
            {
                "components": {"language": {"mode": "lora"}},
                "speed": {"checkpoint_components": ["visoin"], "checkpoint_every": 0, "optimizer": "sgd"},
            }
        )
    message = str(error.value)
    assert "speed.checkpoint_components: unknown component 'visoin'" in message
    assert "speed.checkpoint_every: must be a positive integer" in message
    assert "speed.optimizer" in message
