"""Export: the merged model computes what the adapter model computes (float32 and bfloat16, also for a run trained
on a 4-bit base), plain transformers loads it in a process that never imports vlm_tune, the adapter export loads
with plain PEFT, relevance modules go beside the merged weights, and an export never overwrites other files."""

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from deploy_runs import (
    BF16_FACTOR,
    IMAGES,
    LANGUAGE_ONLY,
    bf16_noise,
    greedy_tokens,
    logits,
    make_run,
    max_diff,
    plain_transformers_tokens,
    prompt_inputs,
    with_dtype,
)
from transformers import AutoModelForImageTextToText

from vlm_tune.export import export_checkpoint
from vlm_tune.exported import ExportError, read_export_info
from vlm_tune.model.build import load_exported, load_for_inference

ARCHS = ("llava", "qwen2_5_vl", "mllama")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def runs(root) -> dict:
    """arch -> (run folder, recipe, float32 merged export) for the three families."""
    made = {}
    for arch in ARCHS:
        run_dir, recipe = make_run(arch, root / arch)
        made[arch] = (run_dir, recipe, export_checkpoint(run_dir, root / arch / "merged", merge=True))
    return made


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_logits_equal_the_adapter_models_in_float32_and_bfloat16(arch, runs, root):
    run_dir, recipe, merged_dir = runs[arch]
    adapter_model, processor = load_for_inference(recipe, run_dir)
    inputs = prompt_inputs(processor, recipe)
    expected = logits(adapter_model, inputs)
    base = AutoModelForImageTextToText.from_pretrained(recipe.model.name_or_path).eval()
    base_gap = max_diff(logits(base, inputs), expected)  # what the adapter changes
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    diff32 = max_diff(logits(merged, inputs), expected)

    base_file = Path(recipe.model.name_or_path) / "model.safetensors"
    base_bytes = hashlib.sha256(base_file.read_bytes()).hexdigest()
    merged16_dir = export_checkpoint(run_dir, root / arch / "merged-bf16", merge=True, dtype="bfloat16")
    assert hashlib.sha256(base_file.read_bytes()).hexdigest() == base_bytes  # merged in place, in memory only
    merged16 = AutoModelForImageTextToText.from_pretrained(merged16_dir, dtype="auto").eval()
    assert {p.dtype for p in merged16.parameters()} == {torch.bfloat16}
    adapter16, _ = load_for_inference(with_dtype(recipe, "bfloat16"), run_dir)
    inputs16 = prompt_inputs(processor, recipe, dtype=torch.bfloat16)
    expected16 = logits(adapter16, inputs16)
    diff16 = max_diff(logits(merged16, inputs16), expected16)
    noise = bf16_noise(recipe, run_dir, inputs16, expected16)
    print(
        f"{arch}: merged vs adapter model max |logit diff| float32 {diff32:.2e}, bfloat16 {diff16:.2e} "
        f"(the adapter model's bfloat16 rounding: {noise:.2e}; the adapter's effect: {base_gap:.2e})"
    )
    assert diff32 <= 1e-5 < base_gap
    assert diff16 <= BF16_FACTOR * noise < base_gap
    assert read_export_info(merged16_dir).dtype == "bfloat16"


def test_a_run_trained_on_a_4bit_base_merges_into_the_16bit_original_weights(root, caplog):
    pytest.importorskip("bitsandbytes")
    components = {"projector": {"mode": "full"}, "language": {"mode": "lora", "rank": 4, "alpha": 8}}
    run_dir, recipe = make_run("qwen2_5_vl", root / "qlora", components=components, dtype="bfloat16", quantization={})
    quantized, processor = load_for_inference(recipe, run_dir)
    assert any(hasattr(p, "quant_state") for p in quantized.parameters())  # trained and served on 4-bit weights

    with caplog.at_level(logging.INFO, logger="vlm_tune.export"):
        merged_dir = export_checkpoint(run_dir, root / "qlora" / "merged", merge=True)
    assert "4-bit base" in caplog.text
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype="auto").eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}

    sixteen_bit = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, quantization=None))
    adapter16, _ = load_for_inference(sixteen_bit, run_dir)  # the same adapter on the 16-bit base
    inputs = prompt_inputs(processor, recipe, dtype=torch.bfloat16)
    expected = logits(adapter16, inputs)
    diff = max_diff(logits(merged, inputs), expected)
    noise = bf16_noise(sixteen_bit, run_dir, inputs, expected)
    quantization_gap = max_diff(logits(quantized, inputs), expected)
    print(
        f"4-bit-trained qwen2_5_vl: merged vs adapter on the 16-bit base max |logit diff| {diff:.2e} (bfloat16 "
        f"rounding {noise:.2e}); the 4-bit base + adapter is {quantization_gap:.2e} away"
    )
    assert diff <= BF16_FACTOR * noise


def test_plain_transformers_loads_the_merged_folders_and_generates_the_adapter_models_tokens(runs):
    plain = plain_transformers_tokens({arch: merged_dir for arch, (_, _, merged_dir) in runs.items()}, IMAGES[:2])
    base_differs = []
    for arch, (run_dir, recipe, _) in runs.items():
        model, processor = load_for_inference(recipe, run_dir)
        inputs = prompt_inputs(processor, recipe)
        ours = greedy_tokens(model, inputs)
        with model.disable_adapter():
            base_tokens = greedy_tokens(model, inputs)
        print(f"{arch}: greedy tokens, vlm_tune adapter model {ours}, plain transformers merged {plain[arch]}")
        assert plain[arch] == ours
        base_differs.append(base_tokens != ours)
    assert any(base_differs)  # the adapter changes what is generated, so equal tokens say the merge carried it


def test_the_adapter_export_loads_with_plain_peft_and_carries_recipe_and_model_card(runs, root):
    from peft import PeftModel

    run_dir, recipe, _ = runs["llava"]
    checkpoint = run_dir / "checkpoint-2"
    (checkpoint / "eval-test").mkdir()
    evaluation = {"metrics": {"CIDEr-D": 0.4321, "BLEU-4": 0.125}, "checkpoint": str(checkpoint), "num_images": 2}
    (checkpoint / "eval-test" / "metrics.json").write_text(json.dumps(evaluation))
    out = export_checkpoint(run_dir, root / "llava-adapter")

    assert {p.name for p in out.iterdir()} == {"adapter", "recipe.yaml", "README.md", "export.json"}
    assert not read_export_info(out).merged
    base = AutoModelForImageTextToText.from_pretrained(recipe.model.name_or_path)
    plain = PeftModel.from_pretrained(base, out / "adapter").eval()
    ours, processor = load_for_inference(recipe, run_dir)
    inputs = prompt_inputs(processor, recipe)
    assert torch.allclose(logits(plain, inputs), logits(ours, inputs), atol=1e-6)
    card = (out / "README.md").read_text()
    assert recipe.model.name_or_path in card and "| CIDEr-D | 0.4321 |" in card
    assert "vision     lora" in card and "2 optimizer steps" in card
    reloaded, _, used = load_exported(out)  # vlm_tune loads it as it loads the checkpoint
    assert used.components == recipe.components
    assert torch.equal(logits(reloaded, inputs), logits(ours, inputs))


def test_relevance_modules_go_beside_the_merged_weights_with_a_warning(root, caplog):
    relevance = {"enabled": True, "keep": 0.5}
    run_dir, recipe = make_run("llava", root / "relevance", components=LANGUAGE_ONLY, relevance=relevance)
    with caplog.at_level(logging.WARNING, logger="vlm_tune.export"):
        out = export_checkpoint(run_dir, root / "relevance" / "merged", merge=True)
    assert "reads every visual token" in caplog.text
    assert (out / "relevance" / "relevance.safetensors").is_file() and not list(out.glob("relevance*"))[1:]
    trained, processor = load_for_inference(recipe, run_dir)
    inputs = prompt_inputs(processor, recipe)

    plain = AutoModelForImageTextToText.from_pretrained(out).eval()
    every_token = trained.model  # the adapter model inside the relevance wrapper reads every visual token
    assert max_diff(logits(plain, inputs), logits(every_token, inputs)) <= 1e-5

    served, _, _ = load_exported(out)  # vlm_tune applies the relevance modules again
    assert type(served).__name__ == "RelevanceWrapper"
    with torch.no_grad():
        kept = served.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected = trained.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(kept, expected)


def test_an_export_never_replaces_other_files_and_replaces_an_export_only_when_asked(runs, root):
    run_dir = runs["llava"][0]
    busy = root / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="other files"):
        export_checkpoint(run_dir, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    first = export_checkpoint(run_dir, root / "again")
    with pytest.raises(ExportError, match="--overwrite"):
        export_checkpoint(run_dir, first)
    assert export_checkpoint(run_dir, first, overwrite=True) == first and read_export_info(first) is not None
    with pytest.raises(ExportError, match="add --merge"):
        export_checkpoint(run_dir, root / "dtype", dtype="float16")
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_a_checkpoint_outside_its_run_folder_needs_its_recipe(runs, root):
    import shutil

    run_dir = runs["llava"][0]
    alone = root / "copied" / "checkpoint-2"
    shutil.copytree(run_dir / "checkpoint-2", alone)
    with pytest.raises(ExportError, match="--recipe"):
        export_checkpoint(alone, root / "copied-export")
    out = export_checkpoint(alone, root / "copied-export", recipe=run_dir / "recipe.yaml")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
