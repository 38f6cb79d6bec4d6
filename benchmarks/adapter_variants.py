"""Adapter variants on the demo: eval loss and CIDEr-D of the language decoder's LoRA against its variants.

Trains and evaluates the demo recipe once per variant and seed, each in its own run folder, through the
toolkit's own commands (every other setting as the recipe has it):

    python -m vlm_tune.train RECIPE VARIANT_OVERRIDES train.seed=S train.output_dir=RUN
    python -m vlm_tune.evaluate RECIPE (same overrides) --checkpoint RUN --output-dir RUN/eval --overwrite

Variants of `components.language` (16-bit decoder):
- lora (the recipe's: rank 16, alpha 32), dora, rslora, pissa: the same rank, hence the same trainable count
  (DoRA adds its magnitude vectors); rslora scales by alpha / sqrt(r) = 8 instead of alpha / r = 2;
- adalora: starts at rank 24 (alpha 48, the same scale alpha / r) and allocates down to an average of 16, so
  the shipped adapter has LoRA-16's parameter count (it trains 24-rank matrices on the way);
- prefix: 424 virtual keys / values per layer = LoRA-16's 4,884,480 parameters on SmolLM2-135M (30 layers,
  3 key-value heads of 64: 11,520 per token); prompt: 20 input vectors (11,520 parameters: matching LoRA would
  take 8,480 tokens per sequence). Soft prompts train at their own lr (prompt 1e-2, prefix 5e-3; the recipe's
  2e-4 is a LoRA rate), untuned.
And in 4 bit (`model.quantization`: the decoder in NF4, vision and projector in 16 bit): qlora (default start)
against loftq.

It reads `RUN/log.jsonl` (last "eval/loss"), `RUN/eval/metrics.json` (CIDEr-D, BLEU-4) and
`RUN/components.json` (the language row's trainable parameters); it prints each run's wall time (train +
evaluate) and keeps its training seconds (log.jsonl's last "train/seconds") in the raw numbers. It writes a
markdown table (mean ± std over seeds, ROOT/adapter_variants.md) and the raw numbers (ROOT/adapter_variants.json).

Usage:
    python benchmarks/adapter_variants.py [--recipe recipes/demo.yaml] [--root runs/adapter_variants]
        [--variants lora dora ...] [--seeds 0 1 2] [--reuse] [--report-only] [--dry-run] [--jobs N]
        [--deadline S] [-- key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from relevance_sweep import _mean_std, read_last_logged, read_metrics, train_and_evaluate, write_results

_LANGUAGE = "components.language."
VARIANTS: dict[str, list[str]] = {
    "lora": [],
    "dora": [_LANGUAGE + "variant=dora"],
    "rslora": [_LANGUAGE + "variant=rslora"],
    "adalora": [_LANGUAGE + s for s in ("variant=adalora", "rank=24", "target_rank=16", "alpha=48")],
    "pissa": [_LANGUAGE + "init=pissa"],
    "prompt": [_LANGUAGE + s for s in ("mode=prompt", "num_virtual_tokens=20", "lr=1.0e-2")],
    "prefix": [_LANGUAGE + s for s in ("mode=prefix", "num_virtual_tokens=424", "lr=5.0e-3")],
    "qlora": ["model.quantization={}"],
    "qlora-loftq": ["model.quantization={}", _LANGUAGE + "init=loftq"],
}


def language_params(run_dir: Path) -> int | None:
    """Trainable parameters of the language row of the run's components.json."""
    report = run_dir / "components.json"
    if not report.is_file():
        return None
    rows = json.loads(report.read_text())["rows"]
    return next((row["trainable_params"] for row in rows if row["component"] == "language"), None)


def table(results: list[dict]) -> str:
    """Markdown table: one row per variant, mean ± std over its seeds."""
    by_variant: dict[str, list[dict]] = {}
    for result in results:
        by_variant.setdefault(result["variant"], []).append(result)
    lines = [
        "| variant | language params trained | seeds | eval loss | CIDEr-D | BLEU-4 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, rows in by_variant.items():
        values = {key: [r[key] for r in rows if r.get(key) is not None] for key in ("eval_loss", "CIDEr-D", "BLEU-4")}
        params = next((r["language_params"] for r in rows if r.get("language_params")), None)
        lines.append(
            f"| {variant} | {params:,} | {len(values['CIDEr-D'])} | {_mean_std(values['eval_loss'])} | "
            f"{_mean_std(values['CIDEr-D'])} | {_mean_std(values['BLEU-4'])} |"
            if params
            else f"| {variant} | - | 0 | failed | - | - |"
        )
    return "\n".join(lines) + "\n"


def run_folder(root: Path, seed: int, variant: str) -> Path:
    """ROOT/VARIANT-seedS."""
    return root / f"{variant}-seed{seed}"


def finished(root: Path, seed: int, variant: str) -> bool:
    """Whether the run has its evaluation's metrics.json."""
    return (run_folder(root, seed, variant) / "eval" / "metrics.json").is_file()


def needs_training(root: Path, run: tuple[int, str], args) -> bool:
    """Train unless --report-only, or --reuse and the run is finished."""
    return not args.report_only and not (args.reuse and finished(root, *run))


def train_one(root: Path, run: tuple[int, str], args, extra: list[str], stop_at: float | None) -> bool | None:
    """Train and evaluate one (seed, variant); prints its wall time; True when both succeeded, None when the
    deadline had passed before it started."""
    seed, variant = run
    run_dir = run_folder(root, seed, variant)
    if stop_at is not None and time.monotonic() > stop_at:
        print(f"  {run_dir.name}: not started (deadline)", flush=True)
        return None
    overrides = [*VARIANTS[variant], f"train.seed={seed}", f"train.output_dir={run_dir}", *extra]
    started = time.monotonic()
    ok = train_and_evaluate(args.recipe, overrides, run_dir, args.dry_run)
    print(
        f"  {run_dir.name}: {time.monotonic() - started:.0f} s (train + evaluate){'' if ok else ', failed'}", flush=True
    )
    return ok


def read_run(root: Path, seed: int, variant: str) -> dict:
    """One finished run's numbers."""
    run_dir = run_folder(root, seed, variant)
    return {
        "variant": variant,
        "seed": seed,
        "language_params": language_params(run_dir),
        "eval_loss": read_last_logged(run_dir, "eval/loss", "eval_loss"),
        "train_seconds": read_last_logged(run_dir, "train/seconds"),
        **read_metrics(run_dir / "eval"),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the variants; returns 0 when every run trained and evaluated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml", help="recipe to vary (default recipes/demo.yaml)")
    parser.add_argument("--root", default="runs/adapter_variants", help="folder of the run folders and the table")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="what to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (one run each)")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose eval/metrics.json already exists")
    parser.add_argument("--report-only", action="store_true", help="train nothing; tabulate the finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one GPU holds several demo runs)")
    parser.add_argument("--deadline", type=float, default=0, help="seconds after which no new run starts (0: none)")
    args, extra = parser.parse_known_args(argv)
    extra = [item for item in extra if item != "--"]
    if not Path(args.recipe).is_file():
        print(f"error: {args.recipe}: recipe not found (run from the repository root)", file=sys.stderr)
        return 2
    root = Path(args.root)
    # seed-major: a partial sweep already holds every variant
    runs = [(seed, variant) for seed in args.seeds for variant in args.variants]
    to_train = [run for run in runs if needs_training(root, run, args)]
    stop_at = time.monotonic() + args.deadline if args.deadline else None
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job waits on its own train/evaluate processes
        outcomes = list(pool.map(lambda run: train_one(root, run, args, extra, stop_at), to_train))
    failures = outcomes.count(False)
    started = {run for run, outcome in zip(to_train, outcomes) if outcome is not None}
    results = [read_run(root, *run) for run in runs if finished(root, *run) or run in started]
    if args.dry_run:
        return 0
    write_results(root, "adapter_variants", results, table(results))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
