"""The issue's Python API end to end: recipe file + overrides -> load_model -> apply_targeting."""

import pytest
from peft.tuners.lora import LoraLayer
from tiny import tiny_vlm_folder
from vlm_batches import make_batch, randomize_lora_b

import vlm_tune

RECIPE = """
model:
  name_or_path: {folder}
  dtype: bfloat16
  gradient_checkpointing: true
  quantization:
    {{bits: 4, quant_type: nf4, double_quant: true, compute_dtype: bfloat16, keep_16bit: [vision, projector]}}
components:
  vision: {{mode: lora, rank: 4, alpha: 8, targets: [attention], lr: 1e-5, variant: rslora}}
  projector: {{mode: full}}
  language: {{mode: lora, rank: 8, alpha: 16, targets: [attention, mlp], variant: rslora}}
"""


def test_recipe_to_trainable_model(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    folder = tiny_vlm_folder("qwen2_5_vl", tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(folder=folder))
    recipe = vlm_tune.load_recipe(path, overrides=["components.vision.rank=16"])
    model, processor = vlm_tune.load_model(recipe.model)
    model, report = vlm_tune.apply_targeting(model, recipe.components)
    assert "weights" in capsys.readouterr().out  # memory by component printed after loading
    ranks = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            part = "vision" if ".visual.blocks." in name else "language"
            ranks.setdefault(part, set()).add(module.lora_A["default"].weight.shape[0])
            assert ".visual.merger." not in name  # the merger is the (fully trained) projector
    assert ranks == {"vision": {16}, "language": {8}}
    assert {r.component: r.mode for r in report.rows} == {"vision": "lora", "projector": "full", "language": "lora"}
    assert model.peft_config["default"].use_rslora
    randomize_lora_b(model)
    model.train()
    batch = make_batch("qwen2_5_vl", processor, model=model)
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
