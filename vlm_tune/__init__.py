"""vlm_tune: component-aware fine-tuning of vision-language models."""

from vlm_tune.recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "load_model", "apply_targeting", "build_model", "load_for_inference"]

_MODEL_API = {  # heavy imports (torch, transformers) only when the model API is used
    "load_model": "vlm_tune.model.load",
    "apply_targeting": "vlm_tune.model.targeting",
    "build_model": "vlm_tune.model.build",
    "load_for_inference": "vlm_tune.model.build",
}


def __getattr__(name):
    if name in _MODEL_API:
        import importlib

        return getattr(importlib.import_module(_MODEL_API[name]), name)
    raise AttributeError(f"module 'vlm_tune' has no attribute {name!r}")
