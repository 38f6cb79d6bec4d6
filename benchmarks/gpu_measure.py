"""Measurements of the GPU benchmark: step timing and peak memory, FLOPs by component, a kernel profile."""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, batches: list[dict], steps: dict) -> dict:
    """Warm-up steps (timed apart: compilation), then windows of steps; seconds per step of each window, peak memory
    over all of them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step(batches[i % len(batches)]) for i in range(steps["warmup"])]
    sync()
    warmup_s = time.perf_counter() - start  # torch.compile's compilation happens here, outside the windows
    print(f"warm-up: {steps['warmup']} steps in {warmup_s:.1f} s", flush=True)
    windows, done = [], steps["warmup"]
    for _ in range(steps["windows"]):
        sync()
        start = time.perf_counter()
        for _ in range(steps["per_window"]):
            losses.append(step(batches[done % len(batches)]))
            done += 1
        sync()
        windows.append((time.perf_counter() - start) / steps["per_window"])
    cuda = torch.cuda.is_available()
    return {
        "step_s": statistics.median(windows),
        "step_s_min": min(windows),
        "step_s_max": max(windows),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "last_loss": float(losses[-1]),
        "warmup_s": warmup_s,
    }


def count_flops(model, batch: dict, cmap, forward_only: tuple = ("vision", "projector")) -> dict:
    """Forward FLOPs of one batch by component: Linear layers (4-bit ones too) as 2 x rows x in x out, every
    other op (attention, convolutions, matrix products outside Linear layers) by torch's FLOP formulas.

    torch's own FlopCounterMode misses bitsandbytes' 4-bit matrix products (custom ops), hence this counter.
    Returns forward FLOPs, the forward-only part (frozen vision side) and the useful FLOPs of a step.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    from vlm_tune.model.targeting import base_name

    flops: dict[str, float] = {}
    stack: list[tuple[str, bool]] = []  # (component, is a Linear layer) of the modules running, innermost last
    names = {id(m): n for n, m in model.named_modules()}

    def add(amount: float) -> None:
        component = next((c for c, _ in reversed(stack) if c), "other")
        flops[component] = flops.get(component, 0.0) + amount

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket in flop_registry and not (stack and stack[-1][1]):
                add(flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out))
            return out

    def enter(module, args):
        name = names.get(id(module), "")
        linear = isinstance(module, torch.nn.Linear)
        stack.append((cmap.component_of(base_name(name)) or "", linear))
        if linear and "lora_" not in name:  # LoRA's own products are left out
            add(2.0 * args[0].numel() * module.out_features)

    def leave(module, args, output):
        stack.pop()

    hooks = []
    for module in model.modules():
        hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with autocast(), Ops():
            model(**batch).loss.detach()
    finally:
        for hook in hooks:
            hook.remove()
    once = sum(v for k, v in flops.items() if k in forward_only)
    total = sum(flops.values())
    return {
        "forward_flops": total,
        "forward_only_flops": once,
        "useful_flops": once + 2 * (total - once),
        "flops_by_component": flops,
    }


def profile_steps(step, batch: dict, path: str) -> None:
    """torch.profiler over 3 steps, written to `path`: the GPU-busy share, GPU time by kind of kernel, and the top
    operations by GPU time and by self CPU time (where the host spends a step that the GPU waits for)."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(batch)
        sync()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    key, header = gpu_busy(events, wall, 3)
    tables = [
        header,
        kernel_summary(prof.events(), wall, 3),
        "by GPU time",
        events.table(sort_by=key, row_limit=25, max_name_column_width=70),
        "by self CPU time",
        events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70),
    ]
    Path(path).write_text("\n".join(tables) + "\n")


def gpu_busy(events, wall: float, steps: int) -> tuple[str, str]:
    """(the GPU-time sort key of these profiler events, a line with the wall time, kernel time and busy share)."""
    import torch

    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = sum(getattr(e, key) for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    return (
        key,
        f"wall {wall:.3f} s for {steps} steps; GPU kernel time {kernels:.3f} s ({100 * kernels / wall:.0f}% busy)",
    )


KERNEL_KINDS = (  # (kind, substrings of the kernel name, lower case), first match wins
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "cudnn")),
    ("4-bit dequantisation", ("dequant", "kquantize", "bnb")),
    ("matrix products", ("gemm", "cutlass", "nvjet", "xmma", "wgmma", "cublas", "matmul", "gemv")),
    ("compiled fused ops (triton)", ("triton",)),
    ("copies and fills", ("memcpy", "memset", "copy", "fill", "cat")),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its name (KERNEL_KINDS; 'other' when none matches)."""
    lower = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(part in lower for part in parts)), "other")


def kernel_summary(events, wall: float, steps: int) -> str:
    """Lines on the profiled kernels: launches per step, the time the GPU ran any kernel (overlaps merged) against
    the wall time, and kernel time by kind."""
    import torch

    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, reach = 0.0, float("-inf")
    for begin, end in spans:  # the union of the kernels' intervals, in microseconds
        busy += max(0.0, end - max(begin, reach))
        reach = max(reach, end)
    by_kind: dict[str, float] = {}
    for event in kernels:
        kind = kernel_kind(event.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + (event.time_range.end - event.time_range.start)
    total = sum(by_kind.values()) or 1.0
    lines = [
        f"{len(kernels) / steps:.0f} kernels per step; the GPU ran a kernel {busy / 1e6:.3f} s of the {wall:.3f} s "
        f"({100 * busy / 1e6 / wall:.0f}%, overlaps counted once)",
        "GPU time by kind of kernel: "
        + ", ".join(f"{kind} {100 * t / total:.0f}%" for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1])),
    ]
    return "\n".join(lines)


OUR_CODE = ("vlm_tune/", "transformers/", "peft/", "bitsandbytes/", "torch/optim/", "torch/utils/checkpoint")
BEFORE = "allocated before the step (weights, trainable state, optimizer)"


def _label(frames: list[dict]) -> str:
    """The innermost frame in library code we can name (model, adapter, checkpoint, optimizer code)."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(part in name for part in OUR_CODE):
            short = name.split("site-packages/")[-1].split("/work/main/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    return "no library frame (mostly autograd's backward, which runs in C++)"


def _find_peak(events: list[dict]) -> tuple[int, int, int]:
    """(index of the event after which the most is allocated, -1: before any; bytes allocated then above the
    start; bytes of blocks from before the recording that the step frees)."""
    live, current, peak, peak_index, older_freed = set(), 0, 0, -1, 0
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live.add(event["addr"])
            current += event["size"]
        elif event["action"] == "free_requested":
            current -= event["size"]
            if event["addr"] in live:
                live.discard(event["addr"])
            else:
                older_freed += event["size"]
        if current > peak:
            peak, peak_index = current, index
    return peak_index, peak, older_freed


def peak_blocks(snapshot: dict) -> tuple[int, list[tuple[str, int]]]:
    """Replay an allocator snapshot (`torch.cuda.memory._snapshot()` with history) to its peak of allocated bytes.

    Blocks live before the recording began count as one group (BEFORE). Returns (peak bytes, [(label, bytes live at
    the peak)], the largest first).
    """
    events = snapshot["device_traces"][0]
    traced = {e["addr"] for e in events if e["action"] == "alloc"}
    still_live = sum(
        block["size"]
        for segment in snapshot["segments"]
        for block in segment["blocks"]
        if block["state"] == "active_allocated" and block["address"] not in traced
    )
    peak_index, above_start, older_freed = _find_peak(events)
    older = still_live + older_freed  # live when the recording began
    live: dict[int, dict] = {}  # addr -> its alloc event, up to the peak
    for event in events[: peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_requested" and live.pop(event["addr"], None) is None:
            older -= event["size"]
    groups: dict[str, int] = {BEFORE: older}
    for event in live.values():  # labels only for what is live at the peak
        label = _label(event.get("frames", []))
        groups[label] = groups.get(label, 0) + event["size"]
    return still_live + older_freed + above_start, sorted(groups.items(), key=lambda item: -item[1])


def memory_at_peak(step, batch: dict, path: str) -> dict:
    """One step under the allocator's history: what is live at the step's peak, grouped by the innermost library
    frame that allocated it (top 25), written to `path`."""
    import torch

    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")  # C++ stacks: not labelled
    try:
        step(batch)
        sync()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, groups = peak_blocks(snapshot)
    lines = [f"peak {peak / 2**30:.2f} GiB allocated during one step; live at the peak:"]
    lines += [f"{size / 2**30:8.3f} GiB  {label}" for label, size in groups[:25]]
    Path(path).write_text("\n".join(lines) + "\n")
    return {"snapshot_peak_gib": peak / 2**30}


def autocast():
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16)
