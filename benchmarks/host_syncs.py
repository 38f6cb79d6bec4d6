"""Where a training step makes the host wait for the GPU: every operation that reads a device tensor's values on
the host, found on a CPU with a tiny model of the benchmark's families.

    python benchmarks/host_syncs.py --model mllama [--setting bf16] [--root /tmp/vlm_tune_bench]

On a GPU each such operation (`.item()`, `bool(tensor)`, `nonzero`, indexing with a boolean mask) waits until
every kernel launched before it has run. One that comes after the frozen vision tower's launch makes the host
wait for the whole tower instead of launching the text layers meanwhile. The step is vlm_tune's model path with
the benchmark's defaults (benchmarks/gpu_runs.py); the table gives each synchronising operation, the innermost
library frame that called it, and the phase of the step it fell in.

torch has no CPU-side record of synchronisations (`torch.cuda.set_sync_debug_mode` needs a GPU), hence this
dispatch-mode recorder.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

SYNCING = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2"}
LIBRARIES = ("vlm_tune/", "transformers/", "peft/", "bitsandbytes/")
PHASES = ("before the vision tower", "in the vision tower", "after the vision tower", "backward", "optimizer step")


def _caller() -> str:
    """The innermost frame in vlm_tune, transformers, peft or bitsandbytes code, as 'path:line function'."""
    for frame in reversed(traceback.extract_stack()):
        if any(part in frame.filename for part in LIBRARIES) and "benchmarks/" not in frame.filename:
            short = frame.filename.split("site-packages/")[-1].split(str(ROOT) + "/")[-1]
            return f"{short}:{frame.lineno} {frame.name}"
    return "no library frame"


def _syncs(func, args) -> bool:
    name = func._overloadpacket.__name__
    if name in SYNCING:
        return True
    if name in ("index", "index_put", "index_put_"):  # a boolean mask index is a nonzero on the device
        import torch

        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])
    return False


def record_syncs(step, batch: dict, vision: list) -> list[dict]:
    """Run `step(batch)` once and return each synchronising operation: {'op', 'caller', 'phase'}.

    Args:
        step: one training step `step(batch, mark)`: it calls `mark(3)` before its backward and `mark(4)` before
            its optimizer step.
        vision: the vision tower's root modules; their forward hooks mark the phases.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    state = {"phase": 0}
    found: list[dict] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _syncs(func, args):
                found.append({"op": func._overloadpacket.__name__, "caller": _caller(), "phase": state["phase"]})
            return func(*args, **(kwargs or {}))

    def enter(*_):
        state["phase"] = max(state["phase"], 1)

    def leave(*_):
        state["phase"] = max(state["phase"], 2)

    hooks = [h for m in vision for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with Recorder():
            step(batch, lambda phase: state.update(phase=phase))
    finally:
        for hook in hooks:
            hook.remove()
    return [{**row, "phase": PHASES[row["phase"]]} for row in found]


def tiny_step(model_name: str, setting: str, root: Path, speed: dict | None = None):
    """(step, batch, vision roots) of the benchmark's vlm_tune model path on a tiny model: every default on, and
    the `speed` section's keys given."""
    from gpu_measure import autocast
    from gpu_models import build_folder, picture, synthetic_items
    from gpu_runs import recipe_dict

    from vlm_tune.data import TrainCollator
    from vlm_tune.model.build import build_model
    from vlm_tune.model.speed import build_optimizer
    from vlm_tune.recipe import recipe_from_dict

    spec = {"model": model_name, "setting": setting, "batch_size": 2, "workload": "synthetic", "tiny": True}
    spec.update(folder=str(build_folder(model_name, root, tiny=True)), checkpointing=True)
    recipe = recipe_from_dict(recipe_dict(spec, speed))
    built = build_model(recipe, training=True)
    model = built.model.train()
    items = synthetic_items(model_name, 2, tiny=True)
    for index, item in enumerate(items):  # square: the tiny mllama's 2 tiles are 1 real and 1 padding, as at full size
        item["image"] = picture(32, 32, index)
    batch = TrainCollator(built.processor, recipe.data)(items)
    batch.pop("skipped")
    optimizer = build_optimizer(built.groups, recipe.speed, 1e-4)
    base = model.get_base_model()
    vision = [base.get_submodule(name) for name in built.components.modules["vision"]]

    def step(batch, mark):
        with autocast():
            loss = model(**batch).loss
        mark(3)
        loss.backward()
        mark(4)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batch, vision


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mllama", help="mllama, qwen2_5_vl or idefics3")
    parser.add_argument("--setting", default="bf16", help="bf16 or qlora")
    parser.add_argument("--root", type=Path, default=Path("/tmp/vlm_tune_bench"), help="the tiny model folders")
    parser.add_argument("--speed", nargs="*", default=[], help="speed keys, e.g. padding_read=model")
    args = parser.parse_args(argv)
    speed = dict(item.split("=", 1) for item in args.speed)
    step, batch, vision = tiny_step(args.model, args.setting, args.root, speed)
    rows = record_syncs(step, batch, vision)
    print(f"{len(rows)} host synchronisations in one {args.model} {args.setting} training step (tiny model)\n")
    print("| phase | operation | called from |\n|---|---|---|")
    for row in rows:
        print(f"| {row['phase']} | {row['op']} | {row['caller']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
