"""The GPU benchmark's own arithmetic: its FLOP counter, and its table's ratios (the runs themselves need a GPU)."""

import sys
from pathlib import Path

import pytest
from tiny import tiny_vlm, tiny_vlm_folder
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "model"))
from gpu_measure import BEFORE, count_flops, peak_blocks  # noqa: E402
from gpu_plans import (  # noqa: E402
    budget_specs,
    compile_specs,
    compile_summary,
    final_specs,
    liger_specs,
    lora_input_specs,
    memory_specs,
    padding_read_specs,
    unsloth_summary,
    vision_cache_specs,
    vision_states_specs,
)
from gpu_table import markdown_table  # noqa: E402
from multi_gpu import compare, loss_table, measure, run_specs  # noqa: E402
from multi_gpu import markdown_table as multi_gpu_table  # noqa: E402
from vlm_batches import make_batch  # noqa: E402

from vlm_tune.model.components import find_components  # noqa: E402
from vlm_tune.model.load import load_model  # noqa: E402
from vlm_tune.model.targeting import apply_targeting  # noqa: E402
from vlm_tune.recipe import ComponentConfig, ModelConfig, QuantizationConfig  # noqa: E402

LORA = {"language": ComponentConfig(mode="lora", rank=4)}


@pytest.mark.parametrize("arch", ["mllama", "qwen2_5_vl", "idefics3"])
def test_flop_count_matches_torchs_counter_on_a_16bit_model(arch):
    model, processor = tiny_vlm(arch)
    batch = make_batch(arch, processor)
    torch_counter = FlopCounterMode(display=False)
    with torch_counter:
        model(**batch)
    targeted, _ = apply_targeting(model, LORA)
    counted = count_flops(targeted, batch, find_components(targeted.get_base_model()))
    assert counted["forward_flops"] == torch_counter.get_total_flops()  # LoRA's own products left out
    assert set(counted["flops_by_component"]) >= {"vision", "projector", "language"}
    once = counted["forward_only_flops"]
    assert counted["useful_flops"] == once + 2 * (counted["forward_flops"] - once)


def test_flop_count_sees_4bit_matrix_products(tmp_path):
    folder = tiny_vlm_folder("qwen2_5_vl", tmp_path)
    counts = []
    for quantization in (None, QuantizationConfig()):
        model, processor = load_model(
            ModelConfig(name_or_path=str(folder), dtype="float32", quantization=quantization), verbose=False
        )
        targeted, _ = apply_targeting(model, LORA)
        batch = make_batch("qwen2_5_vl", processor)
        counts.append(count_flops(targeted, batch, find_components(targeted.get_base_model()))["forward_flops"])
    assert counts[0] == counts[1] > 0


def test_table_ratios_and_mfu_use_the_rows_of_the_same_workload():
    key = {
        "model": "qwen2_5_vl",
        "setting": "qlora",
        "workload": "synthetic",
        "batch_size": 4,
        "tokens_per_sample": 100,
    }
    rows = [
        {"variant": "matmul", "tflops": 800.0},
        {**key, "system": "baseline", "variant": "baseline", "step_s": 2.0, "peak_gib": 20.0},
        {**key, "system": "vlm_tune", "variant": "levers", "step_s": 0.5, "peak_gib": 10.0, "useful_flops": 80e12},
        {**key, "system": "vlm_tune", "variant": "broken", "error": "out of memory"},
    ]
    table = markdown_table(rows)
    levers = next(line for line in table.splitlines() if "| levers |" in line)
    assert "| 8.00 | 800 | 10.0 | 20% | 4.00x | 0.50x |" in levers  # 80 TFLOP / 0.5 s / 800 TFLOP/s
    assert "error: out of memory" in table


def test_compile_plan_runs_each_variant_in_its_own_process_and_compares_it_to_the_same_variant_uncompiled():
    specs = compile_specs(["mllama", "idefics3"], batch_size=4)
    assert all(len(spec["variants"]) == 1 and spec["compile_warmup"] == 1 for spec in specs)
    names = [(spec["model"], spec["setting"], spec["variants"][0]["name"]) for spec in specs]
    assert len(names) == len(set(names)) == 12  # mllama qlora + bf16, SmolVLM bf16 only; four variants each
    compiled = [spec["variants"][0] for spec in specs if spec["variants"][0]["name"].endswith("compile")]
    assert len(compiled) == 6 and all(variant["speed"] == {"compile": "layers"} for variant in compiled)
    assert [spec["count_flops"] for spec in specs[:4]] == [True, False, False, False]
    row = {"model": "mllama", "setting": "qlora", "peak_gib": 10.0, "warmup_s": 3.0}
    rows = [
        {**row, "variant": "levers, ckpt", "step_s": 1.0},
        {**row, "variant": "levers, ckpt, compile", "step_s": 0.8, "peak_gib": 9.0, "warmup_s": 60.0},
        {**row, "variant": "levers, no ckpt, compile", "error": "out of memory"},
    ]
    assert compile_summary(rows) == [
        "compile: mllama qlora levers, ckpt: 1.25x speed, peak 9.0 against 10.0 GiB, warm-up 60 against 3 s"
    ]


def test_final_plan_puts_every_system_of_a_model_in_one_call_and_unsloth_bf16_last():
    specs = final_specs(["mllama", "qwen2_5_vl", "idefics3"], batch_size=4)
    systems = [(s["model"], s["setting"], s["system"]) for s in specs]
    assert systems[-2:] == [("mllama", "bf16", "unsloth"), ("qwen2_5_vl", "bf16", "unsloth")]
    assert ("idefics3", "bf16", "unsloth") not in systems and ("idefics3", "qlora", "baseline") not in systems
    compiled = [s for s in specs if s["system"] == "vlm_tune" and s["variants"][0]["speed"]]
    assert len(compiled) == 5 and all(s["compile_warmup"] == 1 and not s["count_flops"] for s in compiled)
    assert [v["speed"] for v in compiled[0]["variants"]] == [{"compile": "layers"}, {"compile": "layers"}]
    four_bit_vision = [s for s in specs if s.get("keep_16bit") == ["projector"]]
    assert {(s["model"], s["setting"]) for s in four_bit_vision} == {("mllama", "qlora"), ("qwen2_5_vl", "qlora")}
    assert all(
        v["name"].startswith("4-bit vision, ") for s in four_bit_vision if "variants" in s for v in s["variants"]
    )


def test_unsloth_summary_compares_rows_of_the_same_model_setting_and_batch():
    key = {"model": "qwen2_5_vl", "setting": "bf16", "workload": "synthetic", "batch_size": 4}
    rows = [
        {**key, "system": "unsloth", "variant": "unsloth", "step_s": 0.8, "peak_gib": 16.0, "weights_gib": 15.5},
        {
            **key,
            "system": "vlm_tune",
            "variant": "levers, ckpt, compile",
            "step_s": 0.4,
            "peak_gib": 15.2,
            "weights_gib": 15.6,
        },
        {**key, "system": "vlm_tune", "variant": "cap", "step_s": 0.4, "peak_gib": 5.0, "memory_cap_gib": 8},
        {**key, "setting": "qlora", "system": "vlm_tune", "variant": "other setting", "step_s": 0.1, "peak_gib": 1},
    ]
    assert unsloth_summary(rows) == [
        "vs Unsloth: qwen2_5_vl bf16 levers, ckpt, compile: 2.00x samples/s at 0.95x peak memory "
        "(15.2 against 16.0 GiB; loaded 15.6 against 15.5)"
    ]


def test_peak_memory_replay_finds_what_is_live_at_the_peak():
    def frames(name):
        return [
            {"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": f"/x/site-packages/transformers/{name}.py", "line": 7, "name": name},
        ]

    events = [
        {"action": "free_requested", "addr": 1, "size": 10},  # a block from before the recording
        {"action": "alloc", "addr": 2, "size": 100, "frames": frames("attention")},
        {"action": "alloc", "addr": 3, "size": 50, "frames": frames("mlp")},
        {"action": "free_requested", "addr": 2, "size": 100},
        {"action": "alloc", "addr": 4, "size": 120, "frames": frames("mlp")},
        {"action": "free_requested", "addr": 4, "size": 120},
    ]
    old = {"state": "active_allocated", "address": 9, "size": 1000}
    snapshot = {
        "device_traces": [events],
        "segments": [{"blocks": [old, {"state": "inactive", "address": 8, "size": 5}]}],
    }
    peak, groups = peak_blocks(snapshot)
    assert peak == 1000 + 50 + 120  # after addr 1 and 2 were freed, with 3 and 4 live
    assert groups == [(BEFORE, 1000), ("transformers/mlp.py:7 mlp", 170)]


def test_multi_gpu_runs_share_one_global_batch():
    specs = run_specs(["mllama"], ["bf16"], [1, 2, 4], batch_size=4)
    assert [(s["mode"], s["gpus"], s["grad_accum"]) for s in specs] == [
        ("one GPU", 1, 4),
        ("ddp", 2, 2),
        ("fsdp", 2, 2),
        ("ddp", 4, 1),
        ("fsdp", 4, 1),
    ]
    assert {s["gpus"] * s["grad_accum"] * s["batch_size"] for s in specs} == {16}


def test_multi_gpu_efficiency_memory_and_loss_difference():
    def log(seconds_per_step, loss_shift, peak):
        return [
            {
                "step": s,
                "train/loss": 2.0 - s / 10 + loss_shift,
                "train/seconds": s * seconds_per_step,
                "train/gpu_peak_gib": peak,
            }
            for s in range(1, 6)
        ]

    common = {"model": "mllama", "setting": "bf16", "batch_size": 4, "global_batch": 8}
    rows = [
        {**common, "mode": "one GPU", "gpus": 1, "grad_accum": 2, **measure(log(2.0, 0.0, 40.0), 2, 8)},
        {**common, "mode": "ddp", "gpus": 2, "grad_accum": 1, **measure(log(1.25, 0.01, 40.0), 2, 8)},
        {**common, "mode": "fsdp", "gpus": 2, "grad_accum": 1, **measure(log(1.0, -0.02, 20.0), 2, 8)},
    ]
    assert rows[0]["samples_s"] == pytest.approx(4.0)  # 3 steps x 8 samples in 6 s, after the 2 warm-up steps
    single, ddp, fsdp = compare(rows)
    assert ddp["efficiency"] == pytest.approx(0.8) and fsdp["efficiency"] == pytest.approx(1.0)
    assert fsdp["peak_vs_ddp"] == pytest.approx(0.5) and "peak_vs_ddp" not in ddp
    assert ddp["max_loss_diff"] == pytest.approx(0.01) and fsdp["max_loss_diff"] == pytest.approx(0.02)
    table = multi_gpu_table(rows)
    assert "| Llama-3.2-11B-Vision | bf16 | 2 | fsdp | 4 x 1 | 8.00 | 1.000 | 1.00 | 20.0 | 0.50 | 0.0200 |" in table
    assert "| 5 | 1.5000 | 1.5100 | 1.4800 |" in loss_table(rows)


def test_train_profile_profiles_the_steps_after_the_warm_up(tmp_path):
    import yaml
    from gpu_models import caption_set
    from gpu_runs import recipe_dict
    from train_profile import main as profile_main

    spec = {"model": "idefics3", "setting": "bf16", "batch_size": 2, "tiny": True}
    spec.update(folder=str(tiny_vlm_folder("idefics3", tmp_path)), captions=str(caption_set(tmp_path, 8)))
    recipe = recipe_dict(spec)
    recipe["data"]["num_workers"] = 0
    recipe["train"].update(max_steps=3, output_dir=str(tmp_path / "run"), overwrite=True)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "profile.txt"
    assert profile_main([str(tmp_path / "recipe.yaml"), str(out), "--skip", "1", "--steps", "2"]) == 0
    text = out.read_text()
    assert text.startswith("train command: wall ") and "for 2 steps" in text
    assert "by self CPU time" in text and "aten::mm" in text  # the profiled steps ran the model
    assert profile_main([str(tmp_path / "recipe.yaml"), str(out), "--skip", "2", "--steps", "2"]) == 1  # too few


def test_kernel_summary_merges_overlapping_kernels_and_sorts_kernel_time_by_kind():
    from types import SimpleNamespace

    import torch
    from gpu_measure import kernel_kind, kernel_summary

    def event(name, start, end, device=torch.autograd.DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "matrix products"
    assert kernel_kind("pytorch_flash::flash_fwd_kernel") == "attention"
    assert kernel_kind("void kDequantizeBlockwise<__nv_bfloat16, 512>") == "4-bit dequantisation"
    assert kernel_kind("triton_poi_fused_add_mul_0") == "compiled fused ops (triton)"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel") == "other"
    events = [  # microseconds; the attention kernel overlaps the first product by 100 us on another stream
        event("ampere_bf16_gemm", 0, 300_000),
        event("flash_fwd_kernel", 200_000, 300_000),
        event("aten::mm", 0, 900_000, device=torch.autograd.DeviceType.CPU),  # a host op: not a kernel
        event("triton_poi_fused_0", 500_000, 600_000),
    ]
    lines = kernel_summary(events, wall=1.0, steps=3).splitlines()
    assert lines[0] == "1 kernels per step; the GPU ran a kernel 0.400 s of the 1.000 s (40%, overlaps counted once)"
    assert lines[1] == "GPU time by kind of kernel: matrix products 60%, attention 20%, compiled fused ops (triton) 20%"


def test_host_syncs_finds_every_mllama_host_read_before_the_vision_tower(tmp_path):
    from host_syncs import record_syncs, tiny_step

    rows = record_syncs(*tiny_step("mllama", "bf16", tmp_path))
    assert rows and {row["phase"] for row in rows} == {"before the vision tower"}, rows
    callers = " ".join(row["caller"] for row in rows)
    assert "loss.py" in callers and "tiles.py" in callers and "decoder_mask.py" in callers
    late = record_syncs(*tiny_step("mllama", "bf16", tmp_path, {"padding_read": "model", "loss": "model"}))
    after = [row["caller"] for row in late if row["phase"] == "after the vision tower"]
    assert after and all("masking_utils" in caller for caller in after), late  # transformers' own read
    assert not any(row["phase"] == "optimizer step" for row in late)  # fused AdamW reads nothing


def test_train_command_windows_and_its_reference_is_the_model_path_compiled_alike():
    from gpu import window_times

    seconds = [1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 6.0, 6.5, 7.0]  # cumulative, steps 1-9
    records = [
        {"step": s, "train/seconds": t, "train/data_seconds": 0.1 * s, "train/tokens_per_s": 100.0}
        for s, t in enumerate(seconds, start=1)
    ]
    timed = window_times(records, {"warmup": 3, "windows": 3, "per_window": 2}, batch_size=4)
    assert timed["step_s"] == pytest.approx(0.5) and timed["step_s_max"] == pytest.approx(1.0)  # 0.5, 1.0, 0.5
    assert timed["data_share"] == pytest.approx(0.6 / 4.0)  # 0.1 s a step over steps 4-9, in 4 s
    key = {"model": "idefics3", "setting": "bf16", "workload": "captions", "batch_size": 4, "tokens_per_sample": 10}
    rows = [
        {**key, "system": "vlm_tune", "variant": "model path", "step_s": 0.5, "peak_gib": 5.0},
        {**key, "system": "vlm_tune", "variant": "model path, compile", "step_s": 0.25, "peak_gib": 5.0},
        {
            **key,
            "system": "train_command",
            "variant": "train command",
            "step_s": 1.0,
            "peak_gib": 5.0,
            "data_share": 0.2,
        },
        {**key, "system": "train_command", "variant": "train command, compile", "step_s": 0.5, "peak_gib": 5.0},
    ]
    lines = markdown_table(rows).splitlines()
    assert next(line for line in lines if "| train command |" in line).endswith("| 0.50x | 1.00x |")
    assert next(line for line in lines if "| train command, compile |" in line).endswith("| 0.50x | 1.00x |")
    assert "- train command, idefics3: 20% of its step time waiting for the data loader" in lines


@pytest.mark.parametrize("plan, lever", [(vision_states_specs, "vision_states"), (padding_read_specs, "padding_read")])
def test_mllama_lever_plans_compare_the_lever_with_transformers_path_on_mllama_only(plan, lever):
    assert plan(["qwen2_5_vl", "idefics3"], batch_size=4) == []
    (spec,) = plan(["mllama", "qwen2_5_vl"], batch_size=4)
    assert (spec["model"], spec["setting"], spec["checkpointing"]) == ("mllama", "bf16", True)
    assert [v["speed"] for v in spec["variants"]] == [{}, {lever: "model"}, {}]  # A/B/A


def test_lora_input_and_memory_plans_share_one_loaded_model_per_family():
    specs = lora_input_specs(["qwen2_5_vl", "idefics3"], batch_size=4)
    assert [(s["model"], s["setting"]) for s in specs] == [("qwen2_5_vl", "bf16"), ("idefics3", "bf16")]
    assert [v["speed"] for v in specs[0]["variants"]] == [{}, {"lora_input": "fp32"}, {}]  # A/B/A
    specs = memory_specs(["qwen2_5_vl", "idefics3"], batch_size=4)
    assert [(s["model"], s["system"]) for s in specs] == [("qwen2_5_vl", "vlm_tune"), ("qwen2_5_vl", "unsloth")]
    speeds = [v["speed"] for v in specs[0]["variants"]]
    assert all(speed["compile"] == "layers" for speed in speeds) and specs[0]["compile_warmup"] == 1
    assert [(s.get("optimizer"), s.get("offload_activations")) for s in speeds] == [
        (None, None),
        ("paged_adamw_8bit", None),
        ("paged_adamw_8bit", True),
    ]

    budget = budget_specs(["mllama", "idefics3"], batch_size=4)
    assert [(s["model"], s["setting"], s["keep_16bit"]) for s in budget] == [("mllama", "qlora", ["projector"])]
    names = [v["name"] for v in budget[0]["variants"]]
    assert names[0] == "levers, ckpt" and names[-1] == "levers, no ckpt" and len(names) == 5
    assert [v["speed"].get("activation_budget_gib") for v in budget[0]["variants"]] == [None, 2, 4, 8, None]
    cached = vision_cache_specs(["qwen2_5_vl", "mllama"], batch_size=4)
    assert [(s["model"], s["setting"]) for s in cached] == [("qwen2_5_vl", "qlora"), ("qwen2_5_vl", "bf16")]
    assert [v["speed"] for v in cached[0]["variants"]] == [{}, {"vision_cache_gib": 4.0}, {}]  # A/B/A
    assert vision_cache_specs(["mllama"], batch_size=4) == []


def test_liger_plan_runs_bf16_and_qlora_on_one_loaded_model_in_the_order_a_b_a():
    specs = liger_specs(["qwen2_5_vl", "idefics3"], batch_size=4)
    assert [(s["model"], s["setting"], s.get("keep_16bit")) for s in specs] == [
        ("qwen2_5_vl", "bf16", None),
        ("qwen2_5_vl", "qlora", ["projector"]),
        ("idefics3", "bf16", None),
    ]
    assert all(s["checkpointing"] and s["system"] == "vlm_tune" for s in specs)
    assert [v["speed"] for v in specs[0]["variants"]] == [{}, {"liger_kernel": True}, {}]
