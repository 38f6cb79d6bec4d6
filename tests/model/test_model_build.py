"""build_model: one way to the trainable model (components found once, weights from a checkpoint or run folder,
fp32 masters under mixed precision) and load_for_inference on top of it."""

import json

import pytest
import torch
from tiny import tiny_vlm_folder
from vlm_batches import randomize_lora_b

from vlm_tune.checkpoint import CheckpointError, save_checkpoint
from vlm_tune.constants import RELEVANCE_GROUP
from vlm_tune.model import components as components_module
from vlm_tune.model.build import build_model, load_for_inference
from vlm_tune.model.components import find_components
from vlm_tune.model.load import load_vlm
from vlm_tune.recipe import QuantizationConfig, recipe_from_dict


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_vlm_folder("idefics3", tmp_path_factory.mktemp("build"))


def _recipe(folder, **relevance):
    return recipe_from_dict(
        {
            "model": {"name_or_path": str(folder), "dtype": "float32"},
            "components": {"projector": {"mode": "full", "lr": 1e-3}, "language": {"mode": "lora", "rank": 4}},
            "train": {"lr": 1e-4, "weight_decay": 0.01, "mixed_precision": "no"},
            "relevance": relevance,
        }
    )


def _count_component_maps(monkeypatch) -> list:
    """Record every ComponentMap made (one per find_components call that succeeds)."""
    made = []
    real = components_module.ComponentMap.__post_init__

    def counting(self):
        made.append(self)
        real(self)

    monkeypatch.setattr(components_module.ComponentMap, "__post_init__", counting)
    return made


def test_training_build_finds_components_once_and_groups_every_trained_part(folder, monkeypatch):
    made = _count_component_maps(monkeypatch)
    built = build_model(_recipe(folder, enabled=True, keep=0.5, lr=3e-3), training=True)
    assert len(made) == 1 and built.components is made[0]
    assert type(built.model).__name__ == "RelevanceWrapper"
    assert [row.component for row in built.report.rows][-1] == RELEVANCE_GROUP
    groups = {group["name"]: group for group in built.groups}
    assert list(groups) == ["projector", "language", RELEVANCE_GROUP]
    assert (groups["projector"]["lr"], groups["language"]["lr"], groups[RELEVANCE_GROUP]["lr"]) == (1e-3, 1e-4, 3e-3)
    assert all(group["weight_decay"] == 0.01 for group in built.groups)
    trainable = {id(p) for p in built.model.parameters() if p.requires_grad}
    assert {id(p) for group in built.groups for p in group["params"]} == trainable


def test_four_bit_load_finds_components_once_on_the_skeleton_and_they_match_the_model(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    recipe = _recipe(tiny_vlm_folder("qwen2_5_vl", tmp_path))
    recipe.model.dtype, recipe.model.quantization = "bfloat16", QuantizationConfig()
    made = _count_component_maps(monkeypatch)
    loaded = load_vlm(recipe.model, recipe.components)
    assert len(made) == 1  # on the empty skeleton, before the weights load
    assert loaded.components == find_components(loaded.model, recipe.components)  # same names after loading


def test_inference_without_checkpoint_is_the_bare_model_and_with_a_run_folder_its_newest_weights(folder, tmp_path):
    recipe = _recipe(folder, enabled=True, keep=0.5)
    bare, _ = load_for_inference(recipe)
    assert type(bare).__name__ == "Idefics3ForConditionalGeneration" and not bare.training

    trained = build_model(recipe, training=True)
    randomize_lora_b(trained.model)
    with torch.no_grad():
        for param in trained.model.relevance.parameters():
            param.add_(1.0)
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run", 1, build_model(recipe).model, {"epoch": 0, "batches_done": 0})
    save_checkpoint(tmp_path / "run", 2, trained.model, {"epoch": 0, "batches_done": 0})
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "relevance.json").read_text())
    assert saved["keep"] == 0.5 and saved["enabled"] is True

    model, _ = load_for_inference(recipe, tmp_path / "run")  # the run folder: its newest checkpoint, 2
    built = build_model(recipe, checkpoint=tmp_path / "run", training=False)
    assert not model.training and built.groups == []
    expected = dict(trained.model.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad or name.startswith("relevance."):
            assert torch.equal(param, expected[name]), name


def test_relevance_weights_of_other_settings_name_the_settings(folder, tmp_path):
    recipe = _recipe(folder, enabled=True, keep=0.5)
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run", 1, build_model(recipe).model, {"epoch": 0, "batches_done": 0})
    recipe.relevance.hidden_size = 32
    with pytest.raises(CheckpointError, match=r"do not fit.*relevance\.hidden_size=64 \(recipe: 32\)"):
        build_model(recipe, checkpoint=tmp_path / "run", training=False)


def test_mixed_precision_keeps_fp32_masters_and_loads_checkpoint_weights_unrounded(folder, tmp_path):
    recipe = _recipe(folder)
    recipe.model.dtype, recipe.train.mixed_precision = "bfloat16", "bf16"
    first = build_model(recipe, training=True)
    trained = [p for group in first.groups for p in group["params"]]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.bfloat16 for p in first.model.parameters() if not p.requires_grad)
    with torch.no_grad():
        for param in trained:
            param.copy_(torch.full_like(param, 1.0 + 2**-12))  # not a bfloat16 number
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run", 1, first.model, {"epoch": 0, "batches_done": 0})
    again = build_model(recipe, checkpoint=tmp_path / "run", training=True)
    assert all(torch.all(p == 1.0 + 2**-12) for group in again.groups for p in group["params"])


def test_lora_inputs_are_left_to_autocast_only_under_mixed_precision(folder):
    def casting(recipe) -> set:
        built = build_model(recipe, training=True)
        return {getattr(m, "cast_input_dtype_enabled", True) for m in built.model.modules() if hasattr(m, "lora_A")}

    recipe = _recipe(folder)
    assert casting(recipe) == {True}  # train.mixed_precision: no, so the fp32 trained weights need fp32 inputs
    recipe.train.mixed_precision = "bf16"
    assert casting(recipe) == {False}
    recipe.speed.lora_input = "fp32"
    assert casting(recipe) == {True}


def test_a_checkpoint_of_another_lora_rank_names_the_component_and_both_ranks(folder, tmp_path):
    built = build_model(_recipe(folder), training=True)  # language rank 4
    (tmp_path / "run").mkdir()
    checkpoint = save_checkpoint(tmp_path / "run", 1, built.model, {"epoch": 0, "batches_done": 0})
    other = _recipe(folder)
    other.components["language"].rank = 8
    with pytest.raises(
        CheckpointError, match=r"components.language was trained with LoRA rank 4, the recipe gives it rank 8; "
    ) as raised:
        build_model(other, checkpoint=checkpoint, training=True)
    assert "set components.language.rank=4" in str(raised.value) and "\n" not in str(raised.value)
