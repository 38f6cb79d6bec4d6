"""vlm_tune: component-aware fine-tuning of vision-language models."""

from vlm_tune.recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "load_model", "apply_targeting"]


def __getattr__(name):  # heavy imports (torch, transformers) only when the model API is used
    if name == "load_model":
        from vlm_tune.model.load import load_model

        return load_model
    if name == "apply_targeting":
        from vlm_tune.model.targeting import apply_targeting

        return apply_targeting
    raise AttributeError(f"module 'vlm_tune' has no attribute {name!r}")
