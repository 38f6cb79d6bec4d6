"""GPU speed and memory benchmark: the common transformers + peft recipe, Unsloth and vlm_tune, side by side.

    python benchmarks/gpu.py --out runs/gpu                       # the synthetic table, all three models
    python benchmarks/gpu.py --plans real,proofs --out runs/gpu   # the train command; consumer-GPU proofs
    python benchmarks/gpu.py --tiny --plans all --out runs/gpu-tiny  # every path on CPU, tiny models

Every configuration runs in its own process (benchmarks/gpu_runs.py); vlm_tune's lever variants share the
process of their loaded model. Plans:
  synthetic  model path on one synthetic batch (the issue's workload): baseline and vlm_tune, QLoRA and bf16
  high_res   Qwen2.5-VL at 1,024 visual tokens per image, relevance keep 0.25 against all tokens
  real       `python -m vlm_tune.train` on a photo-sized caption set against the model path on the same batches
  proofs     vlm_tune under torch.cuda.set_per_process_memory_fraction (consumer-GPU memory sizes)
  unsloth    Unsloth's FastVisionModel next to vlm_tune (needs the unsloth wheels)
  compile    speed.compile: layers against none, with and without checkpointing (each variant in its own process,
             one more warm-up step for the compile; the log gives each process's warm-up seconds)
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

FULL_STEPS = {"warmup": 2, "windows": 3, "per_window": 2}
TINY_STEPS = {"warmup": 1, "windows": 2, "per_window": 1}
PLANS = ("synthetic", "high_res", "real", "proofs", "unsloth", "compile")
PLAIN = {"loss": "model", "padding_tiles": "keep", "optimizer": "adamw"}  # the vlm_tune model path


def _variants(checkpointing: bool) -> list[dict]:
    """vlm_tune's lever variants on one loaded model."""
    rows = [
        {"name": "levers, no ckpt", "checkpointing": False},
        {"name": "plain, no ckpt", "checkpointing": False, "speed": PLAIN},
    ]
    if checkpointing:
        rows = [
            {"name": "levers, ckpt", "checkpointing": True},
            {"name": "plain, ckpt", "checkpointing": True, "speed": PLAIN},
            {"name": "levers, ckpt every 2nd", "checkpointing": True, "speed": {"checkpoint_every": 2}},
            *rows,
        ]
    return rows


def synthetic_specs(models: list[str], batch_size: int) -> list[dict]:
    """Baseline and vlm_tune for every model and setting (SmolVLM: bf16 LoRA only)."""
    specs = []
    for setting in ("qlora", "bf16"):
        for model in [m for m in models if setting == "bf16" or m != "idefics3"]:
            common = {"model": model, "setting": setting, "batch_size": batch_size, "workload": "synthetic"}
            specs.append({**common, "system": "baseline", "checkpointing": True})
            specs.append(
                {
                    **common,
                    "system": "vlm_tune",
                    "checkpointing": True,
                    "variants": _variants(True) if setting == "qlora" else [_variants(True)[0], _variants(False)[0]],
                    "count_flops": True,
                }
            )
    return specs


def high_res_specs(models: list[str], batch_size: int) -> list[dict]:
    if "qwen2_5_vl" not in models:
        return []
    variants = [
        {"name": "all visual tokens", "checkpointing": False},
        {"name": "relevance keep 0.25", "checkpointing": False, "relevance_keep": 0.25},
    ]
    common = {"model": "qwen2_5_vl", "setting": "qlora", "batch_size": batch_size, "workload": "high_res"}
    return [{**common, "system": "vlm_tune", "checkpointing": True, "variants": variants, "count_flops": True}]


def real_specs(models: list[str], batch_size: int) -> list[dict]:
    """The train command and the model path on the same caption batches (QLoRA; SmolVLM bf16), checkpointing."""
    specs = []
    for model in models:
        setting = "bf16" if model == "idefics3" else "qlora"
        common = {
            "model": model,
            "setting": setting,
            "batch_size": batch_size,
            "workload": "captions",
            "checkpointing": True,
        }
        specs.append({**common, "system": "vlm_tune", "variants": [{"name": "model path", "checkpointing": True}]})
        specs.append({**common, "system": "train_command"})
    return specs


PROOFS = [  # model, setting, batch, GiB cap, 16-bit components
    ("mllama", "qlora", 4, 12, ["vision", "projector"]),
    ("mllama", "qlora", 1, 10, ["vision", "projector"]),
    ("qwen2_5_vl", "qlora", 1, 8, []),
    ("idefics3", "bf16", 8, 8, None),
]


def proof_specs(models: list[str], batch_size: int) -> list[dict]:
    return [
        {
            "model": model,
            "setting": setting,
            "batch_size": batch,
            "workload": "synthetic",
            "system": "vlm_tune",
            "checkpointing": True,
            "memory_cap_gib": cap,
            "keep_16bit": keep,
            "variants": [
                {"name": f"under {cap} GiB", "checkpointing": True, "speed": {"optimizer": "paged_adamw_8bit"}}
            ],
        }
        for model, setting, batch, cap, keep in PROOFS
        if model in models
    ]


def unsloth_specs(models: list[str], batch_size: int) -> list[dict]:
    specs = []
    for model in [m for m in models if m != "idefics3"]:
        for setting in ("qlora", "bf16"):
            common = {"model": model, "setting": setting, "batch_size": batch_size, "workload": "synthetic"}
            specs.append({**common, "system": "unsloth", "checkpointing": True})
            specs.append(
                {
                    **common,
                    "system": "vlm_tune",
                    "checkpointing": True,
                    "variants": _variants(True)[:1] + _variants(False)[:1],
                }
            )
    return specs


COMPILE_VARIANTS = [  # name, checkpointing, speed section
    ("levers, ckpt", True, {}),
    ("levers, ckpt, compile", True, {"compile": "layers"}),
    ("levers, no ckpt", False, {}),
    ("levers, no ckpt, compile", False, {"compile": "layers"}),
]


def compile_specs(models: list[str], batch_size: int) -> list[dict]:
    """vlm_tune with and without `speed.compile: layers`, one process per variant (SmolVLM: bf16 LoRA only)."""
    specs = []
    for setting in ("qlora", "bf16"):
        for model in [m for m in models if setting == "bf16" or m != "idefics3"]:
            common = {"model": model, "setting": setting, "batch_size": batch_size, "workload": "synthetic"}
            for index, (name, checkpointing, speed) in enumerate(COMPILE_VARIANTS):
                variant = {"name": name, "checkpointing": checkpointing, "speed": speed}
                specs.append(
                    {
                        **common,
                        "system": "vlm_tune",
                        "checkpointing": True,
                        "variants": [variant],
                        "compile_warmup": 1,  # every variant, so all four take the same steps
                        "count_flops": index == 0,  # the MFU column of all four (counted uncompiled)
                    }
                )
    return specs


def compile_summary(rows: list[dict]) -> list[str]:
    """Per model and setting: the compiled variant's speed and memory against the same variant uncompiled."""
    timed = {(r["model"], r["setting"], r["variant"]): r for r in rows if "step_s" in r}
    lines = []
    for (model, setting, name), row in timed.items():
        eager = timed.get((model, setting, name.removesuffix(", compile")))
        if name.endswith(", compile") and eager:
            lines.append(
                f"compile: {model} {setting} {eager['variant']}: {eager['step_s'] / row['step_s']:.2f}x speed, "
                f"peak {row.get('peak_gib') or 0:.1f} against {eager.get('peak_gib') or 0:.1f} GiB, "
                f"warm-up {row.get('warmup_s', 0):.0f} against {eager.get('warmup_s', 0):.0f} s"
            )
    return lines


SPECS = {
    "synthetic": synthetic_specs,
    "high_res": high_res_specs,
    "real": real_specs,
    "proofs": proof_specs,
    "unsloth": unsloth_specs,
    "compile": compile_specs,
}


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
    """`python -m vlm_tune.train` on the spec's recipe; seconds per step from its log between warm-up and the end."""
    import yaml
    from gpu_runs import recipe_dict

    steps = spec["steps"]
    total = steps["warmup"] + steps["windows"] * steps["per_window"]
    run_dir = Path(spec["run_root"]) / f"train-{spec['model']}-{spec['setting']}"
    recipe = recipe_dict(spec)
    recipe["train"].update(max_steps=total, output_dir=str(run_dir), keep_checkpoints=1, overwrite=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / f"{run_dir.name}.yaml").write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "vlm_tune.train", str(run_dir.parent / f"{run_dir.name}.yaml")]
    output, _, seconds = run_logged(command, log, timeout, f"train command {spec['model']}", cwd=ROOT)
    records = (
        [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        if (run_dir / "log.jsonl").is_file()
        else []
    )
    records = [r for r in records if "train/seconds" in r]
    if len(records) <= steps["warmup"]:
        return [{"variant": "train command", "error": last_line(output)}]
    first, last = records[steps["warmup"] - 1], records[-1]
    step_s = (last["train/seconds"] - first["train/seconds"]) / (last["step"] - first["step"])
    return [
        {
            "variant": "train command",
            "step_s": step_s,
            "peak_gib": last.get("train/gpu_peak_gib"),
            "batch_size": spec["batch_size"],
            "tokens_per_sample": last["train/tokens_per_s"] * last["train/seconds"] / last["step"] / spec["batch_size"],
            "process_s": seconds,
        }
    ]


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
        spec["steps"] = dict(TINY_STEPS if args.tiny else FULL_STEPS)
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
    parser.add_argument("--profile", default="", help="model:setting whose vlm_tune run is profiled, e.g. mllama:qlora")
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
            ]
            for spec in specs:
                if (
                    args.profile == f"{spec['model']}:{spec['setting']}"
                    and spec["system"] == "vlm_tune"
                    and plan == "synthetic"
                ):
                    spec["profile"] = str(args.out / f"profile-{spec['model']}-{spec['setting']}.txt")
            rows += run_plan(specs, args, folders, log)
            table = "\n".join([versions() + "\n", markdown_table(rows), *compile_summary(rows)])
            (args.out / "table.md").write_text(table + "\n")
    print(table)
    print(f"total {time.perf_counter() - args.start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
