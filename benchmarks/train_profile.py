"""The train command under torch.profiler: where a step of `python -m vlm_tune.train` spends CPU and GPU time.

    python benchmarks/train_profile.py recipe.yaml profile.txt [--skip 3] [--steps 3]

Trains as `python -m vlm_tune.train recipe.yaml` does (the recipe's train.max_steps must cover skip + steps) and
profiles the optimizer steps after the first `skip` (warm-up): data loading, forward, backward, clipping, the
update and the step's logging. The file gets the GPU-busy share of the wall time and the top operations by
self CPU time and by GPU time (gpu.py --plans real --profile MODEL:SETTING runs it after the timed run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from gpu_measure import gpu_busy, kernel_summary  # noqa: E402


def _table(events, key: str) -> str:
    return events.table(sort_by=key, row_limit=25, max_name_column_width=70)


def main(argv=None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vlm_tune.recipe import load_recipe
    from vlm_tune.train import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("--skip", type=int, default=3, help="optimizer steps before the profile starts")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps profiled")
    args = parser.parse_args(argv)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)
    clock = {}

    def on_step(step: int) -> None:
        if step == args.skip:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            clock["start"] = time.perf_counter()
            profiler.start()
        elif step == args.skip + args.steps:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            profiler.stop()
            clock["wall"] = time.perf_counter() - clock["start"]

    try:
        train(load_recipe(args.recipe), on_step=on_step, show_progress=False)
    finally:
        if "start" in clock and "wall" not in clock:
            profiler.stop()  # a profiler left running crashes the interpreter at exit
    if "wall" not in clock:
        print(f"error: the run ended before step {args.skip + args.steps}; raise train.max_steps", file=sys.stderr)
        return 1
    events = profiler.key_averages()
    key, busy = gpu_busy(events, clock["wall"], args.steps)
    header = f"train command: {busy}\n{kernel_summary(profiler.events(), clock['wall'], args.steps)}\n"
    body = "by self CPU time\n" + _table(events, "self_cpu_time_total") + "\nby GPU time\n" + _table(events, key)
    Path(args.out).write_text(header + body + "\n")
    print(header, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
