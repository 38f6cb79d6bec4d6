"""`python -m vlm_tune.evaluate RECIPE.yaml [--checkpoint DIR] [--split NAME] [key=value ...]`: caption / VQA metrics.

Generates a caption for every image of `data.eval` (or, with `data.eval.task: vqa`, an answer to every
question) with the base model or a trained checkpoint (batched, greedy or beam search), scores them against
all references (vlm_tune.metrics, vlm_tune.vqa_metrics) and writes the evaluation folder:
    metrics.json       scores and what was evaluated (model, checkpoint, set, task, decoding)
    predictions.jsonl  one {"image_id", ("question",) "prediction", "references"} per image or question
    summary.md         the metrics table, the settings and the first predictions
    contact_sheet.png  the first images with their (question,) predicted and first reference text
`python -m vlm_tune.evaluate --compare DIR_A DIR_B` puts two evaluation folders side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Optional

from vlm_tune.errors import VlmTuneError
from vlm_tune.recipe import DataConfig, DataSourceConfig, EvalConfig, Recipe, load_recipe

logger = logging.getLogger("vlm_tune.evaluate")

COCO_SPLIT_FILE = re.compile(r"^captions_(?P<split>.+)\.json$")  # captions_val.json, captions_test_novel.json
SPLIT_FIELD_FORMATS = ("karpathy", "hf")  # formats whose `split` field selects the split
FILE_PER_SPLIT_FORMATS = ("llava", "messages")  # <split>.jsonl (or .json) beside the file: --split swaps it
OUTPUT_FILES = ("metrics.json", "predictions.jsonl", "summary.md", "contact_sheet.png")


class EvaluationError(VlmTuneError):
    """An evaluation that cannot run as asked (no evaluation set, no references, unknown split...)."""


# ----------------------------------------------------------------------------------------------
# Generation.
# ----------------------------------------------------------------------------------------------


class _CountingCollate:
    """Wraps a collator so the loop also learns how many items (None ones included) a batch had."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list):
        usable = sum(item is not None for item in items)
        return (self.collator(items) if usable else None), len(items), usable


def _device_and_dtype(model):
    """Where inputs go, and the dtype of floating-point inputs (pixel values)."""
    import torch

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = next((p.dtype for p in params if p.dtype.is_floating_point), torch.float32)
    return device, dtype


def _new_tokens(sequences, prompt_ids):
    """The generated part of `generate`'s output: decoder-only models return prompt + new tokens."""
    if (
        prompt_ids is not None
        and sequences.shape[1] >= prompt_ids.shape[1]
        and bool((sequences[:, : prompt_ids.shape[1]] == prompt_ids.to(sequences.device)).all())
    ):
        return sequences[:, prompt_ids.shape[1] :]
    return sequences  # encoder-decoder models, or generation from embeddings only, return new tokens


def generate_captions(
    model, processor, dataset, data_cfg: DataConfig, eval_cfg: EvalConfig, show_progress: bool = True
) -> list[dict]:
    """Caption every image of `dataset` (the first `eval_cfg.limit` when set), in batches.

    Args:
        model: a VLM (base, PEFT or relevance wrapper) with a `generate` method.
        processor: its processor (the tokenizer decodes the new tokens).
        dataset: items `{"image_id", "image", "captions", ...}` or None for an unreadable image (skipped).
        data_cfg: the `data` section (prompt, image size) for the generation collator.
        eval_cfg: batch size, number of beams, max new tokens, limit.
        show_progress: draw a tqdm progress bar.
    Returns:
        `[{"image_id", "prediction", "references"}]` in dataset order, without skipped images (logged).
    """
    import torch
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from vlm_tune.data.chat_collate import generate_collator_for

    count = len(dataset) if eval_cfg.limit is None else min(eval_cfg.limit, len(dataset))
    loader = DataLoader(
        Subset(dataset, range(count)),
        batch_size=eval_cfg.batch_size,
        shuffle=False,
        num_workers=data_cfg.num_workers,
        collate_fn=_CountingCollate(generate_collator_for(dataset, processor, data_cfg)),
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    device, dtype = _device_and_dtype(model)
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    skipped = 0
    try:
        with (
            tqdm(total=count, desc="generate", unit="img", disable=not show_progress, dynamic_ncols=True) as progress,
            torch.inference_mode(),
        ):
            for collated, n_items, n_usable in loader:
                progress.update(n_items)
                skipped += n_items - n_usable
                if collated is None:
                    continue
                inputs, meta = collated
                skipped += n_usable - len(meta["image_ids"])  # the collator may drop more (e.g. too long)
                for record in meta.get("skipped", []):
                    logger.warning("not captioned: image %s: %s", record.get("image_id"), record.get("reason"))
                inputs = {
                    k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
                    for k, v in inputs.items()
                }
                output = model.generate(
                    **inputs, max_new_tokens=eval_cfg.max_new_tokens, num_beams=eval_cfg.num_beams, do_sample=False
                )
                sequences = getattr(output, "sequences", output)  # [B, prompt + new] or [B, new]
                texts = tokenizer.batch_decode(
                    _new_tokens(sequences, inputs.get("input_ids")), skip_special_tokens=True
                )
                questions = meta.get("questions") or [None] * len(texts)  # conversations: the question asked
                rows += [
                    {
                        "image_id": image_id,
                        **({"question": question} if question is not None else {}),
                        "prediction": " ".join(text.split()),
                        "references": list(references),
                    }
                    for image_id, question, text, references in zip(
                        meta["image_ids"], questions, texts, meta["references"]
                    )
                ]
    finally:
        model.train(was_training)
    if skipped:
        logger.warning("%d image(s) were not captioned (unreadable, or dropped by the collator)", skipped)
    return rows


# ----------------------------------------------------------------------------------------------
# One evaluation run: set, model, outputs.
# ----------------------------------------------------------------------------------------------


def eval_source(recipe: Recipe, split: Optional[str] = None) -> tuple[DataSourceConfig, str]:
    """The evaluation set to use and its split name (for the folder name).

    `split` selects another split: for karpathy/hf sets it replaces `data.eval.split`; for a COCO file
    named `captions_<split>.json` it swaps the file for `captions_<NEW>.json` in the same folder; for llava and
    messages sets, `<split>.jsonl` for `<NEW>.jsonl`.

    Raises:
        EvaluationError: no `data.eval` in the recipe, or the split cannot be selected.
    """
    if recipe.data.eval is None:
        raise EvaluationError(
            "data.eval is not set in the recipe: name the evaluation set, e.g. "
            "data.eval.path=data/shapes/captions_val.json (data.eval.format defaults to coco)"
        )
    source = dataclasses.replace(recipe.data.eval)
    path = Path(source.path)
    coco_match = COCO_SPLIT_FILE.match(path.name) if source.format == "coco" else None
    if split is not None:
        if source.format in SPLIT_FIELD_FORMATS:
            source.split = split
        elif coco_match or source.format in FILE_PER_SPLIT_FORMATS:
            pattern = "captions_{}.json" if coco_match else "{}" + path.suffix
            source.path = str(path.with_name(pattern.format(split)))
            if not Path(source.path).is_file():
                found = sorted(p.name for p in path.parent.glob(pattern.format("*")))
                raise EvaluationError(
                    f"--split {split}: {source.path} not found; {source.format} files in {path.parent}: "
                    f"{', '.join(found) or 'none'}"
                )
        else:
            raise EvaluationError(
                f"--split {split}: cannot select a split of {source.path} (format {source.format}): --split sets "
                f"data.eval.split for karpathy/hf sets and swaps captions_<split>.json for COCO files (<split>.jsonl "
                f"for llava/messages); "
                f"give the file instead with data.eval.path=..."
            )
    name = split or source.split or (coco_match.group("split") if coco_match else path.stem) or "eval"
    return source, re.sub(r"[^\w.+-]", "_", name)


def resolve_eval_checkpoint(recipe: Recipe, checkpoint: Optional[str | Path]) -> Optional[Path]:
    """The checkpoint folder to load: a `checkpoint-N` folder, a run folder (its newest complete
    checkpoint), "latest" (the newest of train.output_dir), or None for the base model.

    Raises:
        EvaluationError: the folder is missing or incomplete (naming it and listing the checkpoints found).
    """
    from vlm_tune.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, resolve_checkpoint

    if checkpoint is None:
        return None
    run_dir = Path(recipe.train.output_dir) if str(checkpoint) == "latest" else Path(checkpoint)
    if str(checkpoint) == "latest" or (run_dir.is_dir() and list_checkpoints(run_dir)):
        found = latest_checkpoint(run_dir)
        if found is None:
            raise EvaluationError(
                f"--checkpoint latest: no complete checkpoint in {run_dir} (train.output_dir); "
                f"train first or give the checkpoint folder"
            )
        logger.info("Using the newest complete checkpoint of %s: %s", run_dir, found)
        return found
    try:
        return resolve_checkpoint(checkpoint)
    except CheckpointError as error:
        raise EvaluationError(str(error)) from None


def default_output_dir(recipe: Recipe, checkpoint: Optional[Path], split_name: str) -> Path:
    """eval.output_dir, else `<checkpoint>/eval-<split>`, else `<train.output_dir>/eval-base-<split>`."""
    if recipe.eval.output_dir:
        return Path(recipe.eval.output_dir)
    if checkpoint is not None:
        return Path(checkpoint) / f"eval-{split_name}"
    return Path(recipe.train.output_dir) / f"eval-base-{split_name}"


def _build_eval_set(source: DataSourceConfig, recipe: Recipe):
    from vlm_tune.data import DataError, build_dataset

    try:
        return build_dataset(source, recipe.data, train=False, seed=recipe.train.seed)
    except DataError as error:
        hint = (
            (
                "\nCaption metrics compare each prediction with the image's reference captions: every evaluated "
                "image needs at least one non-empty caption."
            )
            if "caption" in str(error)
            else ""
        )
        raise EvaluationError(f"evaluation set (data.eval): {error}{hint}") from None


def score_predictions(rows: list[dict], task: str, use_java: Optional[bool]) -> dict[str, float]:
    """Caption metrics (task caption) or exact match / VQA accuracy / ANLS (task vqa) of generated rows."""
    predictions = {r["image_id"]: r["prediction"] for r in rows}
    references = {r["image_id"]: r["references"] for r in rows}
    if task == "vqa":
        from vlm_tune.vqa_metrics import score_answers

        return score_answers(predictions, references)
    from vlm_tune.metrics import score_captions

    return score_captions(predictions, references, use_java=use_java)


def _java_detector(task: str):
    """`java_available` of the caption metrics; VQA scoring needs no Java (nor pycocoevalcap)."""
    if task == "vqa":
        return lambda: False
    from vlm_tune.metrics import java_available

    return java_available


def _on_accelerator(model):
    """The model on the GPU when there is one (16-bit loads stay on the CPU; 4-bit ones are placed at load)."""
    import torch

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if torch.cuda.is_available() and on_cpu and not getattr(model, "is_loaded_in_4bit", False):
        return model.to("cuda")
    return model


def _unique_ids(rows: list[dict]) -> None:
    """Make repeated image ids unique (`id#2`, ...) so no prediction is lost in the id-keyed scoring."""
    seen: dict[str, int] = {}
    for row in rows:
        key = str(row["image_id"])
        seen[key] = seen.get(key, 0) + 1
        row["image_id"] = key if seen[key] == 1 else f"{key}#{seen[key]}"


def write_outputs(output_dir: Path, info: dict, rows: list[dict], dataset=None, sheet_images: int = 16) -> dict:
    """Write metrics.json, predictions.jsonl, summary.md and (with a dataset) contact_sheet.png.

    Returns:
        name -> path of every file written.
    """
    from vlm_tune.report_plots import contact_entries, contact_sheet, summary_markdown

    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics.json": output_dir / "metrics.json",
        "predictions.jsonl": output_dir / "predictions.jsonl",
        "summary.md": output_dir / "summary.md",
    }
    files["metrics.json"].write_text(json.dumps(info, indent=1) + "\n")
    with open(files["predictions.jsonl"], "w", encoding="utf-8") as sink:
        for row in rows:
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    files["summary.md"].write_text(summary_markdown(info, rows))
    if dataset is not None and sheet_images > 0:
        entries = contact_entries(dataset, rows, sheet_images)
        if entries:
            files["contact_sheet.png"] = contact_sheet(entries, output_dir / "contact_sheet.png")
    return files


def evaluate_run(
    recipe: Recipe, checkpoint: Optional[str | Path] = None, split: Optional[str] = None, show_progress: bool = True
) -> dict:
    """Caption (or answer the questions of) `data.eval` with the base model or a checkpoint, score, and write the
    evaluation folder.

    Args:
        recipe: the run's recipe (model, components and relevance must match the checkpoint's run).
        checkpoint: a `checkpoint-N` folder, "latest", or None for the base model.
        split: another split of the evaluation set (see `eval_source`).
        show_progress: draw a progress bar while generating.
    Returns:
        {"metrics", "output_dir", "files", "num_images", "skipped_images"}.
    Raises:
        EvaluationError: no evaluation set, missing checkpoint, unknown split, no reference captions.
    """
    from vlm_tune.checkpoint import load_for_inference

    started = time.perf_counter()
    source, split_name = eval_source(recipe, split)
    checkpoint_dir = resolve_eval_checkpoint(recipe, checkpoint)
    output_dir = default_output_dir(recipe, checkpoint_dir, split_name)
    java_available = _java_detector(source.task)
    if source.task != "vqa" and recipe.eval.use_java and not java_available():
        raise EvaluationError(
            "eval.use_java is true but no working `java` is on PATH: install a Java runtime "
            "(e.g. apt-get install default-jre-headless) or set eval.use_java=null"
        )
    dataset = _build_eval_set(source, recipe)
    attempted = len(dataset) if recipe.eval.limit is None else min(recipe.eval.limit, len(dataset))
    logger.info(
        "Evaluating %s%s on %d of the %d images of %s into %s",
        recipe.model.name_or_path,
        f" + {checkpoint_dir}" if checkpoint_dir else " (base model)",
        attempted,
        len(dataset),
        source.path,
        output_dir,
    )
    model, processor = load_for_inference(recipe, checkpoint_dir)
    model = _on_accelerator(model)
    rows = generate_captions(model, processor, dataset, recipe.data, recipe.eval, show_progress=show_progress)
    if not rows:
        raise EvaluationError(f"no image of {source.path} could be captioned (all unreadable); see the warnings above")
    _unique_ids(rows)
    use_java = java_available() if recipe.eval.use_java is None else recipe.eval.use_java
    metrics = score_predictions(rows, source.task, use_java)
    info = {
        "metrics": metrics,
        "model": recipe.model.name_or_path,
        "checkpoint": str(checkpoint_dir) if checkpoint_dir else None,
        "data": str(source.path),
        "format": source.format,
        "task": source.task,
        "split": split_name,
        "num_images": len(rows),
        "skipped_images": attempted - len(rows),
        "num_beams": recipe.eval.num_beams,
        "max_new_tokens": recipe.eval.max_new_tokens,
        **({} if source.task == "vqa" else {"tokenizer": "Stanford PTB (Java)" if use_java else "Python PTB"}),
        "seconds": round(time.perf_counter() - started, 1),
    }
    files = write_outputs(output_dir, info, rows, dataset, recipe.eval.contact_sheet_images)
    return {
        "metrics": metrics,
        "output_dir": output_dir,
        "files": files,
        "num_images": len(rows),
        "skipped_images": info["skipped_images"],
    }


# ----------------------------------------------------------------------------------------------
# Comparison of two evaluation folders.
# ----------------------------------------------------------------------------------------------


def read_evaluation(folder: str | Path) -> tuple[dict, list[dict]]:
    """metrics.json and predictions.jsonl of an evaluation folder.

    Raises:
        EvaluationError: the folder or its metrics.json is missing or unreadable.
    """
    folder = Path(folder)
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        nearby = sorted(str(p.parent) for p in folder.glob("*/metrics.json")) if folder.is_dir() else []
        hint = (
            f"; evaluation folders inside it: {', '.join(nearby)}"
            if nearby
            else "; give a folder written by `python -m vlm_tune.evaluate` (e.g. RUN/checkpoint-N/eval-val)"
        )
        raise EvaluationError(f"{folder}: no metrics.json here{hint}")
    try:
        info = json.loads(metrics_file.read_text())
        predictions = folder / "predictions.jsonl"
        rows = (
            [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
            if predictions.is_file()
            else []
        )
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{folder}: unreadable evaluation file ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("metrics"), dict):
        raise EvaluationError(f"{metrics_file}: not an evaluation metrics file (no 'metrics' mapping)")
    return info, rows


def compare_evaluations(folder_a: str | Path, folder_b: str | Path, examples: int = 5) -> str:
    """Markdown table of two evaluation folders side by side, with deltas B - A and example predictions."""
    from vlm_tune.report_plots import compare_markdown

    info_a, rows_a = read_evaluation(folder_a)
    info_b, rows_b = read_evaluation(folder_b)
    return compare_markdown(str(folder_a), info_a, rows_a, str(folder_b), info_b, rows_b, examples)


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the process exit code."""
    from vlm_tune.checkpoint import CheckpointError
    from vlm_tune.model.builtin import BuiltinError

    parser = argparse.ArgumentParser(
        prog="python -m vlm_tune.evaluate",
        description=__doc__.splitlines()[0],
        epilog="or: python -m vlm_tune.evaluate --compare DIR_A DIR_B [--out FILE]",
    )
    parser.add_argument("recipe", nargs="?", help="YAML recipe of the run, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as eval.num_beams=3 eval.limit=100")
    parser.add_argument(
        "--checkpoint",
        help="RUN_DIR/checkpoint-N, a run folder or 'latest' for the newest checkpoint (default: the base model)",
    )
    parser.add_argument("--output-dir", help="evaluation folder (same as eval.output_dir=...)")
    parser.add_argument(
        "--split", help="another split of data.eval (karpathy/hf split, captions_<split>.json, <split>.jsonl)"
    )
    parser.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"), help="compare two evaluation folders")
    parser.add_argument("--out", help="with --compare: also write the comparison to this markdown file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.compare:
            if args.recipe or args.overrides:
                parser.error("--compare takes two evaluation folders and no recipe")
            table = compare_evaluations(*args.compare)
            print(table, end="")
            if args.out:
                Path(args.out).write_text(table)
            return 0
        if not args.recipe:
            parser.error("give a recipe (python -m vlm_tune.evaluate RECIPE.yaml) or --compare DIR_A DIR_B")
        recipe = load_recipe(args.recipe, args.overrides)
        if args.output_dir:
            recipe.eval.output_dir = args.output_dir
        result = evaluate_run(recipe, args.checkpoint, args.split, show_progress=not args.no_progress)
    except (VlmTuneError, CheckpointError, BuiltinError) as error:  # input problems: a message, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(f"{name:8s} {value:.4f}" for name, value in result["metrics"].items()))
    print(f"Wrote {', '.join(result['files'])} to {result['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
