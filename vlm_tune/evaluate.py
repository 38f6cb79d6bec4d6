"""`python -m vlm_tune.evaluate [RECIPE.yaml] [--checkpoint RUN] [--split NAME] [key=value ...]`: caption / VQA metrics.

Generates a caption for every image of `data.eval` (or, with `data.eval.task: vqa`, an answer to every
question) with the base model or a trained checkpoint (batched, greedy or beam search), scores them against
all references (vlm_tune.metrics, vlm_tune.vqa_metrics) and writes the evaluation folder:
    metrics.json       scores and what was evaluated (model, checkpoint, set, task, decoding)
    predictions.jsonl  one {"image_id", ("question",) "prediction", "references"} per image or question
    summary.md         the metrics table, the settings and the first predictions
    contact_sheet.png  the first images with their (question,) predicted and first reference text
A run is evaluated by its own recipe unless another is given; see vlm_tune.eval_target for the recipe,
checkpoint and folder rules. `python -m vlm_tune.evaluate --compare DIR_A DIR_B` puts two folders side by side.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

from vlm_tune.captioning import generate_captions, on_accelerator, score_predictions
from vlm_tune.cli import CommandParser, run_command
from vlm_tune.eval_target import (
    EvaluationError,
    claim_output_dir,
    default_output_dir,
    eval_source,
    evaluation_recipe,
    resolve_eval_checkpoint,
    split_name,
)
from vlm_tune.recipe import DataSourceConfig, Recipe

logger = logging.getLogger("vlm_tune.evaluate")


def _build_eval_set(source: DataSourceConfig, recipe: Recipe, split: Optional[str]):
    from vlm_tune.data import DataError, build_dataset

    try:
        return build_dataset(source, recipe.data, train=False, seed=recipe.train.seed)
    except DataError as error:
        hint = ""
        if split is not None and "split" in str(error):
            hint = f" (--split {split} set data.eval.split)"
        elif "caption" in str(error):
            hint = (
                "\nCaption metrics compare each prediction with the image's reference captions: every evaluated "
                "image needs at least one non-empty caption."
            )
        raise EvaluationError(f"evaluation set (data.eval): {error}{hint}") from None


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


def _check_java(recipe: Recipe, task: str) -> None:
    """Fail before loading anything when the recipe requires Java and there is none (VQA scoring needs none)."""
    if task == "vqa":
        return
    from vlm_tune.metrics import java_available

    if recipe.eval.use_java and not java_available():
        raise EvaluationError(
            "eval.use_java is true but no working `java` is on PATH: install a Java runtime "
            "(e.g. apt-get install default-jre-headless) or set eval.use_java=null"
        )


def _score(rows: list[dict], task: str, use_java: Optional[bool]) -> tuple[dict[str, float], dict]:
    """Caption or VQA metrics of the rows, and what metrics.json records about the scoring."""
    if task == "vqa":
        return score_predictions(rows, task, use_java=False), {"task": task}
    from vlm_tune.metrics import java_available

    java = java_available() if use_java is None else use_java
    tokenizer = "Stanford PTB (Java)" if java else "Python PTB"
    return score_predictions(rows, task, use_java=java), {"task": task, "tokenizer": tokenizer}


def _set_info(source: DataSourceConfig, set_label: str) -> dict:
    """What metrics.json says of the evaluated set."""
    return {"data": str(source.path), "format": source.format, "set": set_label, "split": split_name(source)}


def evaluate_run(
    recipe: Recipe,
    checkpoint: Optional[str | Path] = None,
    split: Optional[str] = None,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Caption (or answer) `data.eval` with the base model or a checkpoint, score, write the evaluation folder.

    Args:
        recipe: the run's recipe (model, components and relevance must match the checkpoint's run).
        checkpoint: a `checkpoint-N` folder, a run folder, `RUN/best`, "latest" / "best" (of train.output_dir),
            or None for the base model.
        split: another split of the evaluation set (see `eval_source`).
        show_progress: draw a progress bar while generating.
        overwrite: replace an earlier evaluation in the folder (else that is an error).
    Returns:
        {"metrics", "output_dir", "files", "num_images", "skipped_images"}.
    Raises:
        EvaluationError: no evaluation set, missing checkpoint, unknown split, no reference captions, an earlier
            evaluation in the folder (without overwrite).
    """
    from vlm_tune.model.build import load_for_inference

    started = time.perf_counter()
    source, set_label = eval_source(recipe, split)
    checkpoint_dir = resolve_eval_checkpoint(recipe.train.output_dir, checkpoint)
    output_dir = default_output_dir(recipe, checkpoint_dir, set_label)
    claim_output_dir(output_dir, overwrite)
    _check_java(recipe, source.task)
    dataset = _build_eval_set(source, recipe, split)
    attempted = len(dataset) if recipe.eval.limit is None else min(recipe.eval.limit, len(dataset))
    what = f"{recipe.model.name_or_path}" + (f" + {checkpoint_dir}" if checkpoint_dir else " (base model)")
    logger.info(
        "Evaluating %s on %d of the %d images of %s into %s", what, attempted, len(dataset), source.path, output_dir
    )
    model, processor = load_for_inference(recipe, checkpoint_dir)
    rows = generate_captions(
        on_accelerator(model), processor, dataset, recipe.data, recipe.eval, show_progress=show_progress
    )
    if not rows:
        raise EvaluationError(f"no image of {source.path} could be captioned (all unreadable); see the warnings above")
    _unique_ids(rows)
    metrics, scoring = _score(rows, source.task, recipe.eval.use_java)
    info = {
        "metrics": metrics,
        "model": recipe.model.name_or_path,
        "checkpoint": str(checkpoint_dir) if checkpoint_dir else None,
        **_set_info(source, set_label),
        "num_images": len(rows),
        "skipped_images": attempted - len(rows),
        "num_beams": recipe.eval.num_beams,
        "max_new_tokens": recipe.eval.max_new_tokens,
        **scoring,
        "seconds": round(time.perf_counter() - started, 1),
    }
    files = write_outputs(output_dir, info, rows, dataset, recipe.eval.contact_sheet_images)
    summary = {"metrics": metrics, "output_dir": output_dir, "files": files}
    return {**summary, "num_images": len(rows), "skipped_images": info["skipped_images"]}


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
            else "; give a folder written by `python -m vlm_tune.evaluate` (e.g. RUN/checkpoint-N/eval-shapes-test)"
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
    not_numbers = [name for name, value in info["metrics"].items() if not isinstance(value, (int, float))]
    if not_numbers:
        raise EvaluationError(f"{metrics_file}: metrics {not_numbers} are not numbers; re-run the evaluation")
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


def _parser() -> CommandParser:
    parser = CommandParser(
        prog="python -m vlm_tune.evaluate",
        description=__doc__.splitlines()[0],
        epilog="or: python -m vlm_tune.evaluate --compare DIR_A DIR_B [--out FILE]",
    )
    parser.add_argument("recipe", nargs="?", help="YAML recipe (default with --checkpoint: the run's own recipe)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as eval.num_beams=3 eval.limit=100")
    parser.add_argument(
        "--checkpoint",
        help="RUN_DIR/checkpoint-N, a run folder (its newest checkpoint), RUN_DIR/best, or latest / best of the "
        "recipe's train.output_dir (default: the base model)",
    )
    parser.add_argument("--output-dir", help="evaluation folder (same as eval.output_dir=...)")
    parser.add_argument(
        "--split", help="another split: sets data.eval.split, or swaps captions_<split>.json (COCO), <split>.jsonl"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in the folder")
    parser.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"), help="compare two evaluation folders")
    parser.add_argument("--out", help="with --compare: also write the comparison to this markdown file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _compare(args) -> int:
    table = compare_evaluations(*args.compare)
    print(table, end="")
    if args.out:
        try:
            Path(args.out).write_text(table)
        except OSError as exc:
            raise EvaluationError(f"--out {args.out}: cannot write the comparison ({exc.strerror})") from None
    return 0


def _evaluate(args) -> int:
    recipe_path, overrides = args.recipe, list(args.overrides)
    if recipe_path and "=" in recipe_path and not Path(recipe_path).is_file():  # an override, no recipe given
        recipe_path, overrides = None, [recipe_path, *overrides]
    recipe, checkpoint = evaluation_recipe(recipe_path, overrides, args.checkpoint)
    if args.output_dir:
        recipe.eval.output_dir = args.output_dir
    result = evaluate_run(recipe, checkpoint, args.split, show_progress=not args.no_progress, overwrite=args.overwrite)
    print("\n".join(f"{name:8s} {value:.4f}" for name, value in result["metrics"].items()))
    print(f"Wrote {', '.join(result['files'])} to {result['output_dir']}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the process exit code (2: a mistake in the input, named on stderr)."""
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.compare and (args.recipe or args.overrides):
        parser.error("--compare takes two evaluation folders and no recipe")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command(lambda: _compare(args) if args.compare else _evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
