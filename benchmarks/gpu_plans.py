"""The plans of the GPU benchmark (benchmarks/gpu.py): which processes run, with which variants, and the
summaries that compare rows of one call (compiled against eager, vlm_tune against Unsloth)."""

from __future__ import annotations

PLANS = (
    "synthetic",
    "high_res",
    "real",
    "proofs",
    "unsloth",
    "compile",
    "final",
    "vision",
    "lora_input",
    "memory",
    "budget",
    "vision_cache",
    "liger",
    "vision_states",
    "padding_read",
)
PLAIN = {
    "loss": "model",
    "padding_tiles": "keep",
    "vision_states": "model",
    "padding_read": "model",
    "vision_attention": "model",
    "lora_input": "fp32",
    "optimizer": "adamw",
}  # the model path


def _variants(checkpointing: bool) -> list[dict]:
    """vlm_tune's lever variants on one loaded model."""
    rows = [
        {"name": "levers, no ckpt", "checkpointing": False},
        {"name": "plain, no ckpt", "checkpointing": False, "speed": PLAIN},
    ]
    if checkpointing:
        rows = [
            {"name": "levers, ckpt", "checkpointing": True},
            {"name": "plain, ckpt", "checkpointing": True, "speed": PLAIN},
            {"name": "levers, ckpt every 2nd", "checkpointing": True, "speed": {"checkpoint_every": 2}},
            *rows,
        ]
    return rows


def synthetic_specs(models: list[str], batch_size: int) -> list[dict]:
    """Baseline and vlm_tune for every model and setting (SmolVLM: bf16 LoRA only)."""
    specs = []
    for setting in ("qlora", "bf16"):
        for model in [m for m in models if setting == "bf16" or m != "idefics3"]:
            common = {"model": model, "setting": setting, "batch_size": batch_size, "workload": "synthetic"}
            specs.append({**common, "system": "baseline", "checkpointing": True})
            specs.append(
                {
                    **common,
                    "system": "vlm_tune",
                    "checkpointing": True,
                    "variants": _variants(True) if setting == "qlora" else [_variants(True)[0], _variants(False)[0]],
                    "count_flops": True,
                }
            )
    return specs


def high_res_specs(models: list[str], batch_size: int) -> list[dict]:
    if "qwen2_5_vl" not in models:
        return []
    variants = [
        {"name": "all visual tokens", "checkpointing": False},
        {"name": "relevance keep 0.25", "checkpointing": False, "relevance_keep": 0.25},
    ]
    common = {"model": "qwen2_5_vl", "setting": "qlora", "batch_size": batch_size, "workload": "high_res"}
    return [{**common, "system": "vlm_tune", "checkpointing": True, "variants": variants, "count_flops": True}]


EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # torch's allocator, for varying shapes
PADDING_FREE = {"name": "model path, padding-free", "checkpointing": True, "speed": {"padding_free": True}}


def real_specs(models: list[str], batch_size: int) -> list[dict]:
    """The train command and the model path on the same caption batches (QLoRA; SmolVLM bf16), checkpointing:
    eager (the model path also padding-free), the train command again with the allocator's expandable segments,
    then both compiled."""
    specs = []
    for model in models:
        setting = "bf16" if model == "idefics3" else "qlora"
        common = {
            "model": model,
            "setting": setting,
            "batch_size": batch_size,
            "workload": "captions",
            "checkpointing": True,
        }
        compiled = {"speed": {"compile": "layers"}, "compile_warmup": 1}
        path = {"checkpointing": True, "speed": compiled["speed"]}
        specs += [
            {**common, "system": "vlm_tune", "variants": [{"name": "model path", "checkpointing": True}, PADDING_FREE]},
            {**common, "system": "train_command"},
            {**common, "system": "train_command", "name": "train command, expandable segments", "env": EXPANDABLE},
            {**common, "system": "vlm_tune", "variants": [{"name": "model path, compile", **path}], **compiled},
            {**common, "system": "train_command", "name": "train command, compile", **compiled},
        ]
    return specs


PROOFS = [  # model, setting, batch, GiB cap, 16-bit components (vision 4-bit, as Unsloth and the baseline load mllama)
    ("mllama", "qlora", 4, 12, ["projector"]),
    ("mllama", "qlora", 1, 10, ["projector"]),
    ("qwen2_5_vl", "qlora", 1, 8, []),
    ("idefics3", "bf16", 8, 8, None),
]


PROOF_SPEED = {"optimizer": "paged_adamw_8bit", "offload_activations": True}


def proof_specs(models: list[str], batch_size: int) -> list[dict]:
    return [
        {
            "model": model,
            "setting": setting,
            "batch_size": batch,
            "workload": "synthetic",
            "system": "vlm_tune",
            "checkpointing": True,
            "memory_cap_gib": cap,
            "keep_16bit": keep,
            "variants": [{"name": f"under {cap} GiB", "checkpointing": True, "speed": PROOF_SPEED}],
        }
        for model, setting, batch, cap, keep in PROOFS
        if model in models
    ]


def unsloth_specs(models: list[str], batch_size: int) -> list[dict]:
    specs = []
    for model in [m for m in models if m != "idefics3"]:
        for setting in ("qlora", "bf16"):
            common = {"model": model, "setting": setting, "batch_size": batch_size, "workload": "synthetic"}
            specs.append({**common, "system": "unsloth", "checkpointing": True})
            specs.append(
                {
                    **common,
                    "system": "vlm_tune",
                    "checkpointing": True,
                    "variants": _variants(True)[:1] + _variants(False)[:1],
                }
            )
    return specs


COMPILE_VARIANTS = [  # name, checkpointing, speed section
    ("levers, ckpt", True, {}),
    ("levers, ckpt, compile", True, {"compile": "layers"}),
    ("levers, no ckpt", False, {}),
    ("levers, no ckpt, compile", False, {"compile": "layers"}),
]


def compile_specs(models: list[str], batch_size: int) -> list[dict]:
    """vlm_tune with and without `speed.compile: layers`, one process per variant (SmolVLM: bf16 LoRA only)."""
    specs = []
    for setting in ("qlora", "bf16"):
        for model in [m for m in models if setting == "bf16" or m != "idefics3"]:
            common = {"model": model, "setting": setting, "batch_size": batch_size, "workload": "synthetic"}
            for index, (name, checkpointing, speed) in enumerate(COMPILE_VARIANTS):
                variant = {"name": name, "checkpointing": checkpointing, "speed": speed}
                specs.append(
                    {
                        **common,
                        "system": "vlm_tune",
                        "checkpointing": True,
                        "variants": [variant],
                        "compile_warmup": 1,  # every variant, so all four take the same steps
                        "count_flops": index == 0,  # the MFU column of all four (counted uncompiled)
                    }
                )
    return specs


def compile_summary(rows: list[dict]) -> list[str]:
    """Per model and setting: the compiled variant's speed and memory against the same variant uncompiled."""
    timed = {(r["model"], r["setting"], r["variant"]): r for r in rows if "step_s" in r}
    lines = []
    for (model, setting, name), row in timed.items():
        eager = timed.get((model, setting, name.removesuffix(", compile")))
        if name.endswith(", compile") and eager:
            lines.append(
                f"compile: {model} {setting} {eager['variant']}: {eager['step_s'] / row['step_s']:.2f}x speed, "
                f"peak {row.get('peak_gib') or 0:.1f} against {eager.get('peak_gib') or 0:.1f} GiB, "
                f"warm-up {row.get('warmup_s', 0):.0f} against {eager.get('warmup_s', 0):.0f} s"
            )
    return lines


FINAL_PROCESSES = [  # vlm_tune's processes in the final plan: each variant twice, for the spread inside a process
    [("levers, ckpt", {}), ("levers, ckpt (again)", {})],
    [("levers, ckpt, compile", {"compile": "layers"}), ("levers, ckpt, compile (again)", {"compile": "layers"})],
]


def final_specs(models: list[str], batch_size: int) -> list[dict]:
    """Per model and setting, in one call: the baseline, Unsloth, vlm_tune eager and vlm_tune compiled (each
    variant twice on its loaded model), all with checkpointing. vlm_tune's QLoRA rows quantize the
    vision tower, as the baseline and Unsloth do (keep_16bit: projector). Unsloth's bf16 rows run last: they
    compile for minutes and may meet the deadline."""
    specs, last = [], []
    for model in models:
        for setting in ("bf16",) if model == "idefics3" else ("qlora", "bf16"):
            common = {
                "model": model,
                "setting": setting,
                "batch_size": batch_size,
                "workload": "synthetic",
                "checkpointing": True,
            }
            prefix = ""
            if setting == "qlora":  # the vision towers in 4 bit, as the baseline (and Unsloth) load them
                common["keep_16bit"], prefix = ["projector"], "4-bit vision, "
            specs.append({**common, "system": "baseline"})
            if model != "idefics3":
                (last if setting == "bf16" else specs).append({**common, "system": "unsloth"})
            for index, process in enumerate(FINAL_PROCESSES):
                variants = [{"name": prefix + name, "checkpointing": True, "speed": speed} for name, speed in process]
                process = {"system": "vlm_tune", "variants": variants, "compile_warmup": 1, "count_flops": index == 0}
                specs.append({**common, **process})
    return specs + last


def unsloth_summary(rows: list[dict]) -> list[str]:
    """Per model and setting: every vlm_tune row's samples/s and peak memory against the Unsloth row of the call."""
    timed = [r for r in rows if "step_s" in r and r.get("workload") == "synthetic" and not r.get("memory_cap_gib")]
    lines = []
    for unsloth in [r for r in timed if r["system"] == "unsloth"]:
        for row in timed:
            same = all(row.get(k) == unsloth.get(k) for k in ("model", "setting", "batch_size"))
            if same and row["system"] == "vlm_tune" and row.get("peak_gib") and unsloth.get("peak_gib"):
                speed, memory = unsloth["step_s"] / row["step_s"], row["peak_gib"] / unsloth["peak_gib"]
                weights = [r.get("weights_gib") for r in (row, unsloth)]
                loaded = f"; loaded {weights[0]:.1f} against {weights[1]:.1f}" if all(weights) else ""
                lines.append(
                    f"vs Unsloth: {row['model']} {row['setting']} {row['variant']}: {speed:.2f}x samples/s at "
                    f"{memory:.2f}x peak memory ({row['peak_gib']:.1f} against {unsloth['peak_gib']:.1f} GiB{loaded})"
                )
    return lines


def vision_specs(models: list[str], batch_size: int) -> list[dict]:
    """Qwen2.5-VL QLoRA (4-bit vision, checkpointing): vlm_tune with transformers' vision attention and with
    `speed.vision_attention: batched` in one process, then Unsloth, in one call."""
    if "qwen2_5_vl" not in models:
        return []
    common = {"model": "qwen2_5_vl", "setting": "qlora", "batch_size": batch_size, "workload": "synthetic"}
    common.update(checkpointing=True, keep_16bit=["projector"])
    variants = [  # batched, model, batched again: an order effect inside the process would show
        {"name": "4-bit vision, levers, ckpt", "speed": {}},
        {"name": "4-bit vision, levers, ckpt, model's vision attention", "speed": {"vision_attention": "model"}},
        {"name": "4-bit vision, levers, ckpt (again)", "speed": {}},
    ]
    return [{**common, "system": "vlm_tune", "variants": variants}, {**common, "system": "unsloth"}]


def _a_b_a(lever: str, speed: dict) -> list[dict]:
    """The default levers, then `speed` on top of them (named after `lever`), then the defaults again, on one loaded
    model: an order effect inside the process shows as a difference between the two default runs."""
    return [
        {"name": "levers, ckpt", "speed": {}},
        {"name": f"levers, ckpt, {lever}", "speed": speed},
        {"name": "levers, ckpt (again)", "speed": {}},
    ]


def lora_input_specs(models: list[str], batch_size: int) -> list[dict]:
    """bf16 LoRA, checkpointing, eager: `speed.lora_input: autocast` against PEFT's fp32 input cast, on one loaded
    model per family, in the order A/B/A (QLoRA's 4-bit LoRA layers skip that cast under autocast already)."""
    variants = _a_b_a("LoRA inputs cast to fp32", {"lora_input": "fp32"})
    common = {"setting": "bf16", "batch_size": batch_size, "workload": "synthetic", "checkpointing": True}
    return [{**common, "model": model, "system": "vlm_tune", "variants": variants} for model in models]


def memory_specs(models: list[str], batch_size: int) -> list[dict]:
    """bf16 LoRA, compiled, checkpointing: the memory levers (8-bit paged AdamW, offloaded checkpoint inputs) on
    one loaded model, then Unsloth bf16 with a long timeout, in one call (Qwen2.5-VL's peak was 1.03x Unsloth's)."""
    paged = {"compile": "layers", "optimizer": "paged_adamw_8bit"}
    variants = [
        {"name": "levers, ckpt, compile", "speed": {"compile": "layers"}},
        {"name": "levers, ckpt, compile, paged 8-bit AdamW", "speed": paged},
        {"name": "levers, ckpt, compile, paged 8-bit AdamW, offload", "speed": {**paged, "offload_activations": True}},
    ]
    common = {"setting": "bf16", "batch_size": batch_size, "workload": "synthetic", "checkpointing": True}
    specs = []
    for model in [m for m in models if m != "idefics3"]:
        specs.append({**common, "model": model, "system": "vlm_tune", "variants": variants, "compile_warmup": 1})
        specs.append({**common, "model": model, "system": "unsloth"})
    return specs


def budget_specs(models: list[str], batch_size: int) -> list[dict]:
    """QLoRA (4-bit vision), eager: full checkpointing, `speed.activation_budget_gib` at 2, 4 and 8 GiB, and no
    checkpointing, on one loaded model per family: the speed and peak memory between the two ends."""
    variants = [{"name": "levers, ckpt", "speed": {}}]
    variants += [{"name": f"levers, ckpt, budget {n} GiB", "speed": {"activation_budget_gib": n}} for n in (2, 4, 8)]
    variants.append({"name": "levers, no ckpt", "checkpointing": False, "speed": {}})
    common = {"setting": "qlora", "batch_size": batch_size, "workload": "synthetic", "checkpointing": True}
    common["keep_16bit"] = ["projector"]
    return [{**common, "model": m, "system": "vlm_tune", "variants": variants} for m in models if m != "idefics3"]


def vision_cache_specs(models: list[str], batch_size: int) -> list[dict]:
    """Qwen2.5-VL QLoRA and bf16, checkpointing, eager: `speed.vision_cache_gib` against the tower's own run on one
    loaded model, order A/B/A. The synthetic batch repeats, so every cached step is a hit (an epoch after the first)."""
    if "qwen2_5_vl" not in models:
        return []
    variants = _a_b_a("vision cache", {"vision_cache_gib": 4.0})
    common = {"model": "qwen2_5_vl", "batch_size": batch_size, "workload": "synthetic", "checkpointing": True}
    qlora = {**common, "setting": "qlora", "keep_16bit": ["projector"]}
    return [
        {**qlora, "system": "vlm_tune", "variants": variants},
        {**common, "setting": "bf16", "system": "vlm_tune", "variants": variants},
    ]


def liger_specs(models: list[str], batch_size: int) -> list[dict]:
    """bf16 LoRA and QLoRA (4-bit vision; SmolVLM: bf16 only), checkpointing, eager: `speed.liger_kernel` (liger's
    RMSNorm, gated-MLP and RoPE kernels in the language decoder) against transformers' ops, on one loaded model per
    family and setting, in the order A/B/A."""
    variants = _a_b_a("liger", {"liger_kernel": True})
    common = {"batch_size": batch_size, "workload": "synthetic", "checkpointing": True, "system": "vlm_tune"}
    specs = []
    for model in models:
        specs.append({**common, "model": model, "setting": "bf16", "variants": variants})
        if model != "idefics3":
            specs.append(
                {**common, "model": model, "setting": "qlora", "keep_16bit": ["projector"], "variants": variants}
            )
    return specs


def vision_states_specs(models: list[str], batch_size: int) -> list[dict]:
    """mllama bf16 LoRA, checkpointing, eager: `speed.vision_states: needed` against the encoders keeping every
    layer's output, on one loaded model, order A/B/A (the peak of the step is in the frozen tower's forward)."""
    if "mllama" not in models:
        return []
    variants = _a_b_a("every vision layer's output kept", {"vision_states": "model"})
    common = {"model": "mllama", "setting": "bf16", "batch_size": batch_size, "workload": "synthetic"}
    return [{**common, "system": "vlm_tune", "checkpointing": True, "variants": variants}]


def padding_read_specs(models: list[str], batch_size: int) -> list[dict]:
    """mllama bf16 LoRA, checkpointing, eager: `speed.padding_read: early` against transformers reading the padding
    mask after the vision tower's launch, on one loaded model, order A/B/A (benchmarks/host_syncs.py)."""
    if "mllama" not in models:
        return []
    variants = _a_b_a("padding mask read after the vision tower", {"padding_read": "model"})
    common = {"model": "mllama", "setting": "bf16", "batch_size": batch_size, "workload": "synthetic"}
    return [{**common, "system": "vlm_tune", "checkpointing": True, "variants": variants}]


SPECS = {
    "synthetic": synthetic_specs,
    "high_res": high_res_specs,
    "real": real_specs,
    "proofs": proof_specs,
    "unsloth": unsloth_specs,
    "compile": compile_specs,
    "final": final_specs,
    "vision": vision_specs,
    "lora_input": lora_input_specs,
    "memory": memory_specs,
    "budget": budget_specs,
    "vision_cache": vision_cache_specs,
    "liger": liger_specs,
    "vision_states": vision_states_specs,
    "padding_read": padding_read_specs,
}
