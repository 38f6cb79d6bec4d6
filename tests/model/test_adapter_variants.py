"""Adapter variants per component on tiny models: AdaLoRA with one budget per component (on a 4-bit Qwen2.5-VL base),
LoftQ's smaller quantisation error, PiSSA / OLoRA adapters that plain PEFT applies to the original base."""

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from tiny import tiny_vlm, tiny_vlm_folder
from vlm_batches import make_batch

from vlm_tune.model.adalora import allocate_ranks, layer_ranks, orthogonality_penalty, schedule_rank_allocation
from vlm_tune.model.adapter_files import TRAINING_FILE, save_adapter
from vlm_tune.model.inits import InitError, SixteenBitWeights, quantization_error
from vlm_tune.model.load import load_model
from vlm_tune.model.targeting import apply_targeting, base_name
from vlm_tune.recipe import AdaLoraSchedule, ComponentConfig, ModelConfig, QuantizationConfig

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return tiny_vlm_folder("qwen2_5_vl", tmp_path_factory.mktemp("qwen"))


def _four_bit(folder):
    cfg = ModelConfig(
        name_or_path=str(folder), dtype="float32", quantization=QuantizationConfig(compute_dtype="float32")
    )
    return load_model(cfg, verbose=False)


def test_adalora_allocates_each_component_within_its_own_budget_on_a_4bit_base(qwen_folder, tmp_path):
    model, processor = _four_bit(qwen_folder)
    policy = {
        "vision": ComponentConfig(mode="lora", rank=6, alpha=12, variant="adalora", target_rank=3),
        "language": ComponentConfig(mode="lora", rank=4, alpha=8, variant="adalora", target_rank=2),
    }
    peft_model, report = apply_targeting(model, policy)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in peft_model.modules())
    schedule_rank_allocation(peft_model, 8, AdaLoraSchedule(warmup=1, final=2, interval=1, orth_reg_weight=0.1))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch("qwen2_5_vl", processor, batch_size=2)
    peft_model.train()
    for step in range(1, 9):  # the loop's order: backward, optimizer step, allocation, zero_grad
        (peft_model(**batch).loss + orthogonality_penalty(peft_model)).backward()
        optimizer.step()
        allocate_ranks(peft_model, step)
        optimizer.zero_grad()
    ranks = layer_ranks(peft_model)
    for component, target in (("vision", 3), ("language", 2)):
        values = list(ranks[component].values())
        assert len(set(values)) > 1, (component, values)  # allocation moved rank between layers
        assert sum(values) <= target * len(values)  # and kept the component's own budget
        assert all(0 <= v <= policy[component].rank for v in values)
    print({c: list(r.values()) for c, r in ranks.items()})

    with torch.no_grad():  # train mode: bitsandbytes' CPU inference path needs layers wider than its block (64)
        expected = peft_model(**batch).logits
    save_adapter(peft_model, tmp_path)
    assert (tmp_path / TRAINING_FILE).is_file()
    plain = PeftModel.from_pretrained(_four_bit(qwen_folder)[0], tmp_path / "adapter").train()
    assert plain.peft_config["default"].peft_type.value == "LORA"  # kept triplets as LoRA layers of their final rank
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, expected, atol=1e-4)


def test_loftq_starts_closer_to_the_16bit_weights_than_4bit_alone(qwen_folder):
    model, _ = _four_bit(qwen_folder)
    peft_model, _ = apply_targeting(model, {"language": ComponentConfig(mode="lora", rank=4, alpha=8, init="loftq")})
    weights = SixteenBitWeights(str(qwen_folder))  # qwen saves its decoder as model.layers.*: found by suffix
    before = after = 0.0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and getattr(module.get_base_layer().weight, "quant_state", None) is not None:
            error_4bit, error_loftq = quantization_error(module, weights.weight_of(base_name(name), module))
            before, after = before + error_4bit**2, after + error_loftq**2
    print(f"||W - Q(W)|| = {before**0.5:.4f}, ||W - (Q(W) + BA)|| = {after**0.5:.4f}")
    assert after**0.5 < 0.9 * before**0.5


def test_loftq_without_the_16bit_weights_names_the_fix(qwen_folder, tmp_path):
    model, _ = _four_bit(qwen_folder)
    model.name_or_path = str(tmp_path)  # a folder without safetensors
    with pytest.raises(InitError, match="loftq reads the 16-bit weights.*has no safetensors files"):
        apply_targeting(model, {"language": ComponentConfig(mode="lora", init="loftq")})


@pytest.mark.parametrize("init,variant", [("pissa", "lora"), ("olora", "rslora")])
def test_principal_inits_ship_an_adapter_for_the_original_base(init, variant, tmp_path):
    model, processor = tiny_vlm("idefics3")
    batch = make_batch("idefics3", processor)
    with torch.no_grad():
        base_logits = model(**batch).logits
    policy = {
        "vision": ComponentConfig(mode="lora", rank=2, variant=variant),  # default start next to the converted one
        "language": ComponentConfig(mode="lora", rank=4, alpha=8, init=init, variant=variant),
    }
    peft_model, _ = apply_targeting(model, policy)
    peft_model.eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, base_logits, atol=1e-5)  # W_res + B0 A0 = W
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))  # as after training
        trained = peft_model(**batch).logits
    save_adapter(peft_model, tmp_path)
    plain = PeftModel.from_pretrained(tiny_vlm("idefics3")[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, trained, atol=1e-5)
        assert torch.allclose(plain.merge_and_unload()(**batch).logits, trained, atol=1e-4)
    assert not torch.allclose(trained, base_logits, atol=1e-3)
