"""Vision pre-training of the demo model: what it renders, what each patch learns, and that it learns."""

import random

import numpy as np
import torch
from tiny import tiny_model, tiny_processor

from vlm_tune.data.shapes import NOVEL_COMBINATIONS, SPLIT_SIZES, Scene, Shape, make_scene
from vlm_tune.model import builtin
from vlm_tune.model.vision_pretraining import (
    ATTRIBUTES,
    evaluation_scenes,
    patch_targets,
    pretrain_vision_encoder,
    pretraining_scenes,
)


def test_pretraining_never_renders_a_held_out_combination_or_an_evaluation_scene():
    held_out = evaluation_scenes()
    assert len(held_out) > 500  # val, test and test_novel scenes (a few may coincide)
    scenes = pretraining_scenes(3000, held_out)
    assert len(scenes) == 3000
    assert not held_out & set(scenes)
    looks = {(shape.colour, shape.kind) for scene in scenes for shape in scene.shapes}
    assert not looks & set(NOVEL_COMBINATIONS)
    assert len(looks) == 24 - len(NOVEL_COMBINATIONS)  # every other pair is drawn
    assert make_scene("train", 0) not in scenes  # the shipped training images come first, unseen here


def test_a_scene_that_equals_an_evaluation_scene_is_skipped():
    first = make_scene("train", SPLIT_SIZES["train"])
    assert pretraining_scenes(1, frozenset())[0] == first
    assert pretraining_scenes(1, frozenset({first}))[0] == make_scene("train", SPLIT_SIZES["train"] + 1)


def _classes(targets, patch):
    return tuple(ATTRIBUTES[name][targets[row, patch]] for row, name in enumerate(ATTRIBUTES))


def test_each_patch_names_the_shape_owning_its_pixels_or_background():
    left = Shape("circle", "red", "large", 16, 33)
    right = Shape("triangle", "blue", "small", 48, 30)
    targets = patch_targets(Scene("relation", "left_of", (left, right)), grid=8)  # 8 px patches, row-major
    assert targets.shape == (len(ATTRIBUTES), 64)
    assert _classes(targets, 3 * 8 + 1) == ("red", "circle", "large", "no")  # rows 24-31, columns 8-15
    assert _classes(targets, 4 * 8 + 2) == ("red", "circle", "large", "yes")  # holds (16, 33)
    assert _classes(targets, 3 * 8 + 6) == ("blue", "triangle", "small", "yes")  # holds (48, 30)
    assert _classes(targets, 0) == ("background",) * 3 + ("no",)
    assert _classes(targets, 4 * 8 + 4)[:3] == ("background",) * 3  # between the two shapes
    drawn = (targets[0] > 0).sum().item()
    assert 8 <= drawn <= 20  # a 27 px circle and a 15 px triangle cover about this many 8 px patches
    assert targets[3].sum() == 2  # one centre patch per shape


def test_pretraining_lowers_the_patch_loss_of_a_tiny_encoder():
    torch.manual_seed(0)
    vision = tiny_model("idefics3").model.vision_model.float()
    before = {name: p.detach().clone() for name, p in vision.named_parameters()}
    result = pretrain_vision_encoder(vision, tiny_processor("idefics3").image_processor, steps=30, batch_size=16)
    assert result["loss"] < 0.7 * result["first_loss"]
    assert any(not torch.equal(before[name], p) for name, p in vision.named_parameters())


def test_a_build_leaves_the_callers_generators_and_threads_as_they_were(tmp_path, monkeypatch):
    def draws():
        return torch.rand(3), random.random(), np.random.rand()

    threads_in_build = []

    def greedy_builder(folder):  # uses every global generator, as model construction and init do
        threads_in_build.append(torch.get_num_threads())
        torch.manual_seed(123)
        draws()
        (folder / "config.json").write_text("{}")

    monkeypatch.setenv("VLM_TUNE_CACHE", str(tmp_path))
    monkeypatch.setitem(builtin.BUILTINS, "greedy", greedy_builder)
    threads = torch.get_num_threads()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = draws()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    try:
        torch.set_num_threads(1 if builtin.BUILD_THREADS != 1 else 3)
        caller_threads = torch.get_num_threads()
        builtin.resolve_builtin("vlm_tune:greedy")
        assert threads_in_build == [builtin.BUILD_THREADS] and torch.get_num_threads() == caller_threads
    finally:
        torch.set_num_threads(threads)
    after_build = draws()
    assert torch.equal(after_build[0], expected[0]) and after_build[1:] == expected[1:]
    assert (tmp_path / "models" / f"greedy-v{builtin.BUILD_VERSION}" / "config.json").is_file()
