"""GPU speed and memory benchmark: the common transformers + peft recipe, Unsloth and vlm_tune, side by side.

    python benchmarks/gpu.py --out runs/gpu                       # the synthetic table, all three models
    python benchmarks/gpu.py --plans real,proofs --out runs/gpu   # the train command; consumer-GPU proofs
    python benchmarks/gpu.py --tiny --plans all --out runs/gpu-tiny  # every path on CPU, tiny models

Every configuration runs in its own process (benchmarks/gpu_runs.py); vlm_tune's lever variants share the
process of their loaded model. Plans:
  synthetic  model path on one synthetic batch (the issue's workload): baseline and vlm_tune, QLoRA and bf16
  high_res   Qwen2.5-VL at 1,024 visual tokens per image, relevance keep 0.25 against all tokens
  real       `python -m vlm_tune.train` on a photo-sized caption set against the model path on the same batches
             (--profile MODEL:SETTING profiles both: benchmarks/train_profile.py for the train command)
  proofs     vlm_tune under torch.cuda.set_per_process_memory_fraction (consumer-GPU memory sizes)
  unsloth    Unsloth's FastVisionModel next to vlm_tune (needs the unsloth wheels)
  compile    speed.compile: layers against none, with and without checkpointing (each variant in its own process,
             one more warm-up step for the compile; the log gives each process's warm-up seconds)
  final      per model, one call: baseline, Unsloth, vlm_tune eager and vlm_tune compiled (each twice on its
             loaded model); the summary gives each vlm_tune row against Unsloth
  vision     Qwen2.5-VL QLoRA: speed.vision_attention batched against the model's own, then Unsloth
  lora_input bf16 LoRA: speed.lora_input autocast against PEFT's cast of each LoRA input to fp32 (A/B/A)
  memory     bf16 LoRA compiled: paged 8-bit AdamW and offloaded checkpoint inputs, then Unsloth bf16
  budget     QLoRA: speed.activation_budget_gib 2 / 4 / 8 GiB between full checkpointing and none
  vision_cache Qwen2.5-VL: speed.vision_cache_gib (every step after the first a hit) against the tower's run
  liger      bf16 LoRA and QLoRA: speed.liger_kernel (liger-kernel's decoder norms, MLPs, RoPE) against none (A/B/A)
  vision_states mllama bf16: speed.vision_states needed against every vision layer's output kept (A/B/A)
MFU = useful FLOPs / step time / the card's bf16 matrix rate (measured here, 8192^3). Useful FLOPs: the forward
of one batch on vlm_tune's path (logits at label positions only), counted by gpu_runs.count_flops (Linear layers,
4-bit ones too, as 2 x rows x in x out; other ops by torch's FLOP formulas), the frozen vision side once, the
language side twice (forward + input-gradient backward; frozen weights get no weight gradient, LoRA's own
products are left out). Recomputation is not useful work. benchmarks/gpu_flops.py counts the same on a CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from gpu_plans import PLANS, SPECS, compile_summary, unsloth_summary  # noqa: E402

FULL_STEPS = {"warmup": 2, "windows": 3, "per_window": 2}
TINY_STEPS = {"warmup": 1, "windows": 2, "per_window": 1}
# the plans whose vlm_tune processes take --profile and --memory
PROBED = ("synthetic", "final", "vision", "real", "lora_input", "budget", "vision_cache", "liger", "vision_states")
CAPTION_STEPS = {"warmup": 3, "windows": 4, "per_window": 4}  # the train command's batches differ step to step


# --- running ----------------------------------------------------------------------------------------------


def run_logged(command: list[str], log, timeout: int, title: str, **kwargs) -> tuple[str, bool, float]:
    """Run `command` (subprocess.run keyword arguments in `kwargs`); append its output's tail to `log`.

    Returns:
        (stdout + stderr, whether it failed or timed out, seconds).
    """
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
        output, failed = done.stdout + done.stderr, done.returncode != 0
    except subprocess.TimeoutExpired as error:
        output, failed = f"{error.stdout or ''}{error.stderr or ''}\ntimed out after {timeout} s", True
    seconds = time.perf_counter() - start
    log.write(f"\n===== {title} ({seconds:.0f} s)\n{output[-6000:]}\n")
    log.flush()
    return output, failed, seconds


def last_line(output: str) -> str:
    """The last non-empty line of a process's output (its error, when it failed), cut to 200 characters."""
    return ([line for line in output.strip().splitlines() if line.strip()][-1:] or ["no output"])[0][:200]


def run_process(spec: dict, log, timeout: int) -> list[dict]:
    """One spec in its own process; its RESULT lines (or one error row)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_runs.py"), json.dumps(spec)]
    output, failed, seconds = run_logged(command, log, timeout, json.dumps(spec))
    rows = [json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")]
    if failed and not rows:
        rows = [{"variant": spec["system"], "error": last_line(output)}]
    return [{**row, "process_s": seconds} for row in rows]


def train_command(spec: dict, log, timeout: int) -> list[dict]:
    """`python -m vlm_tune.train` on the spec's recipe (its `speed` section, its `env` variables); seconds per
    step of each window of the timed steps, from the run's log, as the model path times them."""
    import os

    import yaml
    from gpu_runs import recipe_dict

    steps, name = spec["steps"], spec.get("name", "train command")
    total = steps["warmup"] + steps["windows"] * steps["per_window"]
    run_dir = Path(spec["run_root"]) / f"train-{spec['model']}-{spec['setting']}"
    recipe = recipe_dict(spec, spec.get("speed"))
    recipe["train"].update(max_steps=total, output_dir=str(run_dir), keep_checkpoints=1, overwrite=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / f"{run_dir.name}.yaml").write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "vlm_tune.train", str(run_dir.parent / f"{run_dir.name}.yaml")]
    env = {**os.environ, **spec.get("env", {})}
    output, _, seconds = run_logged(command, log, timeout, f"{name} {spec['model']}", cwd=ROOT, env=env)
    log_file = run_dir / "log.jsonl"
    records = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
    records = [r for r in records if "train/seconds" in r]
    if len(records) < total:
        return [{"variant": name, "error": last_line(output)}]
    if spec.get("profile"):  # a second run under the profiler, after the timed one
        profiled = [sys.executable, str(ROOT / "benchmarks" / "train_profile.py"), command[-1], spec["profile"]]
        profiled += ["--skip", str(steps["warmup"]), "--steps", str(min(3, total - steps["warmup"]))]
        run_logged(profiled, log, timeout, "train command profiled", cwd=ROOT, env=env)
    return [{**window_times(records, steps, spec["batch_size"]), "variant": name, "process_s": seconds}]


def window_times(records: list[dict], steps: dict, batch_size: int) -> dict:
    """The train command's step time per window of `per_window` steps after the warm-up (median, min, max), the
    share of it spent waiting for the data loader, its peak memory and tokens per sample, from its log records."""
    import statistics

    marks = records[steps["warmup"] - 1 :: steps["per_window"]]  # the record closing each window's previous step
    windows = [(b["train/seconds"] - a["train/seconds"]) / steps["per_window"] for a, b in zip(marks, marks[1:])]
    first, last = marks[0], marks[-1]
    waited = last.get("train/data_seconds", 0.0) - first.get("train/data_seconds", 0.0)
    return {
        "step_s": statistics.median(windows),
        "step_s_min": min(windows),
        "step_s_max": max(windows),
        "data_share": waited / (last["train/seconds"] - first["train/seconds"]),
        "peak_gib": last.get("train/gpu_peak_gib"),
        "tokens_per_sample": last["train/tokens_per_s"] * last["train/seconds"] / last["step"] / batch_size,
        "batch_size": batch_size,
    }


def run_plan(specs: list[dict], args, folders: dict, log) -> list[dict]:
    from gpu_models import build_folder, caption_set

    rows = []
    for spec in specs:
        left = args.deadline - (time.perf_counter() - args.start)
        compiled = any((v.get("speed") or {}).get("compile") == "layers" for v in spec.get("variants", []))
        if left < (120 if compiled else 45):  # a compiled process needs its compile time on top
            print(f"skipped (deadline): {spec['system']} {spec['model']} {spec['setting']} {spec['workload']}")
            continue
        if spec["model"] not in folders:
            begin = time.perf_counter()
            folders[spec["model"]] = build_folder(spec["model"], args.root, args.tiny)
            print(f"{spec['model']} folder ready in {time.perf_counter() - begin:.0f} s", flush=True)
        spec = {**spec, "folder": str(folders[spec["model"]]), "tiny": args.tiny, "run_root": str(args.root)}
        steps = CAPTION_STEPS if spec["workload"] == "captions" else FULL_STEPS
        spec["steps"] = dict(TINY_STEPS if args.tiny else steps)
        spec["steps"]["warmup"] += spec.get("compile_warmup", 0)
        if spec["workload"] == "captions":
            spec["captions"] = str(caption_set(args.root, 24 if args.tiny else 256))
        timeout = int(min(args.timeout, left - 15))
        results = (train_command if spec["system"] == "train_command" else run_process)(spec, log, timeout)
        keys = ("model", "setting", "system", "workload", "checkpointing", "memory_cap_gib")
        with open(args.out / "results.jsonl", "a") as sink:
            for result in results:
                rows.append({**{k: spec.get(k) for k in keys}, **result})
                sink.write(json.dumps(rows[-1]) + "\n")
                print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['model']:<11} {row['setting']:<5} {row['variant']:<24} ERROR {row['error']}"
    return (
        f"{row['model']:<11} {row['setting']:<5} {row['variant']:<24} {row['step_s']:.3f} s/step"
        f" ({row.get('step_s_min', row['step_s']):.3f}-{row.get('step_s_max', row['step_s']):.3f})"
        f" peak {row.get('peak_gib') or 0:.1f} GiB (warm-up {row.get('warmup_s', 0):.0f} s,"
        f" {row['process_s']:.0f} s in its process)"
    )


def _eager(spec: dict) -> bool:
    """A vlm_tune process (or train command) that does not compile."""
    speeds = [v.get("speed") or {} for v in spec.get("variants", [])] + [spec.get("speed") or {}]
    return spec["system"] in ("vlm_tune", "train_command") and not any(s.get("compile") for s in speeds)


def _attach_probes(spec: dict, plan: str, args) -> None:
    """--profile and --memory: the kernel profile and the peak-memory record of one vlm_tune process (final: the
    profile of its compiled process, the memory record of its eager one, as torch's allocator history broke the
    compiled offloading backward; real: the profile of the model path and of the train command), under --out."""
    plain = spec["system"] == "train_command" and "name" not in spec  # not its allocator or compile variant
    if plain and args.profile == f"{spec['model']}:{spec['setting']}":
        spec["profile"] = str(args.out / f"profile-train-{spec['model']}-{spec['setting']}.txt")
    if spec["system"] != "vlm_tune" or plan not in PROBED:
        return
    compiled = any(v.get("speed", {}).get("compile") for v in spec["variants"])
    name = f"{spec['model']}-{spec['setting']}"
    if args.profile == f"{spec['model']}:{spec['setting']}" and compiled == (plan == "final"):
        spec["profile"] = str(args.out / f"profile-{name}.txt")
    if args.memory == f"{spec['model']}:{spec['setting']}" and (plan != "final" or not compiled):
        spec["memory"] = str(args.out / f"memory-{name}.txt")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models of the three families (runs on a CPU)")
    parser.add_argument("--plans", default="synthetic", help=f"comma-separated, or all: {', '.join(PLANS)}")
    parser.add_argument("--models", default="mllama,qwen2_5_vl,idefics3")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--root", type=Path, default=Path("/tmp/vlm_tune_bench"), help="model folders, caption set")
    parser.add_argument("--out", type=Path, required=True, help="results.jsonl, table.md, log.txt, profiles")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per process")
    parser.add_argument("--deadline", type=int, default=10**6, help="start no process after this many seconds")
    parser.add_argument("--systems", default="", help="only these systems, e.g. vlm_tune,baseline (default: all)")
    parser.add_argument("--settings", default="", help="only these settings, e.g. qlora (default: all)")
    parser.add_argument("--compiled-only", action="store_true", help="skip vlm_tune's processes without compile")
    parser.add_argument("--profile", default="", help="model:setting whose vlm_tune run is profiled, e.g. mllama:qlora")
    parser.add_argument(
        "--memory", default="", help="model:setting whose vlm_tune run records where its peak memory goes"
    )
    args = parser.parse_args(argv)
    from gpu_table import markdown_table, versions

    plans = list(PLANS) if args.plans == "all" else args.plans.split(",")
    models = args.models.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    args.root.mkdir(parents=True, exist_ok=True)
    args.start = time.perf_counter()
    folders: dict = {}
    rows = []
    with open(args.out / "log.txt", "a") as log:
        if not args.tiny:
            rows += run_process({"system": "matmul"}, log, 120)
        for plan in plans:
            specs = [
                spec
                for spec in SPECS[plan](models, args.batch_size)
                if (not args.systems or spec["system"] in args.systems.split(","))
                and (not args.settings or spec["setting"] in args.settings.split(","))
                and not (args.compiled_only and _eager(spec))
            ]
            for spec in specs:
                _attach_probes(spec, plan, args)
            rows += run_plan(specs, args, folders, log)
            table = "\n".join([versions() + "\n", markdown_table(rows), *compile_summary(rows), *unsloth_summary(rows)])
            (args.out / "table.md").write_text(table + "\n")
    print(table)
    print(f"total {time.perf_counter() - args.start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
