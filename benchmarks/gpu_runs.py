"""One configuration of the GPU benchmark, in its own process: `python benchmarks/gpu_runs.py 'SPEC_JSON'`.

Systems: `baseline` (the common transformers + peft recipe), `unsloth` (FastVisionModel), `vlm_tune` (its model
path: load_model + apply_targeting + apply_speed + the speed section's optimizer, bf16 autocast). Prints one line
`RESULT {...}` per measured variant. benchmarks/gpu.py builds the specs and the table.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from gpu_measure import autocast, count_flops, memory_at_peak, profile_steps, sync, time_steps  # noqa: E402
from gpu_plans import PLAIN  # noqa: E402

LORA = {"mode": "lora", "rank": 16, "alpha": 32.0, "targets": ["attention", "mlp"]}
QUANT = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
# The baseline's LoRA targets: the language model's attention and MLP (mllama: its cross-attention too).
TEXT_MODEL = {"mllama": "language_model", "qwen2_5_vl": "language_model", "idefics3": "text_model"}
LEAVES = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


def recipe_dict(spec: dict, speed: dict | None = None) -> dict:
    """The vlm_tune recipe of a spec (the model path and the train command share it)."""
    import torch

    components = {"language": dict(LORA)}
    if spec["model"] == "mllama":
        components["cross_attention"] = dict(LORA, targets=["attention"])
    data = {"num_workers": 4, "group_by_length": True, "max_length": 2048}
    data.update({"qwen2_5_vl": {"max_pixels": 448 * 448}, "idefics3": {"image_size": 768}}.get(spec["model"], {}))
    if spec.get("captions"):
        data["train"] = {"format": "coco", "path": spec["captions"]}
    model = {"name_or_path": spec["folder"], "gradient_checkpointing": spec.get("checkpointing", False)}
    if spec["setting"] == "qlora":
        model["quantization"] = dict(QUANT)
        if spec.get("keep_16bit") is not None:
            model["quantization"]["keep_16bit"] = spec["keep_16bit"]
    train = {"batch_size": spec["batch_size"], "lr": 1e-4, "max_grad_norm": 0.0, "log_every": 1, "save_every": 0}
    train["mixed_precision"] = "bf16" if torch.cuda.is_available() or not spec.get("tiny") else "no"
    return {"model": model, "components": components, "data": data, "train": train, "speed": speed or {}}


# --- batches --------------------------------------------------------------------------------------------


def _to_device(batch: dict, device, vision_dtype) -> dict:
    batch = {k: v.to(device) for k, v in batch.items() if hasattr(v, "to")}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(vision_dtype)
    return batch


def make_batches(spec: dict, processor, recipe, count: int) -> list[dict]:
    """The batches a run cycles through: one synthetic batch, or the caption set's first batches in train order."""
    from gpu_models import synthetic_items
    from torch.utils.data import DataLoader

    from vlm_tune.data import TrainCollator, build_dataset, build_train_sampler

    collator = TrainCollator(processor, recipe.data)
    if spec["workload"] != "captions":
        items = synthetic_items(
            spec["model"], spec["batch_size"], spec.get("tiny", False), spec["workload"] == "high_res"
        )
        batch = collator(items)
        batch.pop("skipped")
        return [batch]
    dataset = build_dataset(recipe.data.train, recipe.data, train=True, seed=0)
    sampler = build_train_sampler(dataset, recipe.data, spec["batch_size"], seed=0)
    loader = DataLoader(dataset, sampler=sampler, batch_size=spec["batch_size"], collate_fn=collator)
    batches = []
    for batch in loader:
        batch.pop("skipped")
        batches.append(batch)
        if len(batches) == count:
            return batches
    return batches


def make_step(model, optimizer):
    """One training step: bf16 autocast forward, backward, optimizer step."""

    def step(batch):
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# --- the systems ----------------------------------------------------------------------------------------


def run_vlm_tune(spec: dict) -> list[dict]:
    """vlm_tune's model path, one result per variant (variants share the loaded model)."""
    import torch

    from vlm_tune.errors import VlmTuneError
    from vlm_tune.model.build import build_model
    from vlm_tune.model.load import _enable_checkpointing
    from vlm_tune.model.speed import apply_speed, build_optimizer, checkpoint_layers
    from vlm_tune.recipe import RelevanceConfig, recipe_from_dict

    recipe = recipe_from_dict(recipe_dict(spec, PLAIN))  # the levers come per variant
    device = "cuda" if torch.cuda.is_available() else "cpu"
    built = build_model(recipe, training=True)  # the builder the train command uses
    model, processor, cmap, groups = built.model, built.processor, built.components, built.groups
    model.to(device) if spec["setting"] != "qlora" else None  # 4-bit weights are placed at load
    model.train()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    base = model.get_base_model()
    steps = spec["steps"]
    batches = make_batches(spec, processor, recipe, steps["warmup"] + steps["windows"] * steps["per_window"])
    vision_dtype = next(base.get_submodule(cmap.modules["vision"][0]).parameters()).dtype
    batches = [_to_device(b, device, vision_dtype) for b in batches]
    results = []
    for variant in spec["variants"]:
        if recipe.model.gradient_checkpointing:
            _enable_checkpointing(base)
            if not variant.get("checkpointing", True):
                checkpoint_layers(model, cmap, [], 1)
        try:  # a refused lever (speed.liger_kernel on a CPU, say) is its variant's error row; the others still run
            run = recipe_from_dict(recipe_dict(spec, variant.get("speed", {})))
            patches = apply_speed(model, run.speed, run.model, cmap, autocast=True)  # make_step's bf16 autocast
        except VlmTuneError as error:
            results.append({"variant": variant["name"], "error": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
        stepped, extra = model, []
        if variant.get("relevance_keep"):
            from vlm_tune.relevance import attach_relevance

            stepped = attach_relevance(model, RelevanceConfig(enabled=True, keep=variant["relevance_keep"]), cmap)
            extra = [{"name": "relevance", "params": list(stepped.relevance.parameters()), "lr": 1e-4}]
        optimizer = build_optimizer(groups + extra, run.speed, 1e-4)
        step = make_step(stepped, optimizer)
        result = time_steps(step, batches, steps)
        if spec.get("count_flops") and not results:
            result.update(_guarded(count_flops, stepped, batches[0], cmap))
        if spec.get("profile") and not results:
            result.update(_guarded(profile_steps, step, batches[0], spec["profile"]) or {})
        if spec.get("memory") and variant is spec["variants"][-1]:
            result.update(_guarded(memory_at_peak, step, batches[0], spec["memory"]))
        results.append({**result, "variant": variant["name"], "weights_gib": weights_gib, **_batch_stats(batches)})
        patches.remove()
        del optimizer, step, stepped
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
    return results


def _guarded(function, *args) -> dict:
    """A measurement that must not cost the timing already taken: its error becomes a field."""
    try:
        return function(*args) or {}
    except Exception as error:  # noqa: BLE001 - reported in the results, the run goes on
        return {f"{function.__name__}_error": f"{type(error).__name__}: {str(error)[:200]}"}


def _batch_stats(batches: list[dict]) -> dict:
    samples = sum(b["input_ids"].shape[0] for b in batches)
    return {
        "tokens_per_sample": sum(int(b["attention_mask"].sum()) for b in batches) / samples,
        "label_tokens_per_sample": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) / samples,
        "batch_size": batches[0]["input_ids"].shape[0],
    }


def time_peft_model(spec: dict, model, name: str, weights_gib) -> list[dict]:
    """Time a PEFT model of another system (AdamW over its trainable parameters) on the spec's batches."""
    import torch
    from transformers import AutoProcessor

    from vlm_tune.recipe import recipe_from_dict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    processor = AutoProcessor.from_pretrained(spec["folder"])
    steps = spec["steps"]
    count = steps["warmup"] + steps["windows"] * steps["per_window"]
    batches = make_batches(spec, processor, recipe_from_dict(recipe_dict(spec)), count)
    vision_dtype = next(p for n, p in model.named_parameters() if "vision" in n or "visual" in n).dtype
    batches = [_to_device(b, device, vision_dtype) for b in batches]
    result = time_steps(make_step(model, optimizer), batches, steps)
    return [{**result, "variant": name, "weights_gib": weights_gib, **_batch_stats(batches)}]


def run_baseline(spec: dict) -> list[dict]:
    """The common recipe: bnb NF4 + double quant, prepare_model_for_kbit_training, non-reentrant checkpointing,
    LoRA r16 / alpha 32 / dropout 0.05 on the language model's attention and MLP, AdamW, bf16 autocast."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0} if device == "cuda" else None}
    ckpt = {"use_reentrant": False}
    if spec["setting"] == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForImageTextToText.from_pretrained(spec["folder"], **kwargs)
    if spec["setting"] == "qlora":
        model = prepare_model_for_kbit_training(model, spec["checkpointing"], gradient_checkpointing_kwargs=ckpt)
    elif spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        model.enable_input_require_grads()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    targets = rf".*{TEXT_MODEL[spec['model']]}.*\.({LEAVES})"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))
    model.train()
    return time_peft_model(spec, model, "baseline", weights_gib)


def run_unsloth(spec: dict) -> list[dict]:
    """Unsloth's FastVisionModel: the same LoRA on the language model, its own checkpointing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import unsloth  # noqa: F401 - must come before transformers
    from unsloth import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(
        spec["folder"],
        load_in_4bit=spec["setting"] == "qlora",
        use_gradient_checkpointing="unsloth" if spec["checkpointing"] else False,
        dtype=torch.bfloat16,
    )
    weights_gib = torch.cuda.memory_allocated() / 2**30
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=False,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=16,
        lora_alpha=32,
        lora_dropout=0,
        bias="none",
    )
    FastVisionModel.for_training(model)
    return time_peft_model(spec, model, "unsloth", weights_gib)


def run_matmul(spec: dict) -> list[dict]:
    """The card's bf16 matrix-product rate (8192^3, median of 10 after 3 warm-ups), the MFU denominator."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start) if i >= 3 else None
    return [{"variant": "matmul", "tflops": 2 * 8192**3 / statistics.median(times) / 1e12}]


SYSTEMS = {"vlm_tune": run_vlm_tune, "baseline": run_baseline, "unsloth": run_unsloth, "matmul": run_matmul}


def main() -> int:
    spec = json.loads(sys.argv[1])
    import torch

    if spec.get("memory_cap_gib") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(spec["memory_cap_gib"] / total)
    try:
        results = SYSTEMS[spec["system"]](spec)
    except torch.OutOfMemoryError as error:
        results = [
            {"variant": v["name"], "error": f"out of memory: {str(error).splitlines()[0][:160]}"}
            for v in spec.get("variants", [{"name": spec["system"]}])
        ]
    for result in results:
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
