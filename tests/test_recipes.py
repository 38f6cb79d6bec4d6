"""Every shipped recipe validates and applies to a tiny random model of its architecture."""

from pathlib import Path

import pytest
import torch
from tiny import tiny_vlm_folder

from vlm_tune.data import build_dataset
from vlm_tune.data.chat_collate import train_collator_for
from vlm_tune.model.load import load_model
from vlm_tune.model.targeting import apply_targeting
from vlm_tune.recipe import COMPONENT_NAMES, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# recipe file -> the tiny architecture standing in for its hub model
ARCH_OF_RECIPE = {
    "demo.yaml": "idefics3",
    "demo_vqa.yaml": "idefics3",
    "smolvlm_256m.yaml": "idefics3",
    "smolvlm_2b.yaml": "idefics3",
    "qwen2_5_vl_3b_qlora.yaml": "qwen2_5_vl",
    "qwen2_5_vl_7b_qlora.yaml": "qwen2_5_vl",
    "llama3_2_11b_vision_qlora.yaml": "mllama",
    "llava_1_5_7b.yaml": "llava",
    "paligemma_3b.yaml": "paligemma",
}


def test_every_recipe_file_is_covered():
    shipped = {p.name for p in RECIPES.glob("*.yaml") if not p.name.startswith("_")}
    assert shipped == set(ARCH_OF_RECIPE)


@pytest.mark.parametrize("name", sorted(ARCH_OF_RECIPE))
def test_recipe_applies_to_a_tiny_model_of_its_architecture(name, tmp_path, monkeypatch):
    monkeypatch.chdir(RECIPES.parent)  # recipes name data paths relative to the repository root
    recipe = load_recipe(RECIPES / name)
    recipe.model.name_or_path = str(tiny_vlm_folder(ARCH_OF_RECIPE[name], tmp_path))
    recipe.model.dtype = "float32"
    if recipe.model.quantization is not None:
        recipe.model.quantization.compute_dtype = "float32"
    model, processor = load_model(recipe.model, recipe.components, verbose=False)
    model, report = apply_targeting(model, recipe.components)

    rows = {row.component: row for row in report.rows}
    for component in COMPONENT_NAMES:
        policy = recipe.component(component)
        if policy.mode == "frozen":
            assert component not in rows or rows[component].trainable_params == 0, component
            continue
        assert rows[component].mode == policy.mode and rows[component].trainable_params > 0, component
        if policy.mode == "lora":
            assert rows[component].rank == policy.rank, component

    data_cfg = recipe.data
    data_cfg.num_workers = 0
    dataset = build_dataset(data_cfg.train, data_cfg, train=True)
    batch = train_collator_for(dataset, processor, data_cfg)([dataset[0], dataset[1]])
    batch.pop("skipped")
    batch = {key: value.to(model.device) for key, value in batch.items()}  # 4-bit models load onto the GPU if any
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_benchmark_recipes_validate_on_top_of_the_demo():
    adapt = load_recipe(RECIPES.parent / "benchmarks" / "relevance_adapt.yaml", [])
    demo = load_recipe(RECIPES / "demo.yaml", [])
    assert adapt.train.init_from == "runs/demo/checkpoint-220" and adapt.train.max_steps == 100
    assert adapt.components["vision"].mode == demo.components["vision"].mode == "full"  # the demo checkpoint fits
    assert adapt.components["vision"].lr == 1e-5 and adapt.components["language"] == demo.components["language"]
