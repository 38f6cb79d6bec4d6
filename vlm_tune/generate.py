"""`python -m vlm_tune.generate (--model DIR | --checkpoint PATH) --image A [--image B ...]`: caption images.

`--model` takes an exported folder (merged or not, `vlm_tune.export`) or any model folder; `--checkpoint` a run
or a checkpoint. Prints one line per image, `path<TAB>caption`, or JSON lines with `--json`. The images are
batched, the prompt defaults to the recipe's, and decoding is evaluation's (`vlm_tune.captioning`). Trailing
`key=value` overrides change the recipe: `model.quantization.bits=4` loads the base in 4 bit with the adapter
on top (memory-limited serving).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from vlm_tune.cli import CommandParser, run_command
from vlm_tune.errors import VlmTuneError
from vlm_tune.recipe import Recipe

logger = logging.getLogger("vlm_tune.generate")


class GenerateError(VlmTuneError):
    """Images or a model that `generate` cannot use (the message names the file and the fix)."""


def load_images(paths: list[str | Path]) -> list:
    """Every image as RGB, before any model loads, so a wrong path fails at once.

    Raises:
        GenerateError: a missing, non-image or unreadable file (named).
    """
    from vlm_tune.data.images import ImageLoadError, load_rgb

    images = []
    for path in paths:
        if Path(path).is_dir():
            raise GenerateError(f"--image {path} is a folder; name image files")
        try:
            images.append(load_rgb(path))
        except ImageLoadError as error:
            raise GenerateError(f"--image {error}") from None
    return images


def load_generator(
    model: Optional[str | Path] = None,
    checkpoint: Optional[str | Path] = None,
    overrides: Optional[list[str]] = None,
    recipe: Optional[str | Path] = None,
) -> tuple[Any, Any, Recipe]:
    """The model to caption with, from an exported (or model) folder or from a checkpoint / run folder.

    Args:
        model: an exported folder, merged or not, or a model folder. checkpoint: a checkpoint or run folder.
        overrides: `a.b=value` strings on top of the recipe. recipe: the run's recipe file (with checkpoint).
    Returns:
        (model in eval mode, on the GPU when there is one; processor; the recipe used).
    Raises:
        CheckpointError / ExportError: the folder is no checkpoint, run or export.
    """
    from vlm_tune.captioning import on_accelerator
    from vlm_tune.exported import run_recipe
    from vlm_tune.model.build import load_exported, load_for_inference

    if (model is None) == (checkpoint is None):
        raise GenerateError("give one of --model DIR (an exported folder) or --checkpoint RUN_DIR")
    if model is not None and recipe is not None:
        raise GenerateError("--recipe goes with --checkpoint; an exported folder holds its own recipe.yaml")
    if model is not None:
        loaded, processor, used = load_exported(model, overrides)
    else:
        from vlm_tune.checkpoint import resolve_checkpoint

        found = resolve_checkpoint(checkpoint)
        used = run_recipe(found, overrides, recipe)
        loaded, processor = load_for_inference(used, found)
    return on_accelerator(loaded), processor, used


def caption_images(
    model,
    processor,
    images: list,
    recipe: Recipe,
    prompt: Optional[str] = None,
    max_new_tokens: Optional[int] = None,
    num_beams: Optional[int] = None,
    batch_size: Optional[int] = None,
    adapters: Optional[list[str]] = None,
) -> list[str]:
    """One caption per image, decoded as evaluation decodes (`captioning.generate_captions`).

    Args:
        model, processor: from `load_generator` (or any vlm_tune model). images: PIL images.
        recipe: data (prompt, image size, max_length) and eval (decoding) settings.
        prompt: the user turn (default: data.prompt, its first entry when it is a list).
        max_new_tokens, num_beams, batch_size: override eval.max_new_tokens / num_beams / batch_size.
        adapters: one PEFT adapter name per image (a batch mixing adapters); None uses the active adapter.
    Raises:
        GenerateError: an image the collator drops (its prompt and image tokens exceed data.max_length).
    """
    from vlm_tune.captioning import generate_captions

    prompts = [recipe.data.prompt] if isinstance(recipe.data.prompt, str) else list(recipe.data.prompt)
    data_cfg = dataclasses.replace(recipe.data, prompt=prompt or prompts[0], num_workers=0, on_error="raise")
    eval_cfg = dataclasses.replace(
        recipe.eval,
        max_new_tokens=max_new_tokens or recipe.eval.max_new_tokens,
        num_beams=num_beams or recipe.eval.num_beams,
        batch_size=batch_size or recipe.eval.batch_size,
        limit=None,
    )
    items = [
        {"image_id": i, "image": image, "captions": [], "prompt": data_cfg.prompt} for i, image in enumerate(images)
    ]
    adapter_of = dict(enumerate(adapters)) if adapters is not None else None
    rows = generate_captions(model, processor, items, data_cfg, eval_cfg, show_progress=False, adapter_of=adapter_of)
    by_id = {row["image_id"]: row["prediction"] for row in rows}
    missing = [i for i in range(len(images)) if i not in by_id]
    if missing:
        raise GenerateError(
            f"image {missing[0] + 1} of {len(images)} was not captioned: its prompt and image tokens exceed "
            f"data.max_length={recipe.data.max_length} (raise it, or give a smaller image)"
        )
    return [by_id[i] for i in range(len(images))]


def _parser() -> CommandParser:
    parser = CommandParser(prog="python -m vlm_tune.generate", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an exported folder (python -m vlm_tune.export, merged or not)")
    source.add_argument("--checkpoint", help="RUN_DIR/checkpoint-N, or a run folder (its newest checkpoint)")
    parser.add_argument("--image", action="append", required=True, help="an image file (repeat for more)")
    parser.add_argument("--prompt", help="the user turn (default: the recipe's data.prompt)")
    parser.add_argument("--max-new-tokens", type=int, help="longest caption (default: eval.max_new_tokens)")
    parser.add_argument("--num-beams", type=int, help="1: greedy; >1: beam search (default: eval.num_beams)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: eval.batch_size)")
    parser.add_argument("--json", action="store_true", help='JSON lines {"image": path, "text": caption}')
    parser.add_argument("--recipe", help="with --checkpoint: the run's recipe (default: the run's recipe.yaml)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides such as model.quantization.bits=4")
    return parser


def _generate(args) -> int:
    images = load_images(args.image)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the captions only
        model, processor, recipe = load_generator(args.model, args.checkpoint, args.overrides, args.recipe)
    captions = caption_images(
        model, processor, images, recipe, args.prompt, args.max_new_tokens, args.num_beams, args.batch_size
    )
    for path, caption in zip(args.image, captions):
        print(json.dumps({"image": path, "text": caption}, ensure_ascii=False) if args.json else f"{path}\t{caption}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the process exit code (2: a mistake in the input, named on stderr)."""
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    for name in ("max_new_tokens", "num_beams", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(lambda: _generate(args))


if __name__ == "__main__":
    sys.exit(main())
