"""Several fine-tunes on one base model: adapter exports attached by name, one chosen per request or per sample.

    adapters = AdapterSet.load({"shapes": "exports/shapes", "scenes": "exports/scenes"})
    adapters.caption(images, adapter="shapes")                 # one adapter for the request (PEFT set_adapter)
    adapters.caption(images, adapter=["shapes", "scenes"])     # one per image in one batch (PEFT adapter_names)

The base loads once through the builder (16-bit, or 4-bit when `model.quantization` is set), the adapters with
PEFT's `PeftModel.from_pretrained` / `load_adapter`. An adapter shares the base only if everything it trained
lives in the adapter: exports with `trained.safetensors` (parameters trained in place in the base) or relevance
modules are served alone (`vlm_tune.generate`).

A batch mixing adapters (PEFT's mixed-batch inference) splits every adapted layer's input by batch row, so it
needs rows that are samples: adapters on the language model and cross-attention. Vision and projector inputs
are laid out by image, tile or patch (Qwen2-VL flattens patches, mllama stacks tiles, Idefics3 splits crops),
and PEFT has no mixed batches for DoRA; such adapter sets take one adapter per call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from vlm_tune.errors import VlmTuneError
from vlm_tune.recipe import Recipe

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
PER_ROW_COMPONENTS = ("language", "cross_attention")  # components whose layer inputs hold one row per sample


class AdapterError(VlmTuneError):
    """Adapters that cannot share a base or a batch (the message names the adapter and the fix)."""


def _adapter_recipe(name: str, folder: Path, overrides: Optional[list[str]]) -> Recipe:
    """The recipe of an adapter export that can share its base.

    Raises:
        AdapterError: not an adapter export, or it holds parts outside the adapter.
    """
    from vlm_tune.exported import read_export_info, run_recipe
    from vlm_tune.relevance import RELEVANCE_FILE

    info = read_export_info(folder)
    if info is None or info.merged:
        what = "a merged export (a whole model)" if info else "no adapter export (no export.json)"
        raise AdapterError(f"adapter {name!r}: {folder} is {what}; export the run without --merge")
    for part, why in (
        ("trained.safetensors", "parameters trained in place in the base"),
        (RELEVANCE_FILE, "relevance modules"),
    ):
        if (folder / part).is_file():
            raise AdapterError(
                f"adapter {name!r}: {folder / part} holds {why}, which cannot switch with the adapter; "
                f"serve it alone: python -m vlm_tune.generate --model {folder} --image ..."
            )
    return run_recipe(folder, overrides)


class AdapterSet:
    """One base model with several PEFT adapters attached by name.

    Attributes:
        model: the PeftModel holding every adapter. processor: the base model's processor.
        recipes: adapter name -> the recipe it was trained with (decoding and prompt settings).
    """

    def __init__(self, model, processor, recipes: dict[str, Recipe]):
        self.model = model
        self.processor = processor
        self.recipes = recipes

    @classmethod
    def load(cls, exports: dict[str, Union[str, Path]], overrides: Optional[list[str]] = None) -> AdapterSet:
        """Load the base once and attach every adapter export by name (the first is active).

        Args:
            exports: adapter name -> adapter export folder (`python -m vlm_tune.export RUN --out DIR`).
            overrides: `a.b=value` strings for the base, e.g. `model.quantization.bits=4` for a 4-bit base.
        Raises:
            AdapterError: no adapters, an export that cannot share the base, or exports of different base models.
        """
        from peft import PeftModel

        from vlm_tune.captioning import on_accelerator
        from vlm_tune.model.build import load_for_inference

        if not exports:
            raise AdapterError("AdapterSet.load: name at least one adapter export")
        recipes = {name: _adapter_recipe(name, Path(folder), overrides) for name, folder in exports.items()}
        first, base_recipe = next(iter(recipes.items()))
        for name, recipe in recipes.items():
            if (recipe.model.name_or_path, recipe.model.revision) != (
                base_recipe.model.name_or_path,
                base_recipe.model.revision,
            ):
                raise AdapterError(
                    f"adapter {name!r} was trained on {recipe.model.name_or_path}, adapter {first!r} on "
                    f"{base_recipe.model.name_or_path}: adapters share a base only when they were trained on it"
                )
        base, processor = load_for_inference(base_recipe)
        folders = {name: str(Path(folder) / "adapter") for name, folder in exports.items()}
        model = PeftModel.from_pretrained(base, folders[first], adapter_name=first)
        for name, folder in folders.items():
            if name != first:
                model.load_adapter(folder, adapter_name=name)
        model.set_adapter(first)
        return cls(on_accelerator(model.eval()), processor, recipes)

    @property
    def names(self) -> list[str]:
        """The attached adapters' names."""
        return list(self.recipes)

    def use(self, name: str) -> None:
        """Make `name` the active adapter (PEFT `set_adapter`).

        Raises:
            AdapterError: no adapter of that name.
        """
        self._check_names([name])
        self.model.set_adapter(name)

    def _check_names(self, names: list[str]) -> None:
        unknown = sorted({n for n in names if n not in self.recipes and n != BASE})
        if unknown:
            raise AdapterError(f"unknown adapter(s) {unknown}; attached: {self.names} (or {BASE!r} for the base)")

    def check_mixed_batch(self) -> None:
        """Raise unless these adapters can be mixed within one batch (see the module docstring).

        Raises:
            AdapterError: naming the adapter and component (or DoRA) that PEFT's per-sample adapters cannot serve.
        """
        for name, recipe in self.recipes.items():
            for component, cfg in recipe.components.items():
                if cfg.mode != "frozen" and component not in PER_ROW_COMPONENTS:
                    raise AdapterError(
                        f"adapter {name!r} trains the {component} component, whose layer inputs are laid out by "
                        f"image, tile or patch rather than by sample, so one batch cannot mix adapters; "
                        f"caption with one adapter per call (adapter={name!r})"
                    )
                if cfg.mode == "lora" and cfg.variant == "dora":
                    raise AdapterError(
                        f"adapter {name!r} is DoRA, which PEFT cannot mix within a batch; caption with one "
                        f"adapter per call (adapter={name!r})"
                    )

    def caption(
        self, images: list, adapter: Union[str, list[str], None] = None, prompt: Optional[str] = None, **decoding: Any
    ) -> list[str]:
        """One caption per image.

        Args:
            images: PIL images.
            adapter: an adapter name for the whole request; a list with one name per image (a mixed batch,
                `"__base__"` for the base model alone); None: the active adapter.
            prompt: the user turn (default: the adapter's recipe's data.prompt).
            decoding: max_new_tokens, num_beams, batch_size (default: the recipe's eval section).
        Raises:
            AdapterError: an unknown adapter, a list of the wrong length, or adapters that cannot share a batch.
        """
        from vlm_tune.generate import caption_images

        if isinstance(adapter, str):
            self.use(adapter)
        per_image = list(adapter) if isinstance(adapter, (list, tuple)) else None
        if per_image is not None:
            if len(per_image) != len(images):
                raise AdapterError(f"adapter: {len(per_image)} names for {len(images)} images; give one per image")
            self._check_names(per_image)
            self.check_mixed_batch()
        active = adapter if isinstance(adapter, str) else self.model.active_adapter
        recipe = self.recipes.get(active, next(iter(self.recipes.values())))
        return caption_images(self.model, self.processor, images, recipe, prompt, adapters=per_image, **decoding)
