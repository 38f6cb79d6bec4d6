"""The model card (`README.md`) of an exported folder: base model, what trained, the data, the newest metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from vlm_tune.recipe import Recipe


def newest_evaluation(checkpoint: Path) -> Optional[tuple[Path, dict]]:
    """The newest evaluation of this checkpoint (its metrics.json folder and contents), or None.

    Looks in the checkpoint folder and in its run folder (`evaluate --output-dir RUN/eval-x`), keeping the
    evaluations whose metrics.json names this checkpoint.
    """
    found = []
    for metrics_file in [*checkpoint.glob("*/metrics.json"), *checkpoint.parent.glob("*/metrics.json")]:
        try:
            info = json.loads(metrics_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        evaluated = info.get("checkpoint") if isinstance(info, dict) else None
        if evaluated and Path(evaluated).resolve() == checkpoint.resolve() and isinstance(info.get("metrics"), dict):
            found.append((metrics_file.stat().st_mtime, metrics_file.parent, info))
    if not found:
        return None
    _, folder, info = max(found, key=lambda entry: entry[0])
    return folder, info


def _front_matter(recipe: Recipe, merged: bool) -> str:
    base = recipe.model.name_or_path
    lines = ["---", f"library_name: {'transformers' if merged else 'peft'}", "pipeline_tag: image-text-to-text"]
    if not base.startswith(("vlm_tune:", "/", ".", "~")):  # a hub id
        lines += [f"base_model: {base}", f"base_model_relation: {'finetune' if merged else 'adapter'}"]
    lines += ["tags:", "  - vlm_tune", "  - lora" if not merged else "  - merged-lora", "---", ""]
    return "\n".join(lines)


def _data_lines(recipe: Recipe, step: Optional[int]) -> list[str]:
    train = recipe.data.train
    where = "not recorded in the recipe"
    if train is not None:
        where = f"`{train.path}` ({train.format}" + (f", split {train.split}" if train.split else "")
        where += f", first {train.limit} images)" if train.limit else ")"
    cfg = recipe.train
    steps = f"{step} optimizer steps" if step is not None else "unknown steps"
    return [
        f"- training set: {where}",
        f"- {steps} of {cfg.batch_size} x {cfg.grad_accum} samples, lr {cfg.lr}, {cfg.schedule} schedule, "
        f"seed {cfg.seed}, mixed precision {cfg.mixed_precision}",
        f"- prompt: {recipe.data.prompt!r}",
    ]


def _metric_lines(evaluation: Optional[tuple[Path, dict]]) -> list[str]:
    if evaluation is None:
        return [
            "No evaluation of this checkpoint was found (run `python -m vlm_tune.evaluate RECIPE --checkpoint ...`)."
        ]
    folder, info = evaluation
    lines = [
        f"From `{folder}`: {info.get('num_images', '?')} images of `{info.get('data', '?')}` "
        f"(split {info.get('split', '?')}), {info.get('num_beams', 1)} beam(s), {info.get('tokenizer', '')} tokenizer.",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    return lines + [f"| {name} | {value:.4f} |" for name, value in info["metrics"].items()]


def _usage_lines(merged: bool, has_relevance: bool, has_trained: bool) -> list[str]:
    if merged:
        lines = [
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            'model = AutoModelForImageTextToText.from_pretrained("THIS_FOLDER")',
            'processor = AutoProcessor.from_pretrained("THIS_FOLDER")',
            "```",
            "or `python -m vlm_tune.generate --model THIS_FOLDER --image a.jpg`.",
        ]
        if has_relevance:
            lines.append(
                "`relevance/` holds the relevance modules: plain transformers ignores them and reads every visual "
                "token; `python -m vlm_tune.generate --model THIS_FOLDER` applies them."
            )
        return lines
    lines = [
        "```python",
        "from peft import PeftModel",
        'model = PeftModel.from_pretrained(base_model, "THIS_FOLDER/adapter")',
        "```",
        "or `python -m vlm_tune.generate --model THIS_FOLDER --image a.jpg` (add `model.quantization.bits=4` to "
        "load the base in 4 bit).",
    ]
    if has_trained:
        lines.append(
            "`trained.safetensors` holds fully trained parameters outside the adapter (keys as in the PeftModel): "
            '`model.load_state_dict(safetensors.torch.load_file("THIS_FOLDER/trained.safetensors"), strict=False)`.'
        )
    if has_relevance:
        lines.append("`relevance.safetensors` holds the relevance modules, which vlm_tune applies.")
    return lines


def model_card(
    recipe: Recipe,
    checkpoint: Path,
    step: Optional[int],
    merged: bool,
    components_table: Optional[str],
    files: set[str],
) -> str:
    """The README.md of an export.

    Args:
        recipe: the run's recipe. checkpoint: the exported checkpoint. step: its optimizer step.
        merged: a merged export (else an adapter export). components_table: the run's component report.
        files: names of the files written beside the card (to tell which extra parts the export has).
    """
    kind = "merged into its base weights" if merged else "a LoRA adapter"
    lines = [
        _front_matter(recipe, merged),
        f"# Fine-tuned {recipe.model.name_or_path} ({kind})",
        "",
        f"Exported by vlm_tune from `{checkpoint}`.",
        "",
        f"- base model: `{recipe.model.name_or_path}`"
        + (", trained on its 4-bit weights" if recipe.model.quantization else ""),
        "",
        "## What trained",
        "",
        "```",
        (components_table or "not recorded (no components.txt in the run folder)").rstrip(),
        "```",
        "",
        "## Training data",
        "",
        *_data_lines(recipe, step),
        "",
        "## Evaluation",
        "",
        *_metric_lines(newest_evaluation(checkpoint)),
        "",
        "## Use",
        "",
        *_usage_lines(merged, bool({"relevance", "relevance.safetensors"} & files), "trained.safetensors" in files),
        "",
    ]
    return "\n".join(lines)
