"""Trained-looking runs of the tiny VLMs for the deployment tests: a run folder with its recipe, component table and
one checkpoint whose every trained weight is non-zero and away from its initial value (as after training)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from tiny import tiny_vlm_folder

from vlm_tune.checkpoint import save_checkpoint
from vlm_tune.data.collate import GenerateCollator
from vlm_tune.data.images import load_rgb
from vlm_tune.model.build import build_model, load_for_inference
from vlm_tune.recipe import Recipe, dump_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]
IMAGES = [ROOT / "data" / "shapes" / "images" / f"test_0000{i}.png" for i in range(3)]

_LORA = {"mode": "lora", "rank": 4, "alpha": 8}
# arch -> a component policy covering what a merge must handle: LoRA on the vision tower and a full projector (llava),
# DoRA (qwen2_5_vl), rsLoRA with LoRA on the cross-attention (mllama).
POLICIES: dict[str, dict] = {
    "llava": {"vision": _LORA, "projector": {"mode": "full"}, "language": _LORA},
    "qwen2_5_vl": {
        "vision": {**_LORA, "variant": "dora"},
        "projector": {"mode": "full"},
        "language": {**_LORA, "variant": "dora"},
    },
    "mllama": {
        "vision": {**_LORA, "variant": "rslora"},
        "cross_attention": {**_LORA, "variant": "rslora"},
        "language": {**_LORA, "variant": "rslora"},
    },
}
LANGUAGE_ONLY = {"language": _LORA}


def tiny_folder(arch: str, root: Path) -> Path:
    """The tiny model folder of `arch` under `root` (made once per root)."""
    folder = root / "models" / arch
    return folder if (folder / "config.json").is_file() else tiny_vlm_folder(arch, root / "models")


def perturb_trained(model: torch.nn.Module, seed: int) -> None:
    """Move every trained weight away from its initial value (LoRA B starts at zero, full parts at the base's)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator).to(param.dtype)
                param.add_(noise * (0.2 if "lora_B" in name else 0.05))


def make_run(
    arch: str,
    root: Path,
    name: str = "run",
    components: Optional[dict] = None,
    dtype: str = "float32",
    seed: int = 1,
    **sections,
) -> tuple[Path, Recipe]:
    """A run folder `root/name` (recipe.yaml, components.txt, checkpoint-2) of the tiny `arch`.

    Args:
        components: the policy (default POLICIES[arch]). dtype: model.dtype. seed: of the trained weights.
        sections: more recipe sections or model keys, e.g. relevance={...}, quantization={...}.
    """
    run_dir = root / name
    model = {"name_or_path": str(tiny_folder(arch, root)), "dtype": dtype}
    if "quantization" in sections:
        model["quantization"] = sections.pop("quantization")
    raw = {
        "model": model,
        "components": components or POLICIES[arch],
        "data": {"prompt": "Describe the image.", "max_length": 256},
        "train": {"output_dir": str(run_dir), "mixed_precision": "no", "seed": seed},
        "eval": {"max_new_tokens": 6, "batch_size": 2},
        **sections,
    }
    recipe = recipe_from_dict(raw)
    built = build_model(recipe, training=True)
    perturb_trained(built.model, seed)
    run_dir.mkdir(parents=True)
    dump_recipe(recipe, run_dir / "recipe.yaml")
    (run_dir / "components.txt").write_text(built.report.table() + "\n")
    save_checkpoint(run_dir, 2, built.model, {"epoch": 0, "batches_done": 2})
    return run_dir, recipe


def prompt_inputs(processor, recipe: Recipe, count: int = 2, dtype: torch.dtype = torch.float32) -> dict:
    """vlm_tune's generation inputs (left-padded prompts) for the first `count` shipped test images."""
    items = [{"image_id": i, "image": load_rgb(path), "captions": ["x"]} for i, path in enumerate(IMAGES[:count])]
    inputs, _ = GenerateCollator(processor, recipe.data)(items)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Float32 logits of the prompts ([B, T, V])."""
    with torch.no_grad():
        return model(**inputs).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def with_dtype(recipe: Recipe, dtype: str) -> Recipe:
    """The recipe with another model.dtype."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype=dtype))


BF16_FACTOR = 3  # merged bfloat16 logits stay within 3x the adapter model's own bfloat16 rounding (vs float32)


def bf16_noise(recipe: Recipe, checkpoint: Path, inputs: dict, expected16: torch.Tensor) -> float:
    """How far the adapter model's own bfloat16 logits are from its float32 ones: the bfloat16 tolerance."""
    model32, _ = load_for_inference(with_dtype(recipe, "float32"), checkpoint)
    inputs32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    return max_diff(logits(model32, inputs32), expected16)


# A fresh interpreter that refuses to import vlm_tune runs the shipped script, as a user without vlm_tune would.
_PLAIN = """
import importlib.abc, json, runpy, sys

class NoVlmTune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "vlm_tune":
            raise ImportError("this process must not import vlm_tune")

sys.meta_path.insert(0, NoVlmTune())
script = runpy.run_path(sys.argv[1])
folders, images = json.loads(sys.argv[2]), json.loads(sys.argv[3])
tokens = {name: script["caption"](folder, images, "Describe the image.", 6)[0] for name, folder in folders.items()}
print(json.dumps(tokens))
"""


def plain_transformers_tokens(folders: dict[str, Path], images: list[Path]) -> dict[str, list[list[int]]]:
    """name -> greedy new tokens (6) per image of each merged folder, from scripts/plain_transformers_caption.py
    in a fresh interpreter without vlm_tune on its path (and an import of it refused)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    arguments = [
        json.dumps({name: str(folder) for name, folder in folders.items()}),
        json.dumps([str(p) for p in images]),
    ]
    result = subprocess.run(
        [sys.executable, "-c", _PLAIN, str(ROOT / "scripts" / "plain_transformers_caption.py"), *arguments],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
        cwd="/",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def greedy_tokens(model: torch.nn.Module, inputs: dict, max_new_tokens: int = 6) -> list[list[int]]:
    """vlm_tune's greedy new tokens for the inputs."""
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[:, inputs["input_ids"].shape[1] :].tolist()
