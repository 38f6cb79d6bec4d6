"""At which thread counts is the demo bit-identical? A few training steps per count, each run twice.

    python benchmarks/demo_threads.py [--threads 1 2 4] [--steps 6] [--repeats 2] [--root runs/demo_threads]
        [--report-only]

Trains recipes/demo.yaml for --steps steps (no evaluation) with OMP_NUM_THREADS set to each count, --repeats
times, and compares the logged losses and the trained weights (the last checkpoint) exactly: repeats at one
count, then each count against the first count.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


@functools.cache  # read once per run: every comparison below reads the same runs again
def losses(run_dir: Path) -> list[float]:
    """Training losses of a run, step by step, as logged (full float precision)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    records = list(map(json.loads, filter(str.strip, lines)))
    found = [record["train/loss"] for record in records if "train/loss" in record]
    if not found:  # a run that logged no loss proves nothing: fail loudly rather than compare empty lists
        raise SystemExit(f"{run_dir / 'log.jsonl'}: no train/loss records")
    return found


@functools.cache
def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's checkpoints, keyed `file:name`."""
    return {
        f"{path.relative_to(run_dir)}:{name}": tensor
        for path in sorted(run_dir.glob("checkpoint-*/**/*.safetensors"))
        for name, tensor in load_file(path).items()
    }


def same(a: Path, b: Path) -> bool:
    """True when two runs logged the same losses and saved the same weights, bit for bit."""
    first, second = weights(a), weights(b)
    return (
        losses(a) == losses(b)
        and bool(first)
        and first.keys() == second.keys()
        and all(torch.equal(first[key], second[key]) for key in first)
    )


def train(run_dir: Path, threads: int, steps: int) -> Path:
    """Train the demo for `steps` steps with `threads` threads into `run_dir`."""
    overrides = [f"train.output_dir={run_dir}", f"train.max_steps={steps}", "train.log_every=1", "data.eval=null"]
    overrides.append("train.overwrite=true")  # a second call on the same --root trains anew
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "vlm_tune.train", "recipes/demo.yaml", *overrides]
    print(f"$ OMP_NUM_THREADS={threads} {' '.join(command)}", flush=True)
    log_file = run_dir.with_name(run_dir.name + ".log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        if subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"error: training failed; its output is in {log_file}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """Run every count --repeats times and print which runs are bit-identical."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4], help="OMP_NUM_THREADS values")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per thread count")
    parser.add_argument("--root", default="runs/demo_threads", help="folder of the run folders")
    parser.add_argument("--report-only", action="store_true", help="train nothing; compare the runs of ROOT")
    args = parser.parse_args(argv)
    run = (lambda folder, threads: folder) if args.report_only else (lambda folder, t: train(folder, t, args.steps))
    runs = {
        threads: [run(Path(args.root) / f"threads{threads}-run{r}", threads) for r in range(args.repeats)]
        for threads in args.threads
    }
    first = args.threads[0]
    print(f"\nlosses of the first run at each count ({args.steps} steps):")
    for threads, repeated in runs.items():
        print(f"  {threads} threads: {' '.join(f'{loss:.9f}' for loss in losses(repeated[0]))}")
        print(
            f"    repeats bit-identical (losses and weights): {all(same(repeated[0], run) for run in repeated[1:])}; "
            f"bit-identical to {first} threads: {same(runs[first][0], repeated[0])}"
        )
    record = {str(threads): [losses(run) for run in repeated] for threads, repeated in runs.items()}
    (Path(args.root) / "demo_threads.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
