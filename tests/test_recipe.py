"""Recipe: YAML + dotted overrides, typed, every problem reported at once with its dotted path."""

import re

import pytest
import yaml

from vlm_tune.recipe import (
    ComponentConfig,
    QuantizationConfig,
    Recipe,
    RecipeError,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
)
from vlm_tune.recipe_files import apply_overrides, parse_override

GOOD = {
    "model": {
        "name_or_path": "HuggingFaceTB/SmolVLM-256M-Instruct",
        "dtype": "bfloat16",
        "quantization": {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": "bfloat16",
            "keep_16bit": ["vision", "projector"],
        },
    },
    "components": {
        "vision": {"mode": "lora", "rank": 8, "alpha": 16, "targets": ["attention"], "variant": "lora", "lr": 2e-5},
        "projector": {"mode": "full", "lr": 1e-4},
        "language": {
            "mode": "lora",
            "rank": 16,
            "alpha": 32,
            "dropout": 0.05,
            "targets": ["attention", "mlp"],
            "modules": [r"model\.text_model", "lm_head"],
        },
    },
}


def _errors(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(raw)
    return [line.strip().removeprefix("- ") for line in str(error.value).splitlines()[1:]]


def _write(tmp_path, raw, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_good_recipe_is_typed():
    recipe = recipe_from_dict(GOOD)
    assert isinstance(recipe.model.quantization, QuantizationConfig)
    assert recipe.model.quantization.keep_16bit == ["vision", "projector"]
    vision = recipe.components["vision"]
    assert isinstance(vision, ComponentConfig) and vision.rank == 8 and vision.alpha == 16.0
    assert isinstance(vision.alpha, float) and vision.lr == 2e-5
    assert recipe.components["language"].modules == [r"model\.text_model", "lm_head"]
    assert recipe.component("cross_attention").mode == "frozen"  # not named: frozen default


def test_load_recipe_with_overrides(tmp_path):
    path = _write(tmp_path, GOOD)
    recipe = load_recipe(
        path,
        overrides=[
            "components.vision.rank=16",
            "components.cross_attention.mode=lora",
            "model.quantization=null",
            "components.language.targets=[q_proj, v_proj]",
        ],
    )
    assert recipe.components["vision"].rank == 16
    assert recipe.components["cross_attention"].mode == "lora"
    assert recipe.model.quantization is None
    assert recipe.components["language"].targets == ["q_proj", "v_proj"]


def test_every_problem_is_reported_once_with_its_path():
    raw = {
        "model": {"name_or_path": "x", "dtyp": "bfloat16", "quantization": {"bits": 8, "keep_16bit": ["vison"]}},
        "components": {
            "vision": {"mode": "lora", "rank": -4},
            "projector": {"mode": "half"},
            "language": {"mode": "lora", "rank": 0, "alpha": "big", "targets": "attention", "extra": 1},
            "audio": {"mode": "lora"},
        },
    }
    errors = _errors(raw)
    expected = [
        "model.dtyp: unknown key (did you mean 'dtype'?)",
        "model.quantization.bits: expected one of 4, got 8",
        "model.quantization.keep_16bit: unknown component 'vison', expected one of "
        "['vision', 'projector', 'cross_attention', 'language']",
        "components.vision.rank: must be a positive integer, got -4",
        "components.projector.mode: expected one of 'frozen', 'lora', 'full', 'prompt', 'prefix', got 'half'",
        "components.language.extra: unknown key",
        "components.language.rank: must be a positive integer, got 0",
        "components.language.alpha: expected a number, got 'big'",
        "components.language.targets: expected a list of a string, got 'attention'",
        "components.audio: unknown component, expected one of ['vision', 'projector', 'cross_attention', 'language']",
    ]
    for needle in expected:
        assert any(line.startswith(needle) for line in errors), (needle, errors)
    assert len(errors) == len(expected)


@pytest.mark.parametrize(
    "section,value,message",
    [
        ("rank", 0, "components.vision.rank: must be a positive integer, got 0"),
        ("rank", 2.5, "components.vision.rank: expected an integer, got 2.5"),
        ("rank", True, "components.vision.rank: expected an integer, got True"),
        ("alpha", 0, "components.vision.alpha: must be positive, got 0.0"),
        ("dropout", 1.0, "components.vision.dropout: must be in [0, 1), got 1.0"),
        (
            "variant",
            "qlora",
            "components.vision.variant: expected one of 'lora', 'dora', 'rslora', 'adalora', got 'qlora'",
        ),
        ("target_rank", 4, "components.vision.target_rank: only used with variant adalora (variant is lora)"),
        ("num_virtual_tokens", 0, "components.vision.num_virtual_tokens: must be a positive integer, got 0"),
        ("lr", -1e-4, "components.vision.lr: must be positive, got -0.0001"),
        ("targets", [], "components.vision.targets: must name at least one kind or module when mode is lora"),
        ("modules", [], "components.vision.modules: must hold at least one regex, or be omitted"),
    ],
)
def test_component_values(section, value, message):
    raw = {"components": {"vision": {"mode": "lora", section: value}}}
    assert _errors(raw) == [message]


def test_all_frozen_is_refused_with_the_fix():
    errors = _errors({"components": {"vision": {"mode": "frozen"}}})
    assert errors == [
        "components: every component is frozen, nothing would train; set components.<name>.mode to lora or full"
    ]


def test_wrong_section_types():
    errors = _errors({"model": "smolvlm", "components": ["vision"]})
    assert "model: expected a mapping, got 'smolvlm'" in errors
    assert "components: expected a mapping, got ['vision']" in errors


def test_override_errors():
    with pytest.raises(RecipeError, match="expected key.path=value"):
        parse_override("components.vision.rank")
    with pytest.raises(RecipeError, match="components.vision is 'lora', not a mapping"):
        apply_overrides({"components": {"vision": "lora"}}, ["components.vision.rank=4"])
    assert parse_override("components.vision.rank=16") == (["components", "vision", "rank"], 16)


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 as a string; the recipe must still see a learning rate
    path = tmp_path / "recipe.yaml"
    path.write_text("components:\n  vision: {mode: lora, lr: 1e-4}\n")
    recipe = load_recipe(path, overrides=["train.lr=2e-5", "components.vision.weight_decay=1E-2"])
    assert recipe.components["vision"].lr == 1e-4 and recipe.train.lr == 2e-5
    assert recipe.components["vision"].weight_decay == 0.01
    assert _errors({"components": {"vision": {"mode": "lora", "lr": "fast"}}}) == [
        "components.vision.lr: expected a number, got 'fast'"
    ]


def test_override_values_are_validated_like_the_file(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(RecipeError, match=r"components\.vision\.rank: must be a positive integer, got -4"):
        load_recipe(path, overrides=["components.vision.rank=-4"])


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- components\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping of sections"):
        load_recipe(listing)


def test_dump_and_reload_round_trip(tmp_path):
    recipe = recipe_from_dict(GOOD)
    dump_recipe(recipe, tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again == recipe and isinstance(again, Recipe)


def test_relevance_values_are_checked_together():
    raw = {"relevance": {"enabled": True, "keep": 0.25, "exploration": -0.5, "start_step": -1, "temperature": 0}}
    assert sorted(_errors(raw)) == [
        "relevance.exploration: must be >= 0, got -0.5",
        "relevance.start_step: must be >= 0, got -1",
        "relevance.temperature: must be positive, got 0.0",
    ]


@pytest.mark.parametrize(
    "raw,message",
    [
        (
            {"components": {"language": {"mode": "lora", "init": "loftq"}}},
            "components.language.init: loftq initialises LoRA from the 4-bit quantisation error, but "
            "model.quantization is not set",
        ),
        (
            {"model": {"quantization": {}}, "components": {"vision": {"mode": "lora", "init": "loftq"}}},
            "components.vision.init: loftq initialises LoRA from the 4-bit quantisation error, but vision is in "
            "quantization.keep_16bit",
        ),
        (
            {"model": {"quantization": {}}, "components": {"language": {"mode": "lora", "init": "pissa"}}},
            "components.language.init: pissa needs the 16-bit weights of language",
        ),
        (
            {"components": {"projector": {"mode": "full", "init": "pissa"}}},
            "components.projector.init: pissa starts a LoRA adapter, but mode is full; use mode: lora",
        ),
        (
            {"components": {"language": {"mode": "frozen", "init": "olora"}, "vision": {"mode": "lora"}}},
            "components.language.init: olora starts a LoRA adapter, but mode is frozen",
        ),
        (
            {"components": {"language": {"mode": "lora", "variant": "dora", "init": "pissa"}}},
            "components.language.init: pissa works with variant lora or rslora, not dora",
        ),
        (
            {"components": {"language": {"mode": "lora", "variant": "adalora", "rank": 8, "target_rank": 8}}},
            "components.language.target_rank: must be between 1 and rank - 1 (7), got 8",
        ),
        (
            {"components": {"vision": {"mode": "prompt"}}},
            "components.vision.mode: prompt adds virtual tokens to the language decoder; use it there",
        ),
        (
            {"components": {"language": {"mode": "prefix"}}, "relevance": {"enabled": True}},
            "components.language.mode: prefix does not combine with relevance.enabled yet",
        ),
        (
            {"components": {"language": {"mode": "lora"}}, "train": {"adalora": {"warmup": 1.5, "interval": 0}}},
            "train.adalora.warmup: a fraction must be in [0, 1), got 1.5",
        ),
    ],
)
def test_adapter_variant_combinations_name_the_field(raw, message):
    errors = _errors(raw)
    assert any(line.startswith(message) for line in errors), errors


def test_adalora_schedule_counts_and_fractions():
    raw = {"components": {"language": {"mode": "lora", "variant": "adalora"}}, "train": {"adalora": {"warmup": 5}}}
    recipe = recipe_from_dict({**raw, "train": {"adalora": {"warmup": 5, "final": 0.25}}})
    assert recipe.train.adalora.steps(100) == (5, 25)
    assert recipe.component("language").adalora_target_rank == 5  # two thirds of the default rank 8


def test_sizes_attention_and_fault_budgets_are_checked_with_their_field():
    errors = _errors(
        {
            **GOOD,
            "model": {"attn_implementation": "fast_please"},
            "data": {"max_pixels": -5, "image_size": 0},
            "train": {"skip_nonfinite_steps": -1},
        }
    )
    assert "model.attn_implementation: unknown 'fast_please', expected one of ['eager', 'sdpa'" in errors[0]
    assert "data.image_size: must be a positive integer or null, got 0" in errors
    assert "data.max_pixels: must be a positive integer or null, got -5" in errors
    assert "train.skip_nonfinite_steps: must be >= 0, got -1" in errors
    kernel = recipe_from_dict({**GOOD, "model": {"attn_implementation": "kernels-community/flash-attn"}})
    assert kernel.model.attn_implementation == "kernels-community/flash-attn"


def test_keys_spelt_as_hugging_face_does_get_the_key_of_this_recipe():
    raw = {
        "learning_rate": 1e-4,
        "num_train_epochs": 3,
        "output_dir": "runs/x",
        "lr": 1e-4,
        "train": {"gradient_accumulation_steps": 4, "per_device_train_batch_size": 2, "bf16": True},
        "components": {"language": {"mode": "lora", "lora_alpha": 32}},
    }
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(raw)
    message = str(caught.value)
    for line in (
        "learning_rate: unknown key (a Hugging Face name; here it is train.lr)",
        "num_train_epochs: unknown key (a Hugging Face name; here it is train.epochs)",
        "output_dir: unknown key (a Hugging Face name; here it is train.output_dir)",
        "train.gradient_accumulation_steps: unknown key (a Hugging Face name; here it is train.grad_accum)",
        "train.per_device_train_batch_size: unknown key (a Hugging Face name; here it is train.batch_size)",
        "train.bf16: unknown key (a Hugging Face name; here it is train.mixed_precision: bf16)",
        "components.language.lora_alpha: unknown key (a Hugging Face name; here it is components.language.alpha)",
        "lr: unknown key (did you mean train.lr or relevance.lr?)",  # a key of a section, one level too high
    ):
        assert f"  - {line}\n" in message + "\n", line


@pytest.mark.parametrize(
    "train, data_eval, message",
    [
        ({"keep_best": "accuracy"}, True, "train.keep_best: unknown metric 'accuracy', expected one of ['eval_loss'"),
        ({"early_stopping_patience": 0}, True, "train.early_stopping_patience: must be a positive integer, got 0"),
        ({"keep_best": "eval_loss"}, False, "train.keep_best: needs an evaluation set; set data.eval.path"),
        ({"keep_best": "CIDEr-D"}, True, "train.keep_best: CIDEr-D is computed every train.eval_generate_every steps"),
        ({"report_to": ["comet"]}, True, "train.report_to: expected a list of one of 'tensorboard', 'mlflow', 'wandb'"),
    ],
)
def test_best_checkpoint_early_stopping_and_trackers_are_checked(train, data_eval, message):
    raw = {"components": {"language": {"mode": "lora"}}, "train": train}
    if data_eval:
        raw["data"] = {"eval": {"path": "val.json"}}
    with pytest.raises(RecipeError, match=re.escape(message)):
        recipe_from_dict(raw)
    recipe_from_dict(
        {**raw, "train": {"keep_best": "CIDEr-D", "eval_generate_every": 5}, "data": {"eval": {"path": "v"}}}
    )
