"""`python -m vlm_tune.export CHECKPOINT --out DIR [--merge] [--dtype bfloat16|float16|float32]`: ship a trained run.

CHECKPOINT is a `checkpoint-N` folder or a run folder (its newest complete checkpoint). Without --merge, DIR
holds the adapter as a standard PEFT folder, the fully trained parts, the relevance modules, the resolved
recipe and a model card. With --merge, the base model is reloaded in 16 bit from its original weights (also
when training used a 4-bit base: merged into 4-bit weights, the update mostly rounds away), the adapter is
merged into it (LoRA, DoRA, rsLoRA, vision tower included: PEFT's merge, whatever the adapter type), the fully
trained parts are put in, and DIR is a Hugging Face folder that plain transformers loads. The layout of both
is in `vlm_tune.exported`. DIR is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from vlm_tune.checkpoint import resolve_checkpoint
from vlm_tune.cli import CommandParser, run_command
from vlm_tune.exported import (
    EXPORT_FILE,
    RECIPE_FILE,
    RELEVANCE_DIR,
    ExportError,
    ExportInfo,
    run_recipe,
    write_export_info,
)
from vlm_tune.recipe import Recipe, dump_recipe

logger = logging.getLogger("vlm_tune.export")

DTYPES = ("bfloat16", "float16", "float32")
ADAPTER_FILES = (  # besides adapter/; adapter_training / soft_prompt: issue 18's variants (model/adapter_files.py)
    "trained.safetensors",
    "relevance.safetensors",
    "relevance.json",
    "adapter_training.safetensors",
    "soft_prompt.safetensors",
    "soft_prompt.json",
)
# safetensors writes a shard through a memory map, whose pages count in the process's memory until the shard is
# closed: shards of 1 GB keep a merge's peak near the 16-bit model plus one shard (transformers' default is 50 GB)
MERGED_SHARD_SIZE = "1GB"


def _staging_folder(out: Path, overwrite: bool) -> Path:
    """A temporary folder beside `out`, after checking that `out` may be (re)written.

    Raises:
        ExportError: `out` is a file, a folder with other content (or an export without --overwrite), or
            its parent cannot be written.
    """
    if out.is_file():
        raise ExportError(f"--out {out} is a file; name a new folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / EXPORT_FILE).is_file():
            raise ExportError(f"--out {out} is a folder with other files in it; name a new or empty folder")
        if not overwrite:
            raise ExportError(f"--out {out} holds an earlier export; add --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write there ({exc.strerror})") from None


def _write_adapter(checkpoint: Path, folder: Path) -> None:
    """The checkpoint's weight files as they are: adapter/, trained parts, relevance modules."""
    shutil.copytree(checkpoint / "adapter", folder / "adapter")
    for name in ADAPTER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, folder / name)


def _export_processor(processor, recipe: Recipe):
    """The processor with `data.image_size` / `data.max_pixels` written into its image processor, where the
    family takes them as processor sizes (Idefics3, Qwen-VL), so plain transformers makes the same tokens."""
    from vlm_tune.data.families import image_budget

    budget = image_budget(processor, recipe.data.image_size, recipe.data.max_pixels)
    for key, value in budget.processor_kwargs.items():
        setattr(processor.image_processor, key, value)
    if budget.resizes and not budget.processor_kwargs:
        logger.warning(
            "data.image_size / data.max_pixels shrank images before the processor in training; plain "
            "transformers does not: shrink images to that size yourself for the same image tokens"
        )
    return processor


def _write_merged(recipe: Recipe, checkpoint: Path, folder: Path, dtype: Optional[str]):
    """Merge the adapter into the 16-bit base and save a Hugging Face folder; returns the component report."""
    from vlm_tune.model.build import load_for_export
    from vlm_tune.relevance import RelevanceWrapper

    if recipe.model.quantization is not None:
        logger.info(
            "The run trained on a 4-bit base: merging into the 16-bit original weights (the merged model differs "
            "from the 4-bit base + adapter by the base's quantization error)"
        )
    built = load_for_export(recipe, checkpoint, dtype)
    wrapper = built.model if isinstance(built.model, RelevanceWrapper) else None
    peft_model = wrapper.model if wrapper is not None else built.model
    quantized = [name for name, param in peft_model.named_parameters() if hasattr(param, "quant_state")]
    if quantized:  # load_for_export never loads 4-bit weights; merging into them would round the update away
        raise ExportError(f"internal error: 4-bit weights in the model to merge ({quantized[:3]}); please report it")
    # In place, not PEFT's safe_merge: that copies every merged weight while the loaded one (memory-mapped from the
    # base's safetensors) stays mapped, doubling the peak memory; the merged weights are checked below instead.
    merged = peft_model.merge_and_unload()
    broken = [name for name, param in merged.named_parameters() if not bool(param.isfinite().all())]
    if broken:
        raise ExportError(f"{checkpoint}: the merged weights are not finite ({broken[:3]}); the adapter is broken")
    merged.save_pretrained(folder, max_shard_size=MERGED_SHARD_SIZE)
    _export_processor(built.processor, recipe).save_pretrained(folder)
    if wrapper is not None:
        wrapper.save(folder / RELEVANCE_DIR)
        logger.warning(
            "The run trained relevance modules: written to %s. Plain transformers cannot run them and reads every "
            "visual token; python -m vlm_tune.generate --model %s applies them",
            folder / RELEVANCE_DIR,
            folder,
        )
    return built.report


def _components_table(checkpoint: Path, report) -> Optional[str]:
    """The checkpoint's own table (AdaLoRA: the ranks its weights hold), the built model's, or the run's."""
    own = checkpoint / "components.txt"
    if own.is_file():
        return own.read_text()
    if report is not None:
        return report.table()
    table = checkpoint.parent / "components.txt"
    return table.read_text() if table.is_file() else None


def _step(checkpoint: Path) -> Optional[int]:
    try:
        return json.loads((checkpoint / "state.json").read_text()).get("step")
    except (OSError, json.JSONDecodeError):
        return None


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    merge: bool = False,
    dtype: Optional[str] = None,
    recipe: Optional[str | Path] = None,
    overwrite: bool = False,
) -> Path:
    """Export a trained checkpoint: an adapter folder, or (merge) a Hugging Face model folder.

    Args:
        checkpoint: a `checkpoint-N` folder or a run folder (its newest complete checkpoint).
        out: the folder to write. merge: merge the adapter into the 16-bit base weights.
        dtype: dtype of the merged weights (default model.dtype); only with merge.
        recipe: the recipe file of the run (default: the run folder's recipe.yaml).
        overwrite: replace an earlier export in `out`.
    Returns:
        The export folder.
    Raises:
        CheckpointError: the checkpoint is missing or incomplete. ExportError: no recipe, `out` not writable,
            --dtype without --merge, an adapter that cannot be merged.
    """
    from vlm_tune.model_card import model_card

    if dtype is not None and not merge:
        raise ExportError("--dtype sets the merged weights' dtype: add --merge (an adapter export keeps the weights)")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {list(DTYPES)}")
    checkpoint = resolve_checkpoint(checkpoint)
    run = run_recipe(checkpoint, recipe=recipe)
    out = Path(out)
    staging = _staging_folder(out, overwrite)
    try:
        report = None
        if merge:
            report = _write_merged(run, checkpoint, staging, dtype)
        else:
            _write_adapter(checkpoint, staging)
        dump_recipe(run, staging / RECIPE_FILE)
        files = {path.name for path in staging.iterdir()}
        step = _step(checkpoint)
        card = model_card(run, checkpoint, step, merge, _components_table(checkpoint, report), files)
        (staging / "README.md").write_text(card)
        kind, weights = ("merged", dtype or run.model.dtype) if merge else ("adapter", None)
        write_export_info(staging, ExportInfo(kind, str(checkpoint), step, weights))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _parser() -> CommandParser:
    parser = CommandParser(prog="python -m vlm_tune.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="RUN_DIR/checkpoint-N, or a run folder (its newest complete checkpoint)")
    parser.add_argument("--out", required=True, help="the export folder to write")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the 16-bit base weights")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="dtype of the merged weights (default: the recipe's model.dtype)"
    )
    parser.add_argument("--recipe", help="the run's recipe file (default: recipe.yaml of the run folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the process exit code (2: a mistake in the input, named on stderr)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def command() -> int:
        out = export_checkpoint(args.checkpoint, args.out, args.merge, args.dtype, args.recipe, args.overwrite)
        print(f"Exported {'the merged model' if args.merge else 'the adapter'} to {out}")
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
