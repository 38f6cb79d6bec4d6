"""The demo's figures: the demo's commands for several seeds, then CIDEr-D and BLEU-4 as mean ± spread.

For each seed it runs the lines of the Makefile's `demo-run` target (train recipes/demo.yaml, then caption
`test` and `test_novel` with the base model and the trained one) into ROOT/seed-N, times every command,
and prints on stdout (and writes to ROOT/demo_seeds.md, raw numbers to ROOT/demo_seeds.json) exactly the
README's block between its demo-figures markers: a markdown table of
the scores (mean ± sample standard deviation over seeds, and each seed's value), the wall time of each
run, and the conditions: threads, torch and transformers versions, CPU.

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--root runs/demo_seeds] [--threads N] [--fresh-build]
        [--report-only]

Times mean something only when nothing else runs on the machine; the scores do not depend on other load
at a fixed thread count. `--fresh-build` starts the first seed from an empty model cache (ROOT/cache; the
SmolLM2 GGUF comes from the usual cache, so nothing downloads), so its time includes the model build,
as a fresh clone's first `make demo` does (less the pip install and the 93 MB download).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

EVALUATIONS = [(model, split) for split in ("test", "test_novel") for model in ("base", "trained")]


def demo_commands(run_dir: Path, seed: int) -> list[str]:
    """The shell lines of `make demo-run` for this run folder and seed (read with `make -n`)."""
    printed = subprocess.run(
        ["make", "-s", "-n", "demo-run", f"RUN={run_dir}", f"SEED={seed}", f"PYTHON={shlex.quote(sys.executable)}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in printed.splitlines() if line.strip()]


def run_seed(run_dir: Path, seed: int, env: dict[str, str]) -> dict:
    """Run the demo's commands once; seconds of each command and of the whole run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds = []
    with open(run_dir / "demo_seeds.log", "w") as sink:
        for command in demo_commands(run_dir, seed):
            print(f"$ {command}", file=sys.stderr, flush=True)  # stdout: only the README's block
            started = time.perf_counter()
            result = subprocess.run(command, shell=True, stdout=sink, stderr=subprocess.STDOUT, env=env)
            seconds.append(round(time.perf_counter() - started, 1))
            if result.returncode != 0:
                raise SystemExit(f"error: `{command}` failed (exit {result.returncode}); see {run_dir}/demo_seeds.log")
    return {"train_s": seconds[0], "evaluate_s": round(sum(seconds[1:]), 1), "total_s": round(sum(seconds), 1)}


def read_scores(run_dir: Path) -> dict[str, float]:
    """CIDEr-D and BLEU-4 of the run's four evaluations, keyed `model/split/metric`."""
    scores = {}
    for model, split in EVALUATIONS:
        metrics = json.loads((run_dir / f"eval-{model}-{split}" / "metrics.json").read_text())["metrics"]
        for name in ("CIDEr-D", "BLEU-4"):
            scores[f"{model}/{split}/{name}"] = metrics[name]
    return scores


def conditions(threads: int) -> str:
    """One line naming what the figures depend on."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {threads} torch threads, no GPU, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: list[dict], steps: int, condition_line: str) -> str:
    """The README's demo figures: scores over seeds, then each run's wall time."""
    seeds = [r["seed"] for r in results]
    lines = [
        f"{len(results)} seeds ({', '.join(map(str, seeds))}), {steps} steps; {condition_line}.",
        "",
        "| split | model | CIDEr-D | BLEU-4 | CIDEr-D per seed |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for model, split in EVALUATIONS:
        cider = [r["scores"][f"{model}/{split}/CIDEr-D"] for r in results]
        bleu = [r["scores"][f"{model}/{split}/BLEU-4"] for r in results]
        per_seed = " / ".join(f"{value:.2f}" for value in cider)
        lines.append(f"| {split} | {model} | {_spread(cider)} | {_spread(bleu)} | {per_seed} |")
    lines += ["", "| seed | train (s) | 4 evaluations (s) | whole run (s) |", "| ---: | ---: | ---: | ---: |"]
    for r in results:
        build = " (with the model build)" if r.get("fresh_build") else ""
        lines.append(f"| {r['seed']} | {r['train_s']:.0f} | {r['evaluate_s']:.0f} | {r['total_s']:.0f}{build} |")
    return "\n".join(lines) + "\n"


def _environment(args, root: Path, first: bool) -> dict[str, str]:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.fresh_build:  # every seed reads the cache the first one builds
        from vlm_tune.model.builtin import fetch_smollm2_gguf

        if first and (root / "cache" / "models").exists():
            raise SystemExit(f"error: --fresh-build: {root / 'cache' / 'models'} exists; remove it or pick --root")
        env["VLM_TUNE_SMOLLM2_GGUF"] = str(fetch_smollm2_gguf())
        env["VLM_TUNE_CACHE"] = str(root / "cache")
    return env


def main(argv: list[str] | None = None) -> int:
    """Run the demo once per seed (or only tabulate, with --report-only) and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (one run each)")
    parser.add_argument("--root", default="runs/demo_seeds", help="folder of the run folders and the table")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: torch's default)")
    parser.add_argument("--fresh-build", action="store_true", help="first seed builds the model in an empty cache")
    parser.add_argument("--report-only", action="store_true", help="run nothing; tabulate ROOT/demo_seeds.json")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not Path("recipes/demo.yaml").is_file():
        print("error: run from the repository root (recipes/demo.yaml not found)", file=sys.stderr)
        return 2
    raw = root / "demo_seeds.json"
    if args.report_only:
        record = json.loads(raw.read_text())
    else:
        if args.threads:
            os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported, for the reported count
        import torch

        from vlm_tune.recipe import load_recipe

        results = []
        for number, seed in enumerate(args.seeds):
            run_dir = root / f"seed-{seed}"
            timing = run_seed(run_dir, seed, _environment(args, root, number == 0))
            fresh = args.fresh_build and number == 0
            results.append({"seed": seed, **timing, "fresh_build": fresh, "scores": read_scores(run_dir)})
            steps = load_recipe("recipes/demo.yaml", []).train.max_steps
            record = {"steps": steps, "conditions": conditions(torch.get_num_threads()), "results": results}
            raw.write_text(json.dumps(record, indent=1) + "\n")
    markdown = table(record["results"], record["steps"], record["conditions"])
    (root / "demo_seeds.md").write_text(markdown)
    print(markdown, end="")  # exactly what goes between the README's demo-figures markers
    return 0


if __name__ == "__main__":
    sys.exit(main())
