"""Peak memory (RSS) of `python -m vlm_tune.export RUN --out DIR --merge` on a SmolVLM-Instruct-sized model.

    python benchmarks/merge_peak_rss.py WORKDIR [--size 2b|256m]

Builds, once, a random-weight Idefics3 model of SmolVLM-Instruct's shape (SigLIP so400m vision tower, SmolLM2-1.7B
decoder: 2.25B parameters, 4.5 GB in bfloat16; `--size 256m` for SmolVLM-256M's shape) with a processor, then a run
with one checkpoint of recipes/smolvlm_2b.yaml's components (LoRA r8 on the vision attention, r16 on the decoder,
projector full; every LoRA B random, as after training). Then it merges that checkpoint in a child process and
prints the child's peak RSS (VmHWM), the peaks of its anonymous and file-backed parts (sampled every 0.1 s from
/proc), the model's bfloat16 size and its largest tensor. Memory does not depend on
how busy the CPU is; the time printed does.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # (vision: hidden, layers, intermediate, heads, image, patch), (text: hidden, layers, intermediate, heads)
    "2b": ((1152, 27, 4304, 16, 384, 14), (2048, 24, 8192, 32)),
    "256m": ((768, 12, 3072, 12, 512, 16), (576, 30, 1536, 9)),
}


def _build_model(folder: Path, size: str) -> None:
    """A random SmolVLM-shaped Idefics3 model and a small Idefics3 processor (the merge only copies the latter)."""
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_processor

    (v_hidden, v_layers, v_inter, v_heads, image, patch), (t_hidden, t_layers, t_inter, t_heads) = SIZES[size]
    vision = tf.Idefics3VisionConfig(
        hidden_size=v_hidden,
        num_hidden_layers=v_layers,
        intermediate_size=v_inter,
        num_attention_heads=v_heads,
        image_size=image,
        patch_size=patch,
    )
    text = tf.LlamaConfig(
        vocab_size=49155,
        hidden_size=t_hidden,
        num_hidden_layers=t_layers,
        intermediate_size=t_inter,
        num_attention_heads=t_heads,
        num_key_value_heads=t_heads,
    )
    processor = tiny_processor("idefics3")
    config = tf.Idefics3Config(vision_config=vision, text_config=text, image_token_id=processor.image_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = tf.Idefics3ForConditionalGeneration(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _build_run(model_dir: Path, run_dir: Path) -> None:
    """A run folder with recipes/smolvlm_2b.yaml's components and one checkpoint whose LoRA B are random."""
    import torch

    from vlm_tune.checkpoint import save_checkpoint
    from vlm_tune.model.build import build_model
    from vlm_tune.recipe import dump_recipe, load_recipe

    recipe = load_recipe(
        ROOT / "recipes" / "smolvlm_2b.yaml",
        [f"model.name_or_path={model_dir}", f"train.output_dir={run_dir}", "train.mixed_precision='no'"],
    )
    built = build_model(recipe, training=True)
    with torch.no_grad():
        for name, param in built.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    run_dir.mkdir(parents=True)
    dump_recipe(recipe, run_dir / "recipe.yaml")
    save_checkpoint(run_dir, 1, built.model, {"epoch": 0, "batches_done": 1})


def _setup_step(code: str) -> None:
    """Run one setup step in its own process, so its memory is gone before the measurement."""
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def _sample_memory(child: subprocess.Popen, every: float = 0.1) -> dict[str, int]:
    """Peak bytes of the child's resident memory (VmHWM), its anonymous part (the process's own: weights, copies)
    and its file-backed part (mapped safetensors files: page cache the kernel can drop), sampled until it exits."""
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    while child.poll() is None:
        try:
            lines = Path(f"/proc/{child.pid}/status").read_text().splitlines()
        except OSError:
            break
        for line in lines:
            key, _, value = line.partition(":")
            if key in peaks:
                peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
        time.sleep(every)
    child.wait()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--size", choices=SIZES, default="2b")
    args = parser.parse_args()
    model_dir, run_dir, out = (args.workdir / f"{name}-{args.size}" for name in ("model", "run", "merged"))
    here = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import merge_peak_rss as m; "
    here += "from pathlib import Path; "
    if not (model_dir / "config.json").is_file():
        _setup_step(here + f"m._build_model(Path({str(model_dir)!r}), {args.size!r})")
    if not run_dir.is_dir():
        _setup_step(here + f"m._build_run(Path({str(model_dir)!r}), Path({str(run_dir)!r}))")

    command = [sys.executable, "-m", "vlm_tune.export", str(run_dir), "--out", str(out), "--merge", "--overwrite"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env)
    peaks = _sample_memory(child)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        sys.exit(f"the export failed (exit code {child.returncode})")
    shapes = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as weights:
            shapes.update({key: weights.get_slice(key).get_shape() for key in weights.keys()})
    numel = {key: math.prod(shape) for key, shape in shapes.items()}
    model_bytes = 2 * sum(numel.values())
    largest = max(numel, key=numel.get)
    print(
        json.dumps(
            {
                "model": f"Idefics3 {args.size} (random weights), {sum(numel.values()) / 1e9:.2f}B parameters",
                "bf16_model_GiB": round(model_bytes / 2**30, 2),
                "largest_tensor": f"{largest} ({2 * numel[largest] / 2**20:.0f} MiB)",
                "peak_rss_GiB": round(peaks["VmHWM"] / 2**30, 2),
                "peak_anonymous_GiB": round(peaks["RssAnon"] / 2**30, 2),
                "anonymous_over_model_GiB": round((peaks["RssAnon"] - model_bytes) / 2**30, 2),
                "peak_file_backed_GiB": round(peaks["RssFile"] / 2**30, 2),
                "seconds": round(seconds, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
