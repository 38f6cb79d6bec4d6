"""The built-in demo model (built from a GGUF file, cached as a model folder) exports too: merged logits equal the
adapter model's within bfloat16 rounding, and plain transformers generates the adapter model's greedy tokens."""

import pytest
import torch
from deploy_runs import (
    BF16_FACTOR,
    IMAGES,
    ROOT,
    bf16_noise,
    greedy_tokens,
    logits,
    max_diff,
    perturb_trained,
    plain_transformers_tokens,
    prompt_inputs,
    with_dtype,
)
from transformers import AutoModelForImageTextToText

from vlm_tune.checkpoint import save_checkpoint
from vlm_tune.export import export_checkpoint
from vlm_tune.model.build import build_model, load_for_inference
from vlm_tune.recipe import dump_recipe, load_recipe


@pytest.mark.slow
def test_the_demo_model_exports_and_plain_transformers_generates_its_tokens(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", [f"train.output_dir={tmp_path / 'run'}"])
    built = build_model(recipe, training=True)  # vision and projector full, LoRA r16 on the decoder
    perturb_trained(built.model, seed=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_recipe(recipe, run_dir / "recipe.yaml")
    save_checkpoint(run_dir, 1, built.model, {"epoch": 0, "batches_done": 1})
    del built

    merged16 = export_checkpoint(run_dir, tmp_path / "merged", merge=True)  # the recipe's bfloat16
    adapter16, processor = load_for_inference(recipe, run_dir)
    inputs16 = prompt_inputs(processor, recipe, dtype=torch.bfloat16)
    expected16 = logits(adapter16, inputs16)
    merged = AutoModelForImageTextToText.from_pretrained(merged16, dtype="auto").eval()
    diff16 = max_diff(logits(merged, inputs16), expected16)
    noise = bf16_noise(recipe, run_dir, inputs16, expected16)
    print(f"demo: merged vs adapter model max |logit diff| bfloat16 {diff16:.2e} (bfloat16 rounding {noise:.2e})")
    assert diff16 <= BF16_FACTOR * noise
    del adapter16, merged

    merged32 = export_checkpoint(run_dir, tmp_path / "merged32", merge=True, dtype="float32")
    plain = plain_transformers_tokens({"demo": merged32}, IMAGES[:2])["demo"]
    adapter32, _ = load_for_inference(with_dtype(recipe, "float32"), run_dir)
    ours = greedy_tokens(adapter32, prompt_inputs(processor, recipe))
    print(f"demo: greedy tokens, vlm_tune adapter model {ours}, plain transformers merged {plain}")
    assert plain == ours
