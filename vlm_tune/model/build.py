"""The one way to build a model: load -> components -> targeting -> relevance -> parameter groups -> weights.

Training, evaluation, export and generation call `build_model` (through `load_for_inference`,
`load_for_export`, `load_exported`); nothing else strings these steps together. Components are found once,
at load (on the empty skeleton for 4-bit loading), and every later step reads that map.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

from vlm_tune.model.components import ComponentMap, find_components
from vlm_tune.model.report import TargetingReport
from vlm_tune.recipe import Recipe


@dataclass
class BuiltModel:
    """What `build_model` returns.

    Attributes:
        model: the PeftModel, or a RelevanceWrapper (relevance.enabled) or SoftPromptWrapper (language mode prompt
            / prefix) around it; the bare transformers model when built with training=False and no checkpoint.
        processor: the model's processor.
        components: the ComponentMap (None only for a bare model whose components cannot be found).
        report: what trains, per component, the relevance row included (None for the bare model).
        groups: AdamW parameter groups, one per report row with trainable parameters, the relevance group
            (named RELEVANCE_GROUP) last ([] when not training).
    """

    model: nn.Module
    processor: Any
    components: Optional[ComponentMap]
    report: Optional[TargetingReport]
    groups: list[dict]


def build_model(recipe: Recipe, *, checkpoint: Optional[str | Path] = None, training: bool = True) -> BuiltModel:
    """Build the recipe's model: the base model with its targeting and relevance modules, and trained weights.

    Args:
        recipe: the run's recipe (model, components, relevance; train.lr / weight_decay / mixed_precision
            for the parameter groups).
        checkpoint: trained weights to load: a `checkpoint-N` folder, a run folder (its newest complete
            checkpoint) or an adapter export; None keeps the fresh adapter (training) or the base model
            (training=False).
        training: build parameter groups, with fp32 master weights of what trains under mixed precision.
    Returns:
        The `BuiltModel` (train / eval mode left as loaded: `load_for_inference` sets eval mode).
    Raises:
        LoadError, ComponentError, TargetingError: the model or the component policy cannot be used.
        RelevanceError: relevance.enabled on a family without relevance wiring.
        SoftPromptError: language mode prompt / prefix on a family where it is not checked.
        InitError: `init: loftq` finds no 16-bit weight of a layer in the base model's safetensors.
        CheckpointError: the checkpoint is missing, incomplete, or does not fit the recipe's model.
    """
    from vlm_tune.checkpoint_load import load_weights
    from vlm_tune.exported import weights_folder
    from vlm_tune.model.load import load_vlm
    from vlm_tune.model.speed import apply_speed
    from vlm_tune.model.targeting import apply_targeting, param_groups

    if checkpoint is not None:
        checkpoint = weights_folder(checkpoint)  # fail before loading a large model
    loaded = load_vlm(recipe.model, recipe.components)
    if not training and checkpoint is None:
        return BuiltModel(loaded.model, loaded.processor, loaded.components, None, [])
    components = loaded.components
    if components is None:  # a 16-bit model whose components were not found: this raises, naming the fix
        components = find_components(loaded.model, recipe.components)
    model, report = apply_targeting(loaded.model, recipe.components, component_map=components)
    if training:  # chunked loss, padding tiles, checkpointing per component (each computes the same result)
        apply_speed(model, recipe.speed, recipe.model, components, autocast=recipe.train.mixed_precision != "no")
    if recipe.relevance.enabled:
        from vlm_tune.relevance import attach_relevance, relevance_row

        model = attach_relevance(model, recipe.relevance, components)
        report.add_row(*relevance_row(model, recipe.relevance, recipe.train.lr))
    language = recipe.component("language")
    if language.mode in ("prompt", "prefix"):  # virtual tokens for the decoder, their own parameter group
        from vlm_tune.model.soft_prompt import attach_soft_prompt, report_soft_prompt

        model = attach_soft_prompt(model, language, components, loaded.processor, recipe.train.seed)
        report_soft_prompt(report, model)
    groups = param_groups(model, report, recipe.train.lr, recipe.train.weight_decay) if training else []
    if training and recipe.train.mixed_precision != "no":
        _fp32_masters(groups)
    if checkpoint is not None:  # after the fp32 cast, so fp32 checkpoint weights are not rounded through 16 bit
        load_weights(model, checkpoint, components)
    return BuiltModel(model, loaded.processor, components, report, groups)


def _fp32_masters(groups: list[dict]) -> None:
    """Autocast computes in 16 bit; the weights that train stay fp32 (the same Parameter objects)."""
    for group in groups:
        for param in group["params"]:
            param.data = param.data.float()


def load_for_inference(recipe: Recipe, checkpoint: Optional[str | Path] = None) -> tuple[nn.Module, Any]:
    """The recipe's model with a checkpoint's trained weights (or the base model), in eval mode, for generation.

    Args:
        recipe: the `Recipe` of the run (same model, components and relevance settings).
        checkpoint: a `checkpoint-N` folder, a run folder (its newest complete checkpoint), or None for the
            base model.
    Returns:
        (model, processor).
    Raises:
        CheckpointError: the checkpoint is missing or incomplete, or does not fit the recipe's model.
    """
    built = build_model(recipe, checkpoint=checkpoint, training=False)
    _batched_vision_attention(built.model, recipe)
    return built.model.eval(), built.processor


def _batched_vision_attention(model: nn.Module, recipe: Recipe) -> None:
    """Generation gets `speed.vision_attention` too (the same result; not for export, which only saves)."""
    if recipe.speed.vision_attention == "batched":
        from vlm_tune.model.vision_attention import install_batched_vision_attention

        install_batched_vision_attention(model)


def load_for_export(recipe: Recipe, checkpoint: str | Path, dtype: Optional[str] = None) -> BuiltModel:
    """The recipe's model with a checkpoint's trained weights on its 16-bit base, in eval mode, for merging.

    The base is reloaded from its original weights in `dtype`, whatever `model.quantization` says: merged into
    4-bit weights, a LoRA update mostly rounds away.

    Args:
        recipe: the run's recipe. checkpoint: a checkpoint, run folder or adapter export.
        dtype: bfloat16 / float16 / float32 (default: model.dtype).
    Returns:
        The `BuiltModel` (a PeftModel, or a RelevanceWrapper around one, on 16-bit weights).
    """
    model_cfg = dataclasses.replace(
        recipe.model, quantization=None, dtype=dtype or recipe.model.dtype, gradient_checkpointing=False
    )
    built = build_model(dataclasses.replace(recipe, model=model_cfg), checkpoint=checkpoint, training=False)
    built.model.eval()
    return built


def load_exported(folder: str | Path, overrides: Optional[list[str]] = None) -> tuple[nn.Module, Any, Recipe]:
    """An exported folder (`python -m vlm_tune.export`, merged or not) or any model folder, ready to generate.

    An adapter export loads its base (4-bit when `model.quantization` is set) with the adapter on top; a merged
    export loads as the model itself, with its relevance modules when it has them.

    Args:
        folder: the exported folder. overrides: `a.b=value` strings on top of its recipe (e.g. model.dtype).
    Returns:
        (model in eval mode, processor, the recipe used).
    Raises:
        ExportError: the folder is neither an export nor a model folder.
    """
    from vlm_tune.exported import ExportError, read_export_info, relevance_folder, run_recipe

    folder = Path(folder)
    info = read_export_info(folder)
    if info is not None and not info.merged:
        recipe = run_recipe(folder, overrides)
        model, processor = load_for_inference(recipe, folder)
        return model, processor, recipe
    if info is None and not (folder / "config.json").is_file():
        raise ExportError(
            f"{folder}: not an exported folder ({'no such folder' if not folder.is_dir() else 'no export.json'}); "
            f"give a folder written by python -m vlm_tune.export, or a run with --checkpoint RUN_DIR"
        )
    recipe = _merged_recipe(folder, info.dtype if info else None, overrides)
    built = build_model(recipe, training=False)
    model = built.model
    relevance = relevance_folder(folder)
    if recipe.relevance.enabled and relevance is not None:
        from vlm_tune.relevance import attach_relevance

        components = built.components or find_components(model, recipe.components)
        model = attach_relevance(model, recipe.relevance, components)
        model.load(relevance)
    _batched_vision_attention(model, recipe)
    return model.eval(), built.processor, recipe


def _merged_recipe(folder: Path, dtype: Optional[str], overrides: Optional[list[str]]) -> Recipe:
    """The recipe of a merged export: its training recipe (if any) with the folder as the 16-bit model."""
    import json

    from vlm_tune.exported import RECIPE_FILE, relevance_folder
    from vlm_tune.recipe import recipe_from_dict
    from vlm_tune.recipe_files import apply_overrides, read_recipe_file
    from vlm_tune.relevance import RELEVANCE_CONFIG_FILE

    recipe_file = folder / RECIPE_FILE
    # a model folder without a recipe: the defaults (components are unused without a checkpoint; one that is not
    # frozen keeps the recipe valid)
    raw = read_recipe_file(recipe_file) if recipe_file.is_file() else {"components": {"language": {"mode": "lora"}}}
    raw["model"] = {**raw.get("model", {}), "name_or_path": str(folder), "quantization": None}
    if dtype:
        raw["model"]["dtype"] = dtype
    relevance = relevance_folder(folder)
    raw["relevance"] = json.loads((relevance / RELEVANCE_CONFIG_FILE).read_text()) if relevance else {}
    return recipe_from_dict(apply_overrides(raw, list(overrides or [])), source=str(recipe_file))
