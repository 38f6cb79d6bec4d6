"""The wrapper in the toolkit's flow: LoRA model in, report row, optimizer group, save/load, clear errors."""

import pytest
import torch
from relevance_batches import component_map, generate_batch, model_and_processor, train_batch

from vlm_tune.model.components import find_components
from vlm_tune.model.targeting import apply_targeting, param_groups
from vlm_tune.recipe import ComponentConfig, RelevanceConfig
from vlm_tune.relevance import RELEVANCE_FILE, attach_relevance, relevance_row


def _lora_language(model):
    return apply_targeting(model, {"language": ComponentConfig(mode="lora", rank=4, alpha=8)})


def test_relevance_trains_next_to_lora_and_shows_as_its_own_row_and_group():
    model, processor = model_and_processor("idefics3")
    peft_model, report = _lora_language(model)
    cfg = RelevanceConfig(enabled=True, keep=0.5, lr=3e-3)
    wrapper = attach_relevance(peft_model, cfg, find_components(peft_model.get_base_model()))
    assert wrapper.model is peft_model  # the adapter is saved through wrapper.model

    row, names = relevance_row(wrapper, cfg, default_lr=1e-4)
    params = dict(wrapper.named_parameters())
    assert row.component == "relevance" and row.mode == "full" and row.lr == 3e-3
    assert names and all(name.startswith("relevance.") and name in params for name in names)
    assert row.trainable_params == sum(params[name].numel() for name in names)
    assert 0 < row.share < 1
    report.add_row(row, names)
    assert "relevance" in report.table()

    groups = {group["name"]: group for group in param_groups(wrapper, report, 1e-4, 0.0)}
    assert groups["relevance"]["lr"] == 3e-3 and groups["language"]["lr"] == 1e-4
    assert len(groups["relevance"]["params"]) == len(names)

    wrapper.train()
    optimizer = torch.optim.AdamW(list(groups.values()))
    before = {name: params[name].detach().clone() for name in names}
    wrapper(**train_batch(processor)).loss.backward()
    lora_grads = [p.grad for n, p in params.items() if "lora_" in n and p.requires_grad]
    assert lora_grads and all(g is not None for g in lora_grads)
    optimizer.step()
    assert any(not torch.equal(before[name], params[name]) for name in names)


def test_keep_all_equals_the_lora_model_it_wraps():
    model, processor = model_and_processor("qwen2_5_vl")
    peft_model, _ = _lora_language(model)
    batch = train_batch(processor)
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = attach_relevance(peft_model, RelevanceConfig(enabled=True, keep=1.0), component_map(model))(**batch)
    torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=0)


def test_save_and_load_restore_the_modules(tmp_path):
    model, processor = model_and_processor("llava")
    cfg = RelevanceConfig(enabled=True, keep=0.25, summary_token=True)
    trained = attach_relevance(model, cfg, component_map(model))
    with torch.no_grad():
        for parameter in trained.relevance.parameters():
            parameter.add_(torch.randn_like(parameter))
    trained.save(tmp_path)
    assert (tmp_path / RELEVANCE_FILE).is_file()

    fresh = attach_relevance(model, cfg, component_map(model))
    fresh.load(tmp_path)
    for (name, saved), (_, loaded) in zip(trained.relevance.state_dict().items(), fresh.relevance.state_dict().items()):
        assert torch.equal(saved, loaded), name
    inputs = generate_batch(processor)
    settings = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(trained.generate(**inputs, **settings), fresh.generate(**inputs, **settings))

    other = attach_relevance(model, RelevanceConfig(enabled=True, keep=0.25, hidden_size=32), component_map(model))
    with pytest.raises(ValueError, match="do not fit"):
        other.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="relevance.enabled"):
        fresh.load(tmp_path / "missing")


def test_unsupported_family_is_refused_with_the_supported_list():
    model, _ = model_and_processor("blip2")
    with pytest.raises(ValueError, match=r"'blip-2' is not supported; supported: .*idefics3.*qwen2_5_vl"):
        attach_relevance(model, RelevanceConfig(enabled=True), component_map(model))


def test_text_only_batches_pass_through_unchanged():
    model, processor = model_and_processor("llava")
    wrapper = attach_relevance(model, RelevanceConfig(enabled=True, keep=0.25), component_map(model))
    tokens = processor.tokenizer(["a red circle", "two blue squares"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(**tokens).logits, model(**tokens).logits)


def test_truncated_image_tokens_give_a_clear_error():
    model, processor = model_and_processor("llava")
    batch = train_batch(processor)
    image_token = model.config.image_token_id
    batch["input_ids"][0, (batch["input_ids"][0] == image_token).nonzero()[0]] = 10  # lose one placeholder
    wrapper = attach_relevance(model, RelevanceConfig(enabled=True, keep=0.5), component_map(model))
    with pytest.raises(ValueError, match="image placeholder tokens but the vision side produced"):
        wrapper(**batch)


def test_scores_are_computed_in_float32_under_bf16_autocast():
    """bf16 rounds away the small differences between an image's tokens; the scorer must not run in it."""
    from vlm_tune.relevance.sequence import VisualTokens
    from vlm_tune.relevance.wrapper import RelevanceModules

    torch.manual_seed(0)
    modules = RelevanceModules(RelevanceConfig(enabled=True, keep=0.5), visual_size=32, text_size=32)
    features = 5.0 + 0.01 * torch.randn(2, 16, 32)  # close tokens, as a vision tower's often are
    tokens = VisualTokens(features, torch.ones(2, 16, dtype=torch.bool), torch.tensor([0, 1]), [(4, 4)] * 2)
    prompt, prompt_valid = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    plain = modules(tokens, prompt, prompt_valid).relevance
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = modules(tokens, prompt, prompt_valid).relevance
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, atol=1e-5, rtol=0)
