"""speed.vision_cache_gib: a frozen Qwen vision tower's features, kept per image, come back for the same pixels
(and only for those), with the loss and gradients of the tower's own run."""

import pytest
import torch
from tiny import tiny_vlm
from vlm_batches import loss_and_grads, make_batch, randomize_lora_b

from vlm_tune.model.speed import SpeedError
from vlm_tune.model.targeting import apply_targeting
from vlm_tune.model.vision_cache import install_vision_cache
from vlm_tune.recipe import ComponentConfig, RecipeError, recipe_from_dict

LORA = ComponentConfig(mode="lora", rank=4, alpha=8.0)


def _targeted(arch: str, components: dict = None):
    model, processor = tiny_vlm(arch)
    model, _ = apply_targeting(model, components or {"language": LORA})
    randomize_lora_b(model)
    model.train()
    return model, processor


def _tower_runs(model) -> list:
    runs = []
    model.get_base_model().model.visual.blocks[0].register_forward_hook(lambda *_: runs.append(1))
    return runs


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_the_second_pass_over_the_same_images_skips_the_tower_with_the_same_loss_and_gradients(arch):
    model, processor = _targeted(arch)
    batch = make_batch(arch, processor, batch_size=2)
    loss, grads = loss_and_grads(model, batch)
    runs = _tower_runs(model)
    handle = install_vision_cache(model, limit_gib=1.0)
    for _ in range(2):  # the first call stores both images, the second finds them
        cached_loss, cached_grads = loss_and_grads(model, batch)
        assert cached_loss == loss
        for name in grads:
            torch.testing.assert_close(cached_grads[name], grads[name], rtol=0, atol=0, msg=name)
    assert (handle.cache.misses, handle.cache.hits, len(runs)) == (1, 1, 1)
    assert len(handle.cache.entries) == 2 and handle.cache.stored_bytes > 0
    handle.remove()
    loss_and_grads(model, batch)
    assert len(runs) == 2  # the tower's own forward is back


def test_other_pixels_run_the_tower_even_when_the_fingerprints_clash():
    model, processor = _targeted("qwen2_5_vl")
    batch = make_batch("qwen2_5_vl", processor, batch_size=2)
    handle = install_vision_cache(model, limit_gib=1.0)
    loss_and_grads(model, batch)
    other = {**batch, "pixel_values": batch["pixel_values"].flip(0)}  # same grids and sums, other pixel rows
    keys = handle.cache._keys
    handle.cache._keys = lambda pixels, grid: (keys(batch["pixel_values"], grid)[0], keys(pixels, grid)[1])
    loss_and_grads(model, other)
    assert (handle.cache.misses, handle.cache.hits) == (2, 0)  # the exact comparison refused the stored features


def test_a_full_cache_stores_nothing_more_and_the_tower_runs():
    model, processor = _targeted("qwen2_5_vl")
    batch = make_batch("qwen2_5_vl", processor, batch_size=2)
    handle = install_vision_cache(model, limit_gib=1e-9)
    for _ in range(2):
        loss_and_grads(model, batch)
    assert (handle.cache.misses, handle.cache.hits, handle.cache.entries) == (2, 0, {})


def test_other_families_trained_towers_and_recipes_are_refused_naming_the_fix():
    model, _ = _targeted("llava")
    with pytest.raises(SpeedError, match=r"not checked on llava models \(valid: qwen2_vl, qwen2_5_vl\)"):
        install_vision_cache(model, 1.0)
    model, _ = _targeted("qwen2_5_vl", {"language": LORA, "vision": LORA})
    with pytest.raises(SpeedError, match="needs the vision tower and its merger frozen"):
        install_vision_cache(model, 1.0)
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"components": {"vision": {"mode": "lora"}}, "speed": {"vision_cache_gib": 2}})
    assert "speed.vision_cache_gib keeps frozen vision features; components.vision is lora" in str(error.value)
