"""Relevance sweep: CIDEr and training tokens/s of visual-token selection against two baselines.

Trains and evaluates a recipe (default: the from-scratch demo, benchmarks/relevance_scratch.yaml) once
per setting, each in its own run folder, through the toolkit's own commands:

    python -m vlm_tune.train RECIPE relevance.enabled=true relevance.keep=K relevance.method=M train.output_dir=RUN
    python -m vlm_tune.evaluate RECIPE (same overrides) --checkpoint RUN --output-dir RUN/eval

Settings: keep 1.0 once (every token; the reference speed), then keep 0.5 and 0.25 with the relevance
modules and with the two parameter-free baselines at the same K (random K tokens, average pooling to K).
It then reads `RUN/log.jsonl` (last "train/tokens_per_s") and `RUN/eval/metrics.json` (CIDEr-D, BLEU-4) and
writes a markdown table (ROOT/relevance_sweep.md) and the raw numbers (ROOT/relevance_sweep.json).

Three protocols:
- from scratch (`--recipe benchmarks/relevance_scratch.yaml`): the vision side is trained from random
  weights under the token budget, so it can learn to spread what it sees over whichever tokens survive;
  220 steps are noisy between seeds (CIDEr-D spreads over about 0.3), so use several seeds;
- vision encoder frozen at its random weights (`--recipe benchmarks/relevance_frozen_vision.yaml`): each
  token keeps describing its own patch, so the budget binds;
- adapting a trained model (`--recipe benchmarks/relevance_adapt.yaml`, after training
  benchmarks/relevance_scratch.yaml): every run starts from that run's weights (trained with every token)
  and adapts to the budget for 100 steps with the vision encoder all but frozen, as one adapts a
  pretrained VLM.

Usage:
    python benchmarks/relevance_sweep.py [--recipe benchmarks/relevance_scratch.yaml] [--root runs/relevance_sweep]
        [--keeps 1.0 0.5 0.25] [--methods relevance random pool] [--seeds 0 1] [--with-off]
        [--reuse] [--report-only] [--dry-run] [-- extra.override=value ...]

`--report-only` trains nothing: it tabulates the runs of ROOT that have finished (e.g. keep 1.0 with
one seed next to keep 0.25 with three).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def settings(keeps: list[float], methods: list[str], with_off: bool) -> list[tuple[str, float, str]]:
    """(label, keep, method) of every run: keep 1.0 once, every method at every smaller keep."""
    runs = [("off", 1.0, "none")] if with_off else []
    for keep in keeps:
        for method in ["relevance"] if keep >= 1.0 else methods:
            runs.append((f"keep{keep:g}-{method}", keep, method))
    return runs


def overrides_for(keep: float, method: str, run_dir: Path, seed: int, extra: list[str]) -> list[str]:
    """Recipe overrides of one run."""
    relevance = (
        ["relevance.enabled=false"]
        if method == "none"
        else ["relevance.enabled=true", f"relevance.keep={keep!r}", f"relevance.method={method}"]
    )
    return relevance + [f"train.output_dir={run_dir}", f"train.seed={seed}", *extra]


def run(command: list[str], log_file: Path, dry_run: bool) -> bool:
    """Run one command, its output appended to `log_file`; True on success."""
    print("$ " + " ".join(command), flush=True)
    if dry_run:
        return True
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as sink:
        result = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        print(f"  failed (exit {result.returncode}); see {log_file}", flush=True)
    return result.returncode == 0


def train_and_evaluate(recipe: str, overrides: list[str], run_dir: Path, dry_run: bool) -> bool:
    """Train RECIPE with `overrides` into `run_dir`, then evaluate its newest checkpoint into RUN/eval; True when
    both succeeded (their output goes to RUN/sweep.log)."""
    log_file = run_dir / "sweep.log"
    fresh = ["train.overwrite=true"]  # the sweep trains this run anew even where an unfinished one left checkpoints
    trained = run([sys.executable, "-m", "vlm_tune.train", recipe, *overrides, *fresh], log_file, dry_run)
    evaluate = [sys.executable, "-m", "vlm_tune.evaluate", recipe, *overrides, "--checkpoint", str(run_dir)]
    evaluate += ["--output-dir", str(run_dir / "eval"), "--overwrite", "--no-progress"]  # the run was trained anew
    return trained and run(evaluate, log_file, dry_run)


def read_last_logged(run_dir: Path, *keys: str) -> float | None:
    """The last value of the first of `keys` in the run's log.jsonl: "train/tokens_per_s" (the running average
    over the run) or "eval/loss" (loss per caption token on data.eval, budget applied); later keys are the names
    of runs logged before the `train/` / `eval/` scheme ("tokens_per_s", "eval_loss"). None if never logged."""
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    values = [next((r[key] for key in keys if r.get(key) is not None), None) for r in records]
    values = [value for value in values if value is not None]
    return float(values[-1]) if values else None


def read_metrics(eval_dir: Path) -> dict[str, float]:
    """CIDEr-D and BLEU-4 of an evaluation folder (empty if it has none)."""
    metrics_file = eval_dir / "metrics.json"
    if not metrics_file.is_file():
        return {}
    metrics = json.loads(metrics_file.read_text()).get("metrics", {})
    cider = next((value for name, value in metrics.items() if name.startswith("CIDEr")), None)
    found = {"CIDEr-D": cider, "BLEU-4": metrics.get("BLEU-4")}
    return {name: float(value) for name, value in found.items() if value is not None}


def write_results(root: Path, name: str, results: list[dict], markdown: str) -> None:
    """ROOT/NAME.json (the raw numbers) and ROOT/NAME.md (the table), and the table on stdout."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (root / f"{name}.md").write_text(markdown)
    print(markdown)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: list[dict]) -> str:
    """Markdown table (mean ± std over seeds) and the keep-0.25 verdict."""
    by_setting: dict[tuple, list[dict]] = {}
    for result in results:
        by_setting.setdefault((result["keep"], result["method"]), []).append(result)
    reference = [r["tokens_per_s"] for r in by_setting.get((1.0, "relevance"), []) if r["tokens_per_s"]]
    lines = [
        "| keep | method | seeds | CIDEr-D | BLEU-4 | eval loss | train tokens/s | speed vs keep 1.0 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (keep, method), rows in by_setting.items():
        cider = [r["CIDEr-D"] for r in rows if r.get("CIDEr-D") is not None]
        bleu = [r["BLEU-4"] for r in rows if r.get("BLEU-4") is not None]
        losses = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
        speed = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
        ratio = f"{statistics.mean(speed) / statistics.mean(reference):.2f}x" if speed and reference else "-"
        first = f"| {keep:g} | {method} | {len(cider)} | {_mean_std(cider)} | {_mean_std(bleu)} | {_mean_std(losses)} |"
        lines.append(f"{first} {statistics.mean(speed):.0f} | {ratio} |" if speed else f"{first} failed | - |")

    def mean_cider(keep, method):
        values = [r["CIDEr-D"] for r in by_setting.get((keep, method), []) if r.get("CIDEr-D") is not None]
        return statistics.mean(values) if values else None

    smallest = min((keep for keep, _ in by_setting), default=None)
    scores = {method: mean_cider(smallest, method) for method in ("relevance", "random", "pool")}
    if smallest is not None and all(value is not None for value in scores.values()):
        wins = scores["relevance"] > max(scores["random"], scores["pool"])
        by_seed = {(r["seed"], r["method"]): r.get("CIDEr-D") for r in results if r["keep"] == smallest}
        seeds = sorted({seed for seed, method in by_seed if method == "relevance"})
        paired = [
            seed for seed in seeds if all(by_seed.get((seed, m)) is not None for m in ("relevance", "random", "pool"))
        ]
        seed_wins = sum(
            by_seed[(seed, "relevance")] > max(by_seed[(seed, "random")], by_seed[(seed, "pool")]) for seed in paired
        )
        lines += [
            "",
            f"At keep {smallest:g}: relevance CIDEr-D {scores['relevance']:.3f} vs random "
            f"{scores['random']:.3f}, pool {scores['pool']:.3f} -> "
            f"{'relevance beats both baselines' if wins else 'relevance does NOT beat both baselines'} "
            f"on the mean; it beats both in {seed_wins} of {len(paired)} seeds.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns 0 when every run trained and evaluated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipe",
        default="benchmarks/relevance_scratch.yaml",
        help="recipe to sweep (default benchmarks/relevance_scratch.yaml)",
    )
    parser.add_argument("--root", default="runs/relevance_sweep", help="folder of the run folders and the table")
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.25], help="fractions of tokens kept")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["relevance", "random", "pool"],
        choices=["relevance", "random", "pool"],
        help="selection methods below keep 1.0",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values (one run each)")
    parser.add_argument("--with-off", action="store_true", help="also run without relevance modules at all")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose eval/metrics.json already exists")
    parser.add_argument("--report-only", action="store_true", help="train nothing; tabulate the finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args, extra = parser.parse_known_args(argv)
    extra = [item for item in extra if item != "--"]
    if not Path(args.recipe).is_file():
        print(
            f"error: {args.recipe}: recipe not found (run from the repository root, or pass --recipe)", file=sys.stderr
        )
        return 2

    root = Path(args.root)
    results, failures = [], 0
    for seed in args.seeds:
        for label, keep, method in settings(args.keeps, args.methods, args.with_off):
            run_dir = root / f"{label}-seed{seed}"
            eval_dir = run_dir / "eval"
            overrides = overrides_for(keep, method, run_dir, seed, extra)
            finished = (eval_dir / "metrics.json").is_file()
            if args.report_only and not finished:
                continue
            if not (args.reuse or args.report_only) or not finished:
                failures += not train_and_evaluate(args.recipe, overrides, run_dir, args.dry_run)
            results.append(
                {
                    "label": label,
                    "seed": seed,
                    "keep": keep,
                    "method": method,
                    "tokens_per_s": read_last_logged(run_dir, "train/tokens_per_s", "tokens_per_s"),
                    "eval_loss": read_last_logged(run_dir, "eval/loss", "eval_loss"),
                    **read_metrics(eval_dir),
                }
            )
    if args.dry_run:
        return 0
    write_results(root, "relevance_sweep", results, table(results))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
