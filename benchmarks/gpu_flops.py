"""Useful FLOPs of the GPU benchmark's Qwen2.5-VL-7B synthetic step, counted on a CPU.

    python benchmarks/gpu_flops.py            # ~2 minutes on 2 cores, ~6 GB of memory

The full-width model is built twice with fewer layers (1 and 2 decoder layers, 1 and 2 vision blocks); the
counter of benchmarks/gpu_runs.py (`count_flops`) gives each component's forward FLOPs, which grow by the same
amount per layer, so the full depth is extrapolated exactly (vision: window attention in every block; the 4 full-
attention blocks of the real model add under 0.2%). Logits are counted at the label positions only.
Useful FLOPs = vision side once + language side twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def count(layers: int, batch_size: int = 4) -> dict[str, float]:
    import torch
    import transformers as tf
    from gpu_measure import count_flops
    from gpu_models import _processor, _qwen_config, synthetic_items

    from vlm_tune.data import TrainCollator
    from vlm_tune.model.components import find_components
    from vlm_tune.model.loss import install_chunked_loss
    from vlm_tune.recipe import DataConfig

    config = _qwen_config()
    config.text_config.num_hidden_layers = layers
    config.vision_config.depth = layers
    config.vision_config.fullatt_block_indexes = []
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).eval()
    batch = TrainCollator(_processor("qwen2_5_vl"), DataConfig())(synthetic_items("qwen2_5_vl", batch_size, False))
    batch.pop("skipped")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    install_chunked_loss(model)  # logits at the label positions only, as vlm_tune computes them
    with torch.no_grad():
        return count_flops(model, batch, find_components(model))["flops_by_component"]


def main() -> int:
    one, two = count(1), count(2)
    per_layer = {c: two[c] - one[c] for c in one}
    depth = {"language": 28, "vision": 32}
    full = {c: one[c] + (depth.get(c, 1) - 1) * per_layer[c] if c in depth else one[c] for c in one}
    once = full.get("vision", 0.0) + full.get("projector", 0.0)
    total = sum(full.values())
    for component, value in full.items():
        print(f"{component:<10} forward {value / 1e12:7.2f} TFLOP")
    useful = once + 2 * (total - once)
    print(f"forward {total / 1e12:.2f} TFLOP; useful (vision side once, language twice) {useful / 1e12:.2f} TFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
