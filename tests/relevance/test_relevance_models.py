"""Relevance on the tiny models of every wired family: identity at keep 1.0, shorter sequences, exact
per-image budgets, gradients into every relevance parameter, Qwen M-RoPE positions."""

import pytest
import torch
from relevance_batches import WIRED_ARCHS, component_map, generate_batch, model_and_processor, train_batch

from vlm_tune.recipe import RelevanceConfig
from vlm_tune.relevance import attach_relevance, keep_count


def _attach(model, **settings):
    return attach_relevance(model, RelevanceConfig(enabled=True, **settings), component_map(model))


def _capture_inputs(module):
    """Record the keyword inputs of every call of `module`; returns (list of calls, hook handle)."""
    calls = []
    handle = module.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("arch", WIRED_ARCHS)
def test_keep_all_equals_the_model_without_relevance(arch):
    model, processor = model_and_processor(arch)
    batch = train_batch(processor)
    with torch.no_grad():
        expected = model(**batch)
        got = _attach(model, keep=1.0)(**batch)
    assert got.logits.shape == expected.logits.shape
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", WIRED_ARCHS)
def test_keep_all_generates_the_same_captions(arch):
    model, processor = model_and_processor(arch)
    inputs = generate_batch(processor)
    settings = dict(max_new_tokens=5, do_sample=False)
    expected = model.generate(**inputs, **settings)
    got = _attach(model, keep=1.0).generate(**inputs, **settings)
    assert torch.equal(got, expected)


def test_keep_all_beam_search_matches_for_a_shortening_and_a_cross_attention_family():
    for arch in ("qwen2_5_vl", "mllama"):
        model, processor = model_and_processor(arch)
        inputs = generate_batch(processor)
        settings = dict(max_new_tokens=4, num_beams=2, do_sample=False)
        assert torch.equal(
            _attach(model, keep=1.0).generate(**inputs, **settings), model.generate(**inputs, **settings)
        ), arch


def _tokens_per_image(model, batch) -> list[int]:
    """Visual tokens of each image (one per sample here), counted from the batch itself."""
    if model.config.model_type == "mllama":
        vision = model.config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + class token
        return [int(tiles.sum()) * per_tile for tiles in batch["aspect_ratio_mask"][:, 0]]
    return (batch["input_ids"] == model.config.image_token_id).sum(-1).tolist()


@pytest.mark.parametrize("arch", WIRED_ARCHS)
@pytest.mark.parametrize("keep", [0.5, 2])
def test_every_image_keeps_its_budget_and_the_language_model_reads_fewer_tokens(arch, keep):
    model, processor = model_and_processor(arch)
    batch = train_batch(processor, count=3)
    wrapper = _attach(model, keep=keep)
    calls, handle = _capture_inputs(model.model)  # the *Model under the LM head: what the decoder is given
    with torch.no_grad():
        output = wrapper(**batch)
    handle.remove()

    sizes = _tokens_per_image(model, batch)
    budgets = [keep_count(keep, n) for n in sizes]
    assert min(budgets) < max(sizes)  # the test really drops tokens
    selection = wrapper.last_selection
    assert wrapper.last_unit_sample.tolist() == [0, 1, 2]
    assert selection.token_counts.tolist() == sizes
    assert selection.kept_counts.tolist() == budgets
    assert selection.slot_valid.sum(-1).tolist() == budgets  # no summary token: slots are the kept tokens

    if arch == "mllama":  # fewer cross-attention keys and values: each sample's kept tokens
        assert calls[0]["cross_attention_states"].shape[1] == max(budgets)
        assert output.logits.shape[1] == batch["input_ids"].shape[1]
    else:  # a shorter sequence: every dropped placeholder is gone
        dropped = torch.tensor(sizes) - torch.tensor(budgets)
        real_lengths = batch["attention_mask"].sum(-1) - dropped
        seen = calls[0]["inputs_embeds"].shape[1]
        assert seen == batch["input_ids"].shape[1] - int(dropped.min())
        assert calls[0]["attention_mask"].sum(-1).tolist() == real_lengths.tolist()
        assert output.logits.shape[1] == seen


@pytest.mark.parametrize("method", ["relevance", "random"])
def test_the_summary_token_takes_one_of_the_budgets_slots(method):
    model, processor = model_and_processor("llava")
    batch = train_batch(processor, count=3)
    wrapper = _attach(model, keep=0.25, method=method, summary_token=True)
    with torch.no_grad():
        wrapper(**batch)
    sizes = _tokens_per_image(model, batch)
    budgets = [keep_count(0.25, n) for n in sizes]
    assert min(budgets) >= 2  # room for the summary
    selection = wrapper.last_selection
    assert selection.kept_counts.tolist() == [k - 1 for k in budgets]  # K - 1 kept tokens...
    assert selection.slot_valid.sum(-1).tolist() == budgets  # ...plus the summary: K slots, as without it
    assert (selection.summary_slot >= 0).all()


@pytest.mark.parametrize("arch", WIRED_ARCHS)
def test_gradients_reach_every_relevance_parameter(arch):
    model, processor = model_and_processor(arch)
    wrapper = _attach(model, keep=0.5, summary_token=True)
    wrapper.train()
    wrapper(**train_batch(processor)).loss.backward()
    names = [name for name, _ in wrapper.relevance.named_parameters()]
    assert any(name.startswith("knowing.") for name in names) and any(n.startswith("balancing.") for n in names)
    assert any(name.startswith("attending.") for name in names)
    for name, parameter in wrapper.relevance.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_kept_tokens_keep_their_mrope_positions(arch):
    model, processor = model_and_processor(arch)
    batch = train_batch(processor, count=3)
    full, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )  # [3, B, T]
    wrapper = _attach(model, keep=0.5)
    calls, handle = _capture_inputs(model.model.language_model)
    with torch.no_grad():
        wrapper(**batch)
    handle.remove()
    seen = calls[0]["position_ids"]  # [3, B, L]
    assert seen.shape[0] == 3

    # Expected: the full sequence's positions at every non-dropped position, in order
    # (one image per sample here, so image u's placeholders are sample u's image tokens).
    is_image = batch["input_ids"] == model.config.image_token_id
    kept = ~is_image
    selection = wrapper.last_selection
    assert int(selection.kept_counts.min()) < int(selection.token_counts.max())
    for unit, sample in enumerate(wrapper.last_unit_sample.tolist()):
        image_positions = is_image[sample].nonzero().flatten()
        kept[sample, image_positions[selection.slots[unit][selection.slot_valid[unit]]]] = True
    for sample in range(batch["input_ids"].shape[0]):
        expected = full[:, sample, kept[sample]]
        got = seen[:, sample, : expected.shape[1]]  # right padding: real tokens first
        assert torch.equal(got, expected)
        assert int(calls[0]["attention_mask"][sample].sum()) == int(
            (kept[sample] & batch["attention_mask"][sample].bool()).sum()
        )


@pytest.mark.parametrize("method", ["random", "pool"])
def test_baselines_select_the_same_budget_and_generate(method):
    model, processor = model_and_processor("idefics3")
    wrapper = _attach(model, keep=0.5, method=method)
    assert sum(p.numel() for p in wrapper.relevance.parameters()) == 0
    with torch.no_grad():
        loss = wrapper(**train_batch(processor)).loss
    assert torch.isfinite(loss)
    assert wrapper.last_selection.kept_counts.tolist() == [2, 2]  # 4 tokens per tiny Idefics3 image
    inputs = generate_batch(processor)
    generated = wrapper.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_idefics3_split_images_budget_every_crop():
    model, processor = model_and_processor("idefics3")
    processor.image_processor.do_image_splitting = True
    processor.image_processor.size = {"longest_edge": 64}  # 2x2 crops + the global image per picture
    batch = train_batch(processor)
    crops = batch["pixel_values"].shape[1]
    assert crops > 1
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(_attach(model, keep=1.0)(**batch).logits, expected, atol=1e-5, rtol=0)
        wrapper = _attach(model, keep=0.5)
        wrapper(**batch)
    selection = wrapper.last_selection
    assert wrapper.last_unit_sample.tolist() == [0] * crops + [1] * crops
    assert selection.kept_counts.tolist() == [keep_count(0.5, int(n)) for n in selection.token_counts]
