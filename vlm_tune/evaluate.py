"""`python -m vlm_tune.evaluate RECIPE.yaml [--checkpoint DIR] [--split NAME] [key=value ...]`: caption metrics.

Generates a caption for every image of `data.eval` with the base model or a trained checkpoint
(batched, greedy or beam search), scores them against all references (vlm_tune.metrics) and writes
the evaluation folder:
    metrics.json       scores and what was evaluated (model, checkpoint, set, decoding)
    predictions.jsonl  one {"image_id", "prediction", "references"} per image
    summary.md         the metrics table, the settings and the first predictions
    contact_sheet.png  the first images with their predicted and first reference captions
`python -m vlm_tune.evaluate --compare DIR_A DIR_B` puts two evaluation folders side by side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Optional

from vlm_tune.captioning import generate_captions, on_accelerator
from vlm_tune.cli import CommandParser, run_command
from vlm_tune.errors import VlmTuneError
from vlm_tune.recipe import DataSourceConfig, Recipe, load_recipe

logger = logging.getLogger("vlm_tune.evaluate")

COCO_SPLIT_FILE = re.compile(r"^captions_(?P<split>.+)\.json$")  # captions_val.json, captions_test_novel.json
SPLIT_FIELD_FORMATS = ("karpathy", "hf")  # formats whose `split` field selects the split
OUTPUT_FILES = ("metrics.json", "predictions.jsonl", "summary.md", "contact_sheet.png")


class EvaluationError(VlmTuneError):
    """An evaluation that cannot run as asked (no evaluation set, no references, unknown split...)."""


# ----------------------------------------------------------------------------------------------
# One evaluation run: set, model, outputs.
# ----------------------------------------------------------------------------------------------


def eval_source(recipe: Recipe, split: Optional[str] = None) -> tuple[DataSourceConfig, str]:
    """The evaluation set to use and its split name (for the folder name).

    `split` selects another split: for karpathy/hf sets it replaces `data.eval.split`; for a COCO file
    named `captions_<split>.json` it swaps the file for `captions_<NEW>.json` in the same folder.

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
        elif coco_match:
            source.path = str(path.with_name(f"captions_{split}.json"))
            if not Path(source.path).is_file():
                found = sorted(p.name for p in path.parent.glob("captions_*.json"))
                raise EvaluationError(
                    f"--split {split}: {source.path} not found; COCO files in {path.parent}: "
                    f"{', '.join(found) or 'none'}"
                )
        else:
            raise EvaluationError(
                f"--split {split}: cannot select a split of {source.path} (format {source.format}): --split sets "
                f"data.eval.split for karpathy/hf sets and swaps captions_<split>.json for COCO files; "
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
    from vlm_tune.checkpoint import CheckpointError, latest_checkpoint, resolve_checkpoint

    if checkpoint is None:
        return None
    if str(checkpoint) == "latest":
        found = latest_checkpoint(recipe.train.output_dir)
        if found is None:
            raise EvaluationError(
                f"--checkpoint latest: no complete checkpoint in {recipe.train.output_dir} (train.output_dir); "
                f"train first or give the checkpoint folder"
            )
    else:
        try:
            found = resolve_checkpoint(checkpoint)
        except CheckpointError as error:
            raise EvaluationError(str(error)) from None
    if found != Path(checkpoint):
        logger.info("Using the newest complete checkpoint of %s: %s", checkpoint, found)
    return found


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


def _make_output_dir(output_dir: Path) -> None:
    """Create the evaluation folder before the long part, so a folder that cannot be written fails first."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvaluationError(f"eval.output_dir: cannot write the evaluation folder {output_dir} ({exc})") from None


def _check_java(recipe: Recipe) -> None:
    """Fail before loading anything when the recipe requires Java and there is none."""
    from vlm_tune.metrics import java_available

    if recipe.eval.use_java and not java_available():
        raise EvaluationError(
            "eval.use_java is true but no working `java` is on PATH: install a Java runtime "
            "(e.g. apt-get install default-jre-headless) or set eval.use_java=null"
        )


def _score(rows: list[dict], use_java: Optional[bool]) -> tuple[dict[str, float], bool]:
    """Caption metrics of the rows, and whether the Java tokenizer was used."""
    from vlm_tune.metrics import java_available, score_captions

    java = java_available() if use_java is None else use_java
    predictions = {r["image_id"]: r["prediction"] for r in rows}
    references = {r["image_id"]: r["references"] for r in rows}
    return score_captions(predictions, references, use_java=java), java


def evaluate_run(
    recipe: Recipe, checkpoint: Optional[str | Path] = None, split: Optional[str] = None, show_progress: bool = True
) -> dict:
    """Caption `data.eval` with the base model or a checkpoint, score, and write the evaluation folder.

    Args:
        recipe: the run's recipe (model, components and relevance must match the checkpoint's run).
        checkpoint: a `checkpoint-N` folder, a run folder, "latest", or None for the base model.
        split: another split of the evaluation set (see `eval_source`).
        show_progress: draw a progress bar while generating.
    Returns:
        {"metrics", "output_dir", "files", "num_images", "skipped_images"}.
    Raises:
        EvaluationError: no evaluation set, missing checkpoint, unknown split, no reference captions.
    """
    from vlm_tune.model.build import load_for_inference

    started = time.perf_counter()
    source, split_name = eval_source(recipe, split)
    checkpoint_dir = resolve_eval_checkpoint(recipe, checkpoint)
    output_dir = default_output_dir(recipe, checkpoint_dir, split_name)
    _make_output_dir(output_dir)
    _check_java(recipe)
    dataset = _build_eval_set(source, recipe)
    attempted = len(dataset) if recipe.eval.limit is None else min(recipe.eval.limit, len(dataset))
    what = f" + {checkpoint_dir}" if checkpoint_dir else " (base model)"
    logger.info(
        "Evaluating %s%s on %d of the %d images of %s into %s",
        recipe.model.name_or_path,
        what,
        attempted,
        len(dataset),
        source.path,
        output_dir,
    )
    model, processor = load_for_inference(recipe, checkpoint_dir)
    rows = generate_captions(
        on_accelerator(model), processor, dataset, recipe.data, recipe.eval, show_progress=show_progress
    )
    if not rows:
        raise EvaluationError(f"no image of {source.path} could be captioned (all unreadable); see the warnings above")
    _unique_ids(rows)
    metrics, java = _score(rows, recipe.eval.use_java)
    info = {
        "metrics": metrics,
        "model": recipe.model.name_or_path,
        "checkpoint": str(checkpoint_dir) if checkpoint_dir else None,
        "data": str(source.path),
        "format": source.format,
        "split": split_name,
        "num_images": len(rows),
        "skipped_images": attempted - len(rows),
        "num_beams": recipe.eval.num_beams,
        "max_new_tokens": recipe.eval.max_new_tokens,
        "tokenizer": "Stanford PTB (Java)" if java else "Python PTB",
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
    parser.add_argument("recipe", nargs="?", help="YAML recipe of the run, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as eval.num_beams=3 eval.limit=100")
    parser.add_argument(
        "--checkpoint",
        help="RUN_DIR/checkpoint-N, a run folder or 'latest' for the newest checkpoint (default: the base model)",
    )
    parser.add_argument("--output-dir", help="evaluation folder (same as eval.output_dir=...)")
    parser.add_argument("--split", help="another split of data.eval (karpathy/hf split, or captions_<split>.json)")
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
    recipe = load_recipe(args.recipe, args.overrides)
    if args.output_dir:
        recipe.eval.output_dir = args.output_dir
    result = evaluate_run(recipe, args.checkpoint, args.split, show_progress=not args.no_progress)
    print("\n".join(f"{name:8s} {value:.4f}" for name, value in result["metrics"].items()))
    print(f"Wrote {', '.join(result['files'])} to {result['output_dir']}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the process exit code (2: a mistake in the input, named on stderr)."""
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.compare and (args.recipe or args.overrides):
        parser.error("--compare takes two evaluation folders and no recipe")
    if not args.compare and not args.recipe:
        parser.error("give a recipe (python -m vlm_tune.evaluate RECIPE.yaml) or --compare DIR_A DIR_B")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command(lambda: _compare(args) if args.compare else _evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
