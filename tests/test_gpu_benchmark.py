"""The GPU benchmark's own arithmetic: its FLOP counter, and its table's ratios (the runs themselves need a GPU)."""

import sys
from pathlib import Path

import pytest
from tiny import tiny_vlm, tiny_vlm_folder
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "model"))
from gpu_measure import count_flops  # noqa: E402
from gpu_table import markdown_table  # noqa: E402
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
