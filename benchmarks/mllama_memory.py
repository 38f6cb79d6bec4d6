"""Where mllama (Llama-3.2-11B-Vision) bf16 LoRA's training memory goes, measured on a CPU.

`python benchmarks/mllama_memory.py [--vision-states model|needed] [--root /tmp/mllama_memory]`

The model is the GPU benchmark's 11B config (benchmarks/gpu_models.py) with every width kept and fewer layers:
text 5 (one cross-attention layer, index 3), vision 6 local (layers 1 and 3 collected as the 5 intermediate
features, so the projector keeps its width) and 2 global; random bf16 weights. It is built by vlm_tune's own
path (build_model: LoRA r16 on the language attention + MLP and the cross-attention, vision frozen,
checkpointing, the default speed levers) and trained on the GPU benchmark's synthetic batch (batch 4, one
448 px tile + 3 padding tiles, 1032 vision tokens per tile, 172 text tokens per sample).

CUDA autocast computes some ops in fp32 that CPU autocast keeps in bf16 (layer_norm, softmax, ...): the
script registers CPU autocast kernels with CUDA's fp32 policy for those ops, so tensor dtypes are the GPU's.

What it measures, with a TorchDispatchMode that follows every tensor storage created by an op (weakrefs on
the storages): bytes alive at the peak of each part of one training step (the optimizer's states already made),
grouped by where each was allocated, and the per-layer items scaled to the real depth (40 text layers, 8 of
them cross-attention; vision 32 local + 8 global). Allocator rounding and CUDA kernels' workspaces are not
counted. Runs in about 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import re
import sys
import time
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch._C import DispatchKey, DispatchKeySet, _ExcludeDispatchKeyGuard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

GIB = 2**30
TEXT_LAYERS, CROSS_LAYERS, LOCAL_LAYERS, GLOBAL_LAYERS = 5, [3], 6, 2  # the reduced depth
COLLECTED = [1, 1, 3, 3, 3]  # the reduced tower's intermediate layers (5 as the real [3, 7, 15, 23, 30]: same width)
# layers per kind at full depth and in the reduced model; "last": the encoder's output, "collected": an
# intermediate feature the vision model reads, "other": the rest
FULL = {"text.self": 32, "text.cross": 8, "vision.local.collected": 5, "vision.local.last": 1}
FULL.update({"vision.local.other": 26, "vision.global.last": 1, "vision.global.other": 7})
REDUCED = {"text.self": 4, "text.cross": 1, "vision.local.collected": 2, "vision.local.last": 1}
REDUCED.update({"vision.local.other": 3, "vision.global.last": 1, "vision.global.other": 1})
# CUDA autocast's fp32 ops that CPU autocast leaves alone (the ones mllama training reaches)
CUDA_FP32_OPS = ("layer_norm", "group_norm", "softmax.int", "log_softmax.int", "rsqrt", "pow.Tensor_Scalar", "exp")


@contextlib.contextmanager
def cuda_autocast_policy():
    """CPU autocast computes CUDA_FP32_OPS in fp32 from 16-bit inputs, as CUDA autocast does."""
    library = torch.library.Library("aten", "IMPL")

    def fp32_kernel(op):
        def kernel(*args, **kwargs):
            def up(x):
                return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x

            with _ExcludeDispatchKeyGuard(DispatchKeySet(DispatchKey.AutocastCPU)):
                return op(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})

        return kernel

    for name in CUDA_FP32_OPS:
        packet, _, overload = name.partition(".")
        library.impl(name, fp32_kernel(getattr(getattr(torch.ops.aten, packet), overload or "default")), "AutocastCPU")
    try:
        yield
    finally:
        library._destroy()


def layer_kind(path: str) -> str:
    """A module path's layer kind (the unit that scales with depth), or the path's first parts."""
    match = re.search(r"(transformer|global_transformer)\.layers\.(\d+)", path)
    if match:
        index, local = int(match.group(2)), match.group(1) == "transformer"
        if index == (LOCAL_LAYERS if local else GLOBAL_LAYERS) - 1:
            role = "last"
        else:
            role = "collected" if local and index in COLLECTED else "other"
        return f"vision.{'local' if local else 'global'}.{role}"
    match = re.search(r"language_model\.layers\.(\d+)", path)
    if match:
        return "text.cross" if int(match.group(1)) in CROSS_LAYERS else "text.self"
    parts = [p for p in path.split(".") if p not in ("base_model", "model", "default")]
    return ".".join(parts[:2])


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops create, alive now; the peak of each section with what was alive at it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.live: dict[int, tuple[int, str, weakref.ref]] = {}
        self.total = 0
        self.phase = "forward"
        self.section = "setup"
        self.peaks: dict[str, tuple[int, dict]] = {}
        self.hooks = [
            torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
            torch.nn.modules.module.register_module_forward_hook(self._leave, always_call=True),
        ]

    def _enter(self, module, args):
        if id(module) in self.names:
            self.stack.append(self.names[id(module)])

    def _leave(self, module, args, output):
        if id(module) in self.names and self.stack:
            self.stack.pop()

    def label(self, func) -> tuple[str, str, str]:
        """(phase, module path, op) of an allocation: backward outside a recompute names its autograd node."""
        where = self.stack[-1] if self.stack else ""
        op = func.overloadpacket.__name__
        if self.phase == "backward" and not where:
            node = torch._C._current_autograd_node()
            return "backward", "", node.name() if node else op
        return ("recompute" if self.phase == "backward" else self.phase), where, op

    def relabel(self, tensor: torch.Tensor, label: tuple[str, str, str]) -> None:
        entry = self.live.get(tensor.untyped_storage()._cdata)
        if entry is not None:
            self.live[tensor.untyped_storage()._cdata] = (entry[0], label, entry[2])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:  # views and in-place results share an input's storage: not new
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in inputs:
                self._track(tensor.untyped_storage(), func)
        return out

    def _track(self, storage, func) -> None:
        key = storage._cdata
        if key in self.live or storage.nbytes() == 0:
            return
        size = storage.nbytes()
        self.live[key] = (size, self.label(func), weakref.ref(storage, lambda _, k=key: self._free(k)))
        self.total += size
        peak = self.peaks.get(self.section)
        if peak is None or self.total > peak[0]:
            self.peaks[self.section] = (self.total, self.snapshot())

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.total -= entry[0]

    def snapshot(self) -> dict[tuple, int]:
        groups: dict[tuple, int] = defaultdict(int)
        for size, label, _ in self.live.values():
            groups[label] += size
        return dict(groups)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


class SavedBytes:
    """Unique storages saved for backward outside checkpointed regions, per module that saved them."""

    def __init__(self, tracker: LiveBytes):
        self.tracker, self.seen, self.by_module = tracker, set(), defaultdict(int)

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if not isinstance(tensor, torch.nn.Parameter) and storage._cdata not in self.seen:
            self.seen.add(storage._cdata)
            where = self.tracker.stack[-1] if self.tracker.stack else "top"
            self.by_module[f"{where} {tuple(tensor.shape)} {str(tensor.dtype)[6:]}"] += storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


# --- the model and the step -----------------------------------------------------------------------------


def reduced_config():
    from gpu_models import _mllama_config

    config = _mllama_config()
    config.text_config.num_hidden_layers = TEXT_LAYERS
    config.text_config.cross_attention_layers = CROSS_LAYERS
    config.vision_config.num_hidden_layers = LOCAL_LAYERS
    config.vision_config.num_global_layers = GLOBAL_LAYERS
    config.vision_config.intermediate_layers_indices = COLLECTED
    return config


def model_folder(root: Path) -> Path:
    """The reduced model's folder (random bf16 weights, the real processor), written once."""
    import transformers as tf
    from gpu_models import _processor

    folder = root / "mllama-reduced"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(reduced_config(), dtype=torch.bfloat16)
    with torch.no_grad():  # gates open, as in a trained model (benchmarks/gpu_models.py build_folder)
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    model.save_pretrained(folder)
    _processor("mllama").save_pretrained(folder)
    return folder


def build(folder: Path, speed: dict):
    from gpu_runs import make_batches, recipe_dict

    from vlm_tune.model.build import build_model
    from vlm_tune.model.speed import build_optimizer
    from vlm_tune.recipe import recipe_from_dict

    spec = {"model": "mllama", "setting": "bf16", "folder": str(folder), "batch_size": 4, "checkpointing": True}
    spec.update(workload="synthetic", steps={"warmup": 1, "windows": 0, "per_window": 0})
    raw = recipe_dict(spec, speed)
    raw["train"]["mixed_precision"] = "bf16"
    recipe = recipe_from_dict(raw)
    built = build_model(recipe, training=True)
    built.model.train()
    batch = make_batches(spec, built.processor, recipe, 1)[0]
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    optimizer = build_optimizer(built.groups, recipe.speed, 1e-4)
    return built.model, batch, optimizer


def first_states(model, optimizer) -> None:
    """The optimizer's states as its first step makes them (zero gradients, so the weights do not move)."""
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(model, batch, optimizer) -> tuple[LiveBytes, SavedBytes, float]:
    """One training step under the trackers; returns them and the loss."""
    tracker = LiveBytes(model)
    saved = SavedBytes(tracker)
    inner = model.get_base_model().model
    marks = [
        inner.vision_model.register_forward_pre_hook(lambda *_: setattr(tracker, "section", "vision forward")),
        inner.language_model.register_forward_pre_hook(lambda *_: setattr(tracker, "section", "text forward, loss")),
    ]
    for param in model.parameters():
        if param.requires_grad:
            marks.append(param.register_post_accumulate_grad_hook(lambda p: tracker.relabel(p.grad, GRAD)))
    try:
        with cuda_autocast_policy(), tracker:
            tracker.phase = "state"
            first_states(model, optimizer)
            tracker.section, tracker.phase = "forward: embeddings, masks", "forward"
            with torch.autocast("cpu", dtype=torch.bfloat16), saved.hooks():
                loss = model(**batch).loss
            tracker.section, tracker.phase = "backward", "backward"
            loss.backward()
            tracker.section, tracker.phase = "optimizer step", "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        tracker.close()
        for mark in marks:
            mark.remove()
    return tracker, saved, float(loss.detach())


# --- the report -------------------------------------------------------------------------------------------

GRAD = ("grad", "", "")


def lora_scale(model) -> float:
    """Trained parameters at full depth over those of the reduced model (per text layer kind)."""
    counts: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[layer_kind(name)] += param.numel()
    full = sum(n * (FULL[k] / REDUCED[k] if k in FULL else 1.0) for k, n in counts.items())
    return full / sum(counts.values())


def item(label: tuple[str, str, str], lora: float) -> tuple[str, float]:
    """An allocation's row in the table and its factor to full depth."""
    phase, path, op = label
    if phase == "state":
        return "AdamW states of the LoRA weights (fp32)", lora
    if phase == "grad":
        return "LoRA gradients (fp32)", lora
    kind = layer_kind(path)
    if phase == "forward" and kind in FULL:  # one per layer, alive together
        return f"{kind} layers' outputs, saved inputs ({op})", FULL[kind] / REDUCED[kind]
    if phase == "backward":
        return f"backward {op}", 1.0
    return f"{phase} {kind or 'loss (outside modules)'} ({op})", 1.0


def report(model, tracker: LiveBytes, saved: SavedBytes, loss: float) -> list[str]:
    lora = lora_scale(model)
    lines = [f"loss {loss:.4f}; GiB allocated above the loaded weights (optimizer states included)"]
    lines.append(f"{'section':28s} {'peak (reduced)':>15s} {'peak at full depth':>19s}")
    details = []
    for section, (peak, groups) in tracker.peaks.items():
        if section == "setup":  # the optimizer's first states, made before the step
            continue
        full: dict[str, float] = defaultdict(float)
        for label, size in groups.items():
            name, factor = item(label, lora)
            full[name] += size * factor
        lines.append(f"{section:28s} {peak / GIB:15.3f} {sum(full.values()) / GIB:19.3f}")
        details.append(f"alive at the {section} peak, at full depth:")
        top = sorted(full.items(), key=lambda pair: -pair[1])[:14]
        details += [f"  {size / GIB:8.3f} GiB  {name}" for name, size in top if size >= 2**20]
    kept: dict[str, float] = defaultdict(float)
    for label, size in saved.by_module.items():
        where, _, what = label.partition(" ")
        kind = layer_kind(where)
        kept[f"{kind} {what}"] += size * (FULL[kind] / REDUCED[kind] if kind in FULL else 1.0)
    details.append("saved for backward outside checkpointed regions (unique storages), at full depth:")
    top = sorted(kept.items(), key=lambda pair: -pair[1])[:12]
    details += [f"  {size / GIB:8.3f} GiB  {name}" for name, size in top if size >= 2**20]
    return lines + details


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mllama_memory")
    parser.add_argument("--vision-states", choices=["model", "needed"], default="needed")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    folder = model_folder(Path(args.root))
    model, batch, optimizer = build(folder, {"vision_states": args.vision_states})
    tracker, saved, loss = measure(model, batch, optimizer)
    print("\n".join(report(model, tracker, saved, loss)))
    print(f"({time.time() - start:.0f} s)")
    del model, optimizer
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
