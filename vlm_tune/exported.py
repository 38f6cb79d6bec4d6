"""Exported folders (written by `python -m vlm_tune.export`) and the recipes of runs: their layout, how to read them.

Layout of an export, `EXPORT_FILE` in both kinds:
    adapter export (no --merge)     the checkpoint layout without training state, so the builder loads it
        adapter/                    a standard PEFT folder (`PeftModel.from_pretrained(base, DIR / "adapter")`)
        trained.safetensors         fully trained parameters PEFT does not hold (keys as in the PeftModel)
        relevance.safetensors/.json the relevance modules, when the run trained them
        recipe.yaml, README.md      the resolved recipe; the model card
    merged export (--merge)         a Hugging Face model folder that plain transformers loads
        config.json, generation_config.json, model*.safetensors, processor and tokenizer files, chat template
        recipe.yaml, README.md      as above
        relevance/                  the relevance modules, when the run trained them (plain transformers ignores
                                    them and reads every visual token; `vlm_tune.generate --model DIR` applies them)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vlm_tune.checkpoint import CheckpointError, resolve_checkpoint
from vlm_tune.recipe import Recipe, load_recipe

EXPORT_FILE = "export.json"
RECIPE_FILE = "recipe.yaml"
RELEVANCE_DIR = "relevance"
KINDS = ("adapter", "merged")


class ExportError(CheckpointError):
    """An exported folder, or a checkpoint to export, that cannot be used (the message names it and the fix)."""


@dataclass(frozen=True)
class ExportInfo:
    """What `EXPORT_FILE` records: the kind of export, where it came from, the merged weights' dtype."""

    kind: str  # one of KINDS
    checkpoint: str
    step: Optional[int]
    dtype: Optional[str]  # merged exports only

    @property
    def merged(self) -> bool:
        return self.kind == "merged"


def write_export_info(folder: Path, info: ExportInfo) -> None:
    """Write `EXPORT_FILE` into `folder`."""
    (folder / EXPORT_FILE).write_text(json.dumps(info.__dict__, indent=1) + "\n")


def read_export_info(folder: str | Path) -> Optional[ExportInfo]:
    """The export record of `folder`, or None when it is no export.

    Raises:
        ExportError: the record is unreadable or names an unknown kind.
    """
    path = Path(folder) / EXPORT_FILE
    if not path.is_file():
        return None
    try:
        info = ExportInfo(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ExportError(f"{path}: unreadable export record ({exc}); export the checkpoint again") from None
    if info.kind not in KINDS:
        raise ExportError(f"{path}: unknown export kind {info.kind!r}, expected one of {list(KINDS)}")
    return info


def weights_folder(path: str | Path) -> Path:
    """The folder of trained weights to load: an adapter export as it is, else `resolve_checkpoint(path)`.

    Raises:
        ExportError: `path` is a merged export (its weights are the model itself: name it as the model).
        CheckpointError: `path` is neither an adapter export nor a (run folder with a) complete checkpoint.
    """
    info = read_export_info(path)
    if info is None:
        return resolve_checkpoint(path)
    if info.merged:
        raise ExportError(
            f"{path} is a merged export, a whole model: load it with model.name_or_path={path} "
            f"(or python -m vlm_tune.generate --model {path}), not as a checkpoint"
        )
    return Path(path)


def run_recipe(checkpoint: Path, overrides: Optional[list[str]] = None, recipe: Optional[str | Path] = None) -> Recipe:
    """The recipe a checkpoint was trained with: `recipe`, else the run folder's `recipe.yaml` (or the export's).

    Args:
        checkpoint: a resolved checkpoint folder (RUN/checkpoint-N) or an adapter export.
        overrides: `a.b=value` strings applied on top.
        recipe: a recipe file to use instead (a checkpoint copied out of its run folder).
    Raises:
        ExportError: no recipe file next to the checkpoint (the message says to pass one).
        RecipeError: the recipe does not validate.
    """
    from vlm_tune.eval_target import run_recipe_file

    if recipe is None:
        recipe = run_recipe_file(checkpoint)
        if recipe is None:
            raise ExportError(
                f"{checkpoint}: no {RECIPE_FILE} in it or in its run folder {checkpoint.parent}; "
                f"give the recipe it was trained with: --recipe RECIPE.yaml"
            )
    return load_recipe(recipe, overrides)


def relevance_folder(folder: str | Path) -> Optional[Path]:
    """The relevance modules' folder of a merged export, or None when the run trained none."""
    from vlm_tune.relevance import RELEVANCE_FILE

    path = Path(folder) / RELEVANCE_DIR
    return path if (path / RELEVANCE_FILE).is_file() else None
