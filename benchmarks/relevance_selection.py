"""Where do the kept visual tokens fall? Object coverage of a trained run's selection on the shapes set.

For each evaluated image it runs the selection of a run's latest checkpoint (through the wrapper's
`last_selection`) and measures the share of the image's object pixels (pixels unlike the white
background) that lie in the cells of the kept tokens. Uniform selection keeps K/N of them on average;
a selection that finds the shapes keeps more. It also prints the balancing module's mean opponent-pair
weights (relevance method only).

Assumes what holds for the demo model and shapes set: one square token grid per image, covering the
whole image, tokens in row-major order.

Usage:
    python benchmarks/relevance_selection.py RUN [RUN ...] [--limit 100]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

BACKGROUND_TOLERANCE = 30  # summed |RGB - 255| above which a pixel belongs to a shape


def object_share_per_token(image, side: int) -> np.ndarray:
    """Share of the image's object pixels in each cell of a side x side token grid: [side * side]."""
    pixels = np.asarray(image.convert("RGB")).astype(np.int32)
    height, width = pixels.shape[:2]
    is_object = np.abs(pixels - 255).sum(-1) > BACKGROUND_TOLERANCE  # [H, W]
    rows = np.minimum(np.arange(height) * side // height, side - 1)
    cols = np.minimum(np.arange(width) * side // width, side - 1)
    cell = rows[:, None] * side + cols[None, :]  # [H, W] token index of each pixel
    counts = np.bincount(cell[is_object], minlength=side * side).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def measure(run: Path, limit: int) -> dict:
    """Mean object-pixel share kept, the uniform expectation, and the mean pair weights of one run."""
    from vlm_tune.checkpoint import latest_checkpoint
    from vlm_tune.data import build_dataset
    from vlm_tune.data.collate import GenerateCollator
    from vlm_tune.model.build import load_for_inference
    from vlm_tune.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml", [])
    if not recipe.relevance.enabled:
        raise SystemExit(f"{run}: trained without relevance.enabled; nothing to measure")
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise SystemExit(f"{run}: no complete checkpoint")
    model, processor = load_for_inference(recipe, checkpoint)
    dataset = build_dataset(recipe.data.eval, recipe.data, train=False, seed=recipe.train.seed)
    collator = GenerateCollator(processor, recipe.data)
    kept_share, uniform_share, weights = [], [], {}
    items = [dataset[index] for index in range(min(limit, len(dataset)))]
    for start in range(0, len(items), 25):
        chunk = [item for item in items[start : start + 25] if item is not None]
        inputs, _ = collator(chunk)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        selection = model.last_selection
        for unit, item in enumerate(chunk):
            count = int(selection.token_counts[unit])
            side = math.isqrt(count)
            if side * side != count:
                raise SystemExit(f"{run}: image {item['image_id']} has {count} tokens, not a square grid")
            share = object_share_per_token(item["image"], side)
            slots = selection.slots[unit][selection.slot_valid[unit]].cpu().numpy()
            kept_share.append(share[slots].sum())
            uniform_share.append(int(selection.kept_counts[unit]) / count)
        for name, value in getattr(getattr(model.relevance, "balancing", None), "last_weights", {}).items():
            weights.setdefault(name, []).extend(value.float().cpu().tolist())
    return {
        "run": str(run),
        "method": recipe.relevance.method,
        "keep": recipe.relevance.keep,
        "images": len(kept_share),
        "object_share_kept": float(np.mean(kept_share)),
        "uniform_expectation": float(np.mean(uniform_share)),
        "pair_weights": {name: float(np.mean(values)) for name, values in weights.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (train.output_dir) trained with relevance")
    parser.add_argument("--limit", type=int, default=100, help="evaluation images to measure (default 100)")
    args = parser.parse_args(argv)
    print("| run | method | keep | object pixels kept | uniform expectation |")
    print("|---|---|---:|---:|---:|")
    for run in args.runs:
        result = measure(run, args.limit)
        print(
            f"| {run.name} | {result['method']} | {result['keep']:g} | {result['object_share_kept']:.3f} | "
            f"{result['uniform_expectation']:.3f} |",
            flush=True,
        )
        if result["pair_weights"]:
            print(
                "  mean pair weights: " + json.dumps({k: round(v, 3) for k, v in result["pair_weights"].items()}),
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
