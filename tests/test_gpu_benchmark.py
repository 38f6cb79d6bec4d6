"""The GPU benchmark's own arithmetic: its FLOP counter, and its table's ratios (the runs themselves need a GPU)."""

import sys
from pathlib import Path

import pytest
from tiny import tiny_vlm, tiny_vlm_folder
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "model"))
from gpu import compile_specs, compile_summary  # noqa: E402
from gpu_measure import count_flops  # noqa: E402
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
