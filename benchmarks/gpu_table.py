"""The GPU benchmark's table: ratios to the baseline, MFU, and the versions it ran with."""

from __future__ import annotations

import platform

from gpu_models import TITLES


def versions() -> str:
    """Device and library versions, one line."""
    import peft
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "absent"
    return (
        f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bnb}"
    )


def _key(row: dict) -> tuple:
    return row.get("model"), row.get("setting"), row.get("workload"), row.get("batch_size"), row.get("memory_cap_gib")


def _path_key(row: dict) -> tuple:
    """A train command row's reference: the model path row of its workload, compiled when it is compiled."""
    return (*_key(row), ", compile" in row["variant"])


def markdown_table(rows: list[dict]) -> str:
    """One markdown table of every measured row (errors included), ratios against the baseline row of its workload."""
    peak_rate = next((r["tflops"] for r in rows if r.get("variant") == "matmul" and "tflops" in r), None)
    measured = [r for r in rows if r.get("system") and "step_s" in r]
    baselines = {_key(r): r for r in measured if r["system"] == "baseline"}
    paths = {_path_key(r): r for r in measured if r["variant"] in ("model path", "model path, compile")}
    flops = {_key(r): r["useful_flops"] for r in measured if r.get("useful_flops")}
    head = (
        "| model | setting | workload | system | variant | s/step (min-max) | samples/s | tokens/s | peak GiB "
        "| MFU | speed vs reference | memory vs reference |"
    )
    lines = [head, "|" + "---|" * 5 + "---:|" * 7]
    for row in [r for r in rows if r.get("system")]:
        label = (
            f"| {TITLES.get(row['model'], row['model'])} | {row['setting']} | {row['workload']}"
            f"{' cap ' + str(row['memory_cap_gib']) + ' GiB' if row.get('memory_cap_gib') else ''} "
            f"| {row['system']} | {row['variant']} |"
        )
        if "step_s" not in row:
            lines.append(label + f" error: {row.get('error', '?')} |" + " |" * 6)
            continue
        samples = row["batch_size"] / row["step_s"]
        base = paths.get(_path_key(row)) if row["system"] == "train_command" else baselines.get(_key(row))
        useful = flops.get(_key(row))
        low, high = row.get("step_s_min", row["step_s"]), row.get("step_s_max", row["step_s"])
        cells = [
            f"{row['step_s']:.3f} ({low:.3f}-{high:.3f})",
            f"{samples:.2f}",
            f"{samples * row.get('tokens_per_sample', 0):.0f}",
            f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "-",
            f"{100 * useful / row['step_s'] / (peak_rate * 1e12):.0f}%" if useful and peak_rate else "-",
            f"{base['step_s'] / row['step_s']:.2f}x" if base else "-",
            f"{row['peak_gib'] / base['peak_gib']:.2f}x"
            if base and row.get("peak_gib") and base.get("peak_gib")
            else "-",
        ]
        lines.append(label + " " + " | ".join(cells) + " |")
    notes = ["reference: the baseline of the same model, setting and workload; for the train command, the model path"]
    if peak_rate:
        notes.append(f"bf16 matrix rate measured on this card: {peak_rate:.0f} TFLOP/s (8192^3, median of 10).")
    for row in [r for r in measured if "data_share" in r]:
        share = 100 * row["data_share"]
        notes.append(f"{row['variant']}, {row['model']}: {share:.0f}% of its step time waiting for the data loader")
    for key, value in flops.items():
        name = TITLES.get(key[0], key[0])
        notes.append(f"useful FLOPs per step, {name} {key[1]} {key[2]} batch {key[3]}: {value / 1e12:.1f} TFLOP")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])
