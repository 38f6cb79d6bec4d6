"""What an evaluation evaluates and where it writes: the recipe, the checkpoint, the set, the folder.

- A run is evaluated by its own recipe: `checkpoint-N/recipe.yaml` when the checkpoint carries one, else the
  run folder's `recipe.yaml`. Another recipe may be given; a warning then names every key that differs.
- `--checkpoint` takes a `checkpoint-N` folder, a run folder (its newest checkpoint), `RUN/best` (the best
  checkpoint, train.keep_best), or `latest` / `best` of the recipe's train.output_dir.
- The evaluation folder is named after the set and its split (`eval-shapes-test`, `eval-photos-val`;
  `eval-base-...` in train.output_dir for the base model), so two sets never share a folder; an earlier
  evaluation in the folder is replaced only with `overwrite` (`--overwrite`), and then said so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Optional

from vlm_tune.errors import VlmTuneError
from vlm_tune.recipe import COMPONENT_NAMES, DataSourceConfig, Recipe, load_recipe
from vlm_tune.recipe_files import flatten_keys

logger = logging.getLogger("vlm_tune.evaluate")

COCO_SPLIT_FILE = re.compile(r"^captions_(?P<split>.+)\.json$")  # captions_val.json, captions_test_novel.json
SPLIT_FIELD_FORMATS = ("karpathy", "hf", "jsonl", "csv", "imagefolder")  # formats where data.eval.split selects
FILE_PER_SPLIT_FORMATS = ("llava", "messages")  # <split>.jsonl (or .json) beside the file: --split swaps it
OUTPUT_FILES = ("metrics.json", "predictions.jsonl", "summary.md", "contact_sheet.png")
RECIPE_FILE = "recipe.yaml"
SHOWN_KEYS = 12  # differing keys named in the warning


class EvaluationError(VlmTuneError):
    """An evaluation that cannot run as asked (no evaluation set, no references, unknown split...)."""


# ----------------------------------------------------------------------------------------------
# The set and the folder
# ----------------------------------------------------------------------------------------------


def _split_of(source: DataSourceConfig, split: str) -> DataSourceConfig:
    """`source` with another split selected (see `eval_source`)."""
    path = Path(source.path)
    if source.format in SPLIT_FIELD_FORMATS:
        if source.format == "imagefolder" and not (path / split).is_dir():
            found = sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
            raise EvaluationError(
                f"--split {split}: no folder {path / split}; subfolders: {', '.join(found) or 'none'}"
            )
        return dataclasses.replace(source, split=split)
    if source.format == "coco" and COCO_SPLIT_FILE.match(path.name):
        pattern = "captions_{}.json"
    elif source.format in FILE_PER_SPLIT_FORMATS:
        pattern = "{}" + path.suffix
    else:
        raise EvaluationError(
            f"--split {split}: a COCO file holds one split and {path.name} is not named captions_<split>.json: "
            f"give the file with data.eval.path=..."
        )
    swapped = path.with_name(pattern.format(split))
    if not swapped.is_file():
        found = sorted(p.name for p in path.parent.glob(pattern.format("*")))
        raise EvaluationError(
            f"--split {split}: {swapped} not found; {source.format} files in {path.parent}: "
            f"{', '.join(found) or 'none'}"
        )
    return dataclasses.replace(source, path=str(swapped))


def split_name(source: DataSourceConfig) -> Optional[str]:
    """The split of a set: data.eval.split, `<split>` of a COCO file named captions_<split>.json, or the file
    name of a llava / messages set (one file per split)."""
    path = Path(source.path)
    if source.format in FILE_PER_SPLIT_FORMATS:
        return path.stem
    coco = COCO_SPLIT_FILE.match(path.name) if source.format == "coco" else None
    return coco.group("split") if coco else source.split


def set_name(source: DataSourceConfig) -> str:
    """The set's name in folder names: `<set>-<split>` (`shapes-test` for shapes/captions_test.json,
    `photos-val` for photos.jsonl with split val), or `<set>` without a split."""
    path = Path(source.path)
    if source.format in FILE_PER_SPLIT_FORMATS or (source.format == "coco" and COCO_SPLIT_FILE.match(path.name)):
        name = path.resolve().parent.name  # <set>/captions_<split>.json, <set>/<split>.jsonl
    else:
        name = path.name if path.is_dir() else path.stem
    split = split_name(source)
    return re.sub(r"[^\w.+-]", "_", f"{name}-{split}" if split else name)


def eval_source(recipe: Recipe, split: Optional[str] = None) -> tuple[DataSourceConfig, str]:
    """The evaluation set to use and its name for the folder (`set_name`).

    `split` selects another split: it sets `data.eval.split` for karpathy, hf, jsonl, csv (a `split` column) and
    imagefolder (a subfolder) sets; for a COCO file named `captions_<split>.json` it swaps the file for
    `captions_<NEW>.json` in the same folder.

    Raises:
        EvaluationError: no `data.eval` in the recipe, or the split cannot be selected.
    """
    if recipe.data.eval is None:
        raise EvaluationError(
            "data.eval is not set in the recipe: name the evaluation set, e.g. "
            "data.eval.path=data/shapes/captions_val.json (data.eval.format defaults to coco)"
        )
    source = recipe.data.eval if split is None else _split_of(recipe.data.eval, split)
    return dataclasses.replace(source), set_name(source)


def default_output_dir(recipe: Recipe, checkpoint: Optional[Path], name: str) -> Path:
    """eval.output_dir, else `<checkpoint>/eval-<name>`, else `<train.output_dir>/eval-base-<name>`."""
    if recipe.eval.output_dir:
        return Path(recipe.eval.output_dir)
    if checkpoint is not None:
        return Path(checkpoint) / f"eval-{name}"
    return Path(recipe.train.output_dir) / f"eval-base-{name}"


def _describe_evaluation(metrics_file: Path) -> str:
    try:
        info = json.loads(metrics_file.read_text())
        return f"of {info.get('data')} by {info.get('checkpoint') or 'the base model'}"
    except (OSError, ValueError, AttributeError):
        return "an unreadable metrics.json"


def claim_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Create the evaluation folder before the long part; an earlier evaluation in it is replaced only when
    `overwrite`, with a warning.

    Raises:
        EvaluationError: the folder holds an evaluation and `overwrite` is False, or it cannot be written.
    """
    earlier = output_dir / "metrics.json"
    if earlier.is_file():
        what = _describe_evaluation(earlier)
        if not overwrite:
            raise EvaluationError(
                f"{output_dir} already holds an evaluation ({what}): pass --overwrite to replace it, "
                f"or --output-dir DIR to write this one elsewhere"
            )
        logger.warning("Replacing the earlier evaluation in %s (%s)", output_dir, what)
        for name in OUTPUT_FILES:
            (output_dir / name).unlink(missing_ok=True)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvaluationError(f"eval.output_dir: cannot write the evaluation folder {output_dir} ({exc})") from None


# ----------------------------------------------------------------------------------------------
# The checkpoint and the recipe
# ----------------------------------------------------------------------------------------------


def resolve_eval_checkpoint(output_dir: Optional[str], checkpoint: Optional[str | Path]) -> Optional[Path]:
    """The checkpoint folder to load: a `checkpoint-N` folder, a run folder (its newest complete checkpoint),
    `RUN/best`, "latest" / "best" of `output_dir` (the recipe's train.output_dir), or None for the base model.

    Raises:
        EvaluationError: the folder is missing or incomplete (naming it and listing the checkpoints found).
    """
    from vlm_tune.checkpoint import CheckpointError, resolve_checkpoint

    if checkpoint is None:
        return None
    if str(checkpoint) in ("latest", "best"):
        if output_dir is None:
            raise EvaluationError(
                f"--checkpoint {checkpoint}: name the run (--checkpoint RUN_DIR/{checkpoint}, or RUN_DIR for its "
                f"newest checkpoint), or give its recipe, whose train.output_dir is the run folder"
            )
        checkpoint = Path(output_dir) / ("best" if str(checkpoint) == "best" else "")
    try:
        found = resolve_checkpoint(checkpoint)
    except CheckpointError as error:
        raise EvaluationError(str(error)) from None
    if found != Path(checkpoint):
        logger.info("Using checkpoint %s (for %s)", found, checkpoint)
    return found


def run_recipe_file(checkpoint: Path) -> Optional[Path]:
    """The recipe the checkpoint was trained with: its own copy, else the run folder's; None if neither."""
    for candidate in (checkpoint / RECIPE_FILE, checkpoint.parent / RECIPE_FILE):
        if candidate.is_file():
            return candidate
    return None


def _plain(recipe: Recipe) -> dict:
    """The recipe as data, with every component spelt out (one not named is frozen)."""
    raw = recipe.to_dict()
    raw["components"] = {name: dataclasses.asdict(recipe.component(name)) for name in COMPONENT_NAMES}
    return raw


def differing_keys(a: Recipe, b: Recipe) -> list[str]:
    """The dotted keys whose values differ between two recipes, in recipe order."""
    flat_a, flat_b = flatten_keys(_plain(a)), flatten_keys(_plain(b))
    missing = object()
    keys = dict.fromkeys([*flat_a, *flat_b])
    return [key for key in keys if flat_a.get(key, missing) != flat_b.get(key, missing)]


def evaluation_recipe(
    recipe_path: Optional[str], overrides: list[str], checkpoint: Optional[str]
) -> tuple[Recipe, Optional[Path]]:
    """The recipe to evaluate with, and the checkpoint folder (None: the base model).

    With a checkpoint and no recipe, the run's own recipe (plus `overrides`); with both, the recipe given,
    and a warning naming the keys in which it differs from the run's.

    Raises:
        EvaluationError: neither a recipe nor a checkpoint; a checkpoint without a recipe next to it.
        RecipeError: a recipe that is missing or invalid.
    """
    given = load_recipe(recipe_path, overrides) if recipe_path else None
    if checkpoint is None:
        if given is None:
            raise EvaluationError(
                "give a recipe (python -m vlm_tune.evaluate RECIPE.yaml) for the base model, or --checkpoint RUN_DIR "
                "to evaluate a run by its own recipe"
            )
        return given, None
    checkpoint_dir = resolve_eval_checkpoint(given.train.output_dir if given else None, checkpoint)
    own = run_recipe_file(checkpoint_dir)
    if given is None:
        if own is None:
            raise EvaluationError(
                f"{checkpoint_dir}: no {RECIPE_FILE} in the checkpoint or its run folder; give the run's recipe: "
                f"python -m vlm_tune.evaluate RECIPE.yaml --checkpoint {checkpoint}"
            )
        logger.info("Evaluating with the run's own recipe %s", own)
        return load_recipe(own, overrides), checkpoint_dir
    if own is not None:
        keys = differing_keys(load_recipe(own), given)
        if keys:
            more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            logger.warning(
                "%s differs from the run's recipe %s in %s%s: evaluating with %s (leave the recipe out to "
                "evaluate by the run's own)",
                recipe_path,
                own,
                ", ".join(keys[:SHOWN_KEYS]),
                more,
                recipe_path,
            )
    return given, checkpoint_dir
