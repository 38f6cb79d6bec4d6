"""speed.activation_budget_gib: checkpointing on for the fewest layers that bring the saved activations under the
budget, measured by a probe of the first batch; the loss and gradients stay those of full checkpointing."""

import pytest
import torch
from tiny import tiny_vlm
from vlm_batches import loss_and_grads, make_batch, randomize_lora_b

from vlm_tune.model.checkpoint_budget import (
    GIB,
    SavedBytes,
    candidate_layers,
    choose_checkpointed,
    install_activation_budget,
    measure_saved_bytes,
)
from vlm_tune.model.load import _enable_checkpointing
from vlm_tune.model.targeting import apply_targeting
from vlm_tune.recipe import ComponentConfig, RecipeError, recipe_from_dict

LORA = ComponentConfig(mode="lora", rank=4, alpha=8.0)


def _checkpointed_model(arch: str = "qwen2_5_vl"):
    model, processor = tiny_vlm(arch)
    _enable_checkpointing(model)
    model, _ = apply_targeting(model, {"language": LORA, "vision": LORA})
    randomize_lora_b(model)
    model.train()
    return model, make_batch(arch, processor, batch_size=2)


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd keeps for backward in a real forward (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = (tensor, storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    total = sum(size for _, size in kept.values())
    loss.backward()
    return total


def test_the_largest_savings_are_checkpointed_first_until_the_budget_holds():
    saved = SavedBytes(layers=[10, 30, 20], inputs=[2, 2, 2], other=5)  # 65 bytes with no layer checkpointed
    assert choose_checkpointed(saved, 100) == ([False, False, False], 65)
    assert choose_checkpointed(saved, 40) == ([False, True, False], 37)  # layer 1 saves 28
    assert choose_checkpointed(saved, 1) == ([True, True, True], 11)  # over budget even so: all of them


def test_the_probe_counts_what_a_forward_without_checkpointing_keeps():
    model, batch = _checkpointed_model()
    layers = candidate_layers(model)
    assert len(layers) == 4  # 2 vision blocks, 2 decoder layers of the tiny Qwen2.5-VL
    saved = measure_saved_bytes(model.get_base_model(), layers, (), batch)
    assert all(size > inputs > 0 for size, inputs in zip(saved.layers, saved.inputs))
    assert all(layer.gradient_checkpointing for layer in layers)  # the probe put checkpointing back
    for layer in layers:
        layer.gradient_checkpointing = False
    none = _saved_bytes(model, batch)
    assert saved.other + sum(saved.layers) == pytest.approx(none, rel=0.05)


def test_a_budget_between_none_and_all_checkpoints_some_layers_and_keeps_loss_and_gradients():
    model, batch = _checkpointed_model()
    everywhere = loss_and_grads(model, batch)
    layers = candidate_layers(model)
    saved = measure_saved_bytes(model.get_base_model(), layers, (), batch)
    full, none = saved.other + sum(saved.inputs), saved.other + sum(saved.layers)
    budget = (full + none) / 2
    handle = install_activation_budget(model, budget / GIB)
    loss, grads = loss_and_grads(model, batch)  # the first forward probes, then trains
    assert 0 < handle.checkpointed < len(layers)
    assert handle.saved_gib * GIB <= budget
    assert _saved_bytes(model, batch) <= budget * 1.05  # what autograd really keeps with that choice
    assert loss == pytest.approx(everywhere[0], rel=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], everywhere[1][name], rtol=1e-5, atol=1e-7, msg=name)
    flags = [layer.gradient_checkpointing for layer in layers]
    loss_and_grads(model, batch)  # later steps keep the choice
    assert [layer.gradient_checkpointing for layer in layers] == flags


def test_budget_errors_name_the_fields():
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"components": {"language": {"mode": "lora"}}, "speed": {"activation_budget_gib": 0}})
    assert "speed.activation_budget_gib: must be a positive number of GiB" in str(error.value)
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(
            {
                "components": {"language": {"mode": "lora"}},
                "speed": {"activation_budget_gib": 4, "compile": "layers"},
            }
        )
    message = str(error.value)
    assert "set model.gradient_checkpointing: true, or speed.activation_budget_gib: null" in message
    assert "speed.activation_budget_gib is not checked with speed.compile: layers" in message
