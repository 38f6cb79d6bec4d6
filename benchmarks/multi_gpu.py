"""Several GPUs: DDP and FSDP against one GPU at the same global batch, through the training command.

    python benchmarks/multi_gpu.py --gpus 1,2 --models mllama --out $OUT/multi --root /tmp/bench    # h200-x2
    python benchmarks/multi_gpu.py --gpus 1,2,4 --out $OUT/multi4 --root /tmp/bench                # h200-x4
    python benchmarks/multi_gpu.py --tiny --gpus 1,2 --out runs/multi-tiny                         # CPU, gloo

Every run is `python -m vlm_tune.train` on the GPU benchmark's caption set and recipe (benchmarks/gpu_runs.py
`recipe_dict`: LoRA r16 on the language model's attention and MLP, mllama: and its cross-attention; vision frozen;
bf16 autocast; activation checkpointing), on the full-size random-weight models of benchmarks/gpu_models.py.
One GPU runs the plain command; N GPUs run `accelerate launch --config_file recipes/accelerate/CONFIG` with
ddp.yaml, fsdp.yaml or (4-bit) fsdp_qlora.yaml. Each GPU reads micro-batches of --batch-size; the global batch
is batch x max(--gpus) in every run (one GPU accumulates max(gpus) micro-batches per step, N GPUs max/N), so the
loss curves compare step by step. With --tiny: the tests' tiny models on CPU processes (gloo; FSDP through
tests/cpu_fsdp.py, since accelerate keeps FSDP for GPU backends only).

Per run (from its log.jsonl): samples/s over the steps after --warmup (train seconds: data loading and steps,
not the final save), peak GiB (torch.cuda.max_memory_allocated, the largest of the GPUs), the loss of every step.
Per N-GPU run: scaling efficiency = samples/s / (N x samples/s of the one-GPU run), FSDP's peak over DDP's, and
the largest loss difference to the one-GPU run. Writes results.jsonl, table.md and log.txt under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

CONFIGS = ROOT / "recipes" / "accelerate"
SETTINGS = ("bf16", "qlora")


def run_specs(models: list[str], settings: list[str], gpus: list[int], batch_size: int) -> list[dict]:
    """One GPU, then DDP and FSDP on every larger count, per model and setting; all at one global batch."""
    most = max(gpus)
    specs = []
    for model in models:
        for setting in settings:
            common = {"model": model, "setting": setting, "batch_size": batch_size, "global_batch": batch_size * most}
            specs.append({**common, "mode": "one GPU", "gpus": 1, "grad_accum": most})
            for count in sorted(g for g in gpus if g > 1):
                for mode in ("ddp", "fsdp"):
                    specs.append({**common, "mode": mode, "gpus": count, "grad_accum": most // count})
    return specs


def _config(spec: dict) -> Path:
    if spec["mode"] == "ddp":
        return CONFIGS / "ddp.yaml"
    return CONFIGS / ("fsdp_qlora.yaml" if spec["setting"] == "qlora" else "fsdp.yaml")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(spec: dict, recipe: Path, tiny: bool) -> tuple[list[str], dict]:
    """The command line and environment of one run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if tiny:  # CPU processes (gloo), one thread each
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    if spec["gpus"] == 1:
        return [sys.executable, "-m", "vlm_tune.train", str(recipe)], env
    entry = [str(ROOT / "tests" / "cpu_fsdp.py")] if tiny and spec["mode"] == "fsdp" else ["-m", "vlm_tune.train"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_config(spec))]
    launch += ["--num_processes", str(spec["gpus"]), "--main_process_port", str(_free_port())]
    return [*launch, *entry, str(recipe)], env


def _recipe(spec: dict, args, folder: Path, captions: Path, run_dir: Path) -> dict:
    from gpu_runs import recipe_dict

    recipe = recipe_dict(
        {
            **spec,
            "folder": str(folder),
            "captions": str(captions),
            "checkpointing": args.checkpointing,
            "tiny": args.tiny,
        }
    )
    recipe["train"].update(
        max_steps=args.warmup + args.steps, grad_accum=spec["grad_accum"], output_dir=str(run_dir), seed=0
    )
    recipe["train"].update(keep_checkpoints=1, overwrite=True)  # every call trains the run anew
    if args.tiny:
        recipe["data"]["num_workers"] = 0
    return recipe


def measure(records: list[dict], warmup: int, global_batch: int) -> dict:
    """Samples/s between the end of step `warmup` and the last step, the peak GiB, and the loss per step."""
    steps = [r for r in records if "train/seconds" in r]
    result = {
        "losses": {r["step"]: r["train/loss"] for r in steps},
        "peak_gib": steps[-1].get("train/gpu_peak_gib") if steps else None,
    }
    if len(steps) > warmup >= 1:
        first, last = steps[warmup - 1], steps[-1]
        seconds = last["train/seconds"] - first["train/seconds"]
        result["samples_s"] = (last["step"] - first["step"]) * global_batch / seconds
        result["step_s"] = seconds / (last["step"] - first["step"])
    return result


def run(spec: dict, args, folder: Path, captions: Path, log) -> dict:
    """One run in its own process(es); its measurements, or an error."""
    import yaml
    from gpu import last_line, run_logged

    name = f"{spec['model']}-{spec['setting']}-{spec['mode'].replace(' ', '')}-{spec['gpus']}"
    run_dir = args.root / "multi" / name
    recipe_path = args.root / "multi" / f"{name}.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").unlink(missing_ok=True)
    recipe_path.write_text(yaml.safe_dump(_recipe(spec, args, folder, captions, run_dir)))
    line, env = command(spec, recipe_path, args.tiny)
    output, failed, seconds = run_logged(line, log, args.run_timeout, " ".join(line), env=env, cwd=ROOT)
    records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()] if not failed else []
    row = {**spec, "tiny": args.tiny, "process_s": seconds, **measure(records, args.warmup, spec["global_batch"])}
    if failed or "samples_s" not in row:
        row["error"] = last_line(output)
    return row


def compare(rows: list[dict]) -> list[dict]:
    """Add scaling efficiency, FSDP/DDP peak memory and the largest loss difference to the one-GPU run."""
    single = {(r["model"], r["setting"]): r for r in rows if r["gpus"] == 1 and "samples_s" in r}
    ddp = {(r["model"], r["setting"], r["gpus"]): r for r in rows if r["mode"] == "ddp" and r.get("peak_gib")}
    for row in rows:
        base = single.get((row["model"], row["setting"]))
        if row["gpus"] == 1 or base is None or "samples_s" not in row:
            continue
        row["efficiency"] = row["samples_s"] / (row["gpus"] * base["samples_s"])
        shared = sorted(set(row["losses"]) & set(base["losses"]))
        row["max_loss_diff"] = max((abs(row["losses"][s] - base["losses"][s]) for s in shared), default=None)
        other = ddp.get((row["model"], row["setting"], row["gpus"]))
        if row["mode"] == "fsdp" and other and row.get("peak_gib"):
            row["peak_vs_ddp"] = row["peak_gib"] / other["peak_gib"]
    return rows


def _cell(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def markdown_table(rows: list[dict]) -> str:
    """One line per run; errors included."""
    from gpu_models import TITLES

    head = "| model | setting | GPUs | mode | batch/GPU x accum | samples/s | s/step | efficiency | peak GiB/GPU "
    head += "| peak vs DDP | max loss diff vs 1 GPU |"
    lines = [head, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        title = f"tiny {r['model']}" if r.get("tiny") else TITLES.get(r["model"], r["model"])
        label = f"| {title} | {r['setting']} | {r['gpus']} | {r['mode']} "
        label += f"| {r['batch_size']} x {r['grad_accum']} |"
        if "error" in r:
            lines.append(f"{label} error: {r['error']} |" + " |" * 5)
            continue
        cells = [_cell(r.get("samples_s"), ".2f"), _cell(r.get("step_s"), ".3f"), _cell(r.get("efficiency"), ".2f")]
        cells += [_cell(r.get("peak_gib"), ".1f"), _cell(r.get("peak_vs_ddp"), ".2f")]
        cells.append(_cell(r.get("max_loss_diff"), ".4f"))
        lines.append(label + " " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_table(rows: list[dict]) -> str:
    """The loss of every step, one column per run of a model and setting."""
    lines = []
    for key in dict.fromkeys((r["model"], r["setting"]) for r in rows):
        runs = [r for r in rows if (r["model"], r["setting"]) == key and r.get("losses")]
        if not runs:
            continue
        steps = sorted({s for r in runs for s in r["losses"]}, key=int)
        lines += [
            f"\n{key[0]} {key[1]}: loss per step",
            "| step | " + " | ".join(f"{r['gpus']} {r['mode']}" for r in runs) + " |",
        ]
        lines.append("|---:|" + "---:|" * len(runs))
        lines += [f"| {s} | " + " | ".join(_cell(r["losses"].get(s), ".4f") for r in runs) + " |" for s in steps]
    return "\n".join(lines)


def write_results(rows: list[dict], out: Path, versions: str) -> str:
    """results.jsonl (one row per run) and table.md (versions, the runs, the loss curves); returns the table."""
    (out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = f"{versions}\n\n{markdown_table(rows)}\n{loss_table(rows)}\n"
    (out / "table.md").write_text(table)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models on CPU processes (gloo)")
    parser.add_argument("--gpus", default="1,2", help="GPU counts, e.g. 1,2 or 1,2,4 (1 is the reference)")
    parser.add_argument("--models", default="mllama,qwen2_5_vl")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="bf16 (16-bit LoRA), qlora (4-bit base)")
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch per GPU")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--root", type=Path, default=Path("/tmp/vlm_tune_bench"), help="model folders, caption set")
    parser.add_argument("--out", type=Path, required=True, help="results.jsonl, table.md, log.txt")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run")
    parser.add_argument("--deadline", type=int, default=10**6, help="start no run after this many seconds")
    args = parser.parse_args(argv)
    from gpu_models import build_folder, caption_set
    from gpu_table import versions

    gpus = sorted({int(g) for g in args.gpus.split(",")} | {1})
    specs = run_specs(args.models.split(","), args.settings.split(","), gpus, args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    args.root.mkdir(parents=True, exist_ok=True)
    start, rows, folders, table = time.perf_counter(), [], {}, ""
    captions = caption_set(args.root, 48 if args.tiny else 256)
    with open(args.out / "log.txt", "a") as log:
        for spec in specs:
            left = args.deadline - (time.perf_counter() - start)
            if left < 0:
                print(f"skipped (deadline): {spec}")
                continue
            if spec["model"] not in folders:
                folders[spec["model"]] = build_folder(spec["model"], args.root, args.tiny)
            args.run_timeout = int(min(args.timeout, left + 90))
            rows.append(run(spec, args, folders[spec["model"]], captions, log))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
            table = write_results(compare(rows), args.out, versions())  # after every run: a killed call keeps them
    print(table)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
