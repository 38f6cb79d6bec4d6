"""Relevance: choose, per image and prompt, which visual tokens the language model reads.

knowing (three scores per token) -> balancing (opponent-pair combination) -> attending (K per image),
placed after the projector and before the language model, trained fully next to LoRA.

Public API:
    attach_relevance(model, relevance_cfg, component_map) -> RelevanceWrapper
        wrapper.forward(**batch), wrapper.generate(**inputs); wrapper.model is the wrapped model
        (save its adapter with wrapper.model.save_pretrained), wrapper.relevance the modules;
        wrapper.save(folder) / wrapper.load(folder): relevance.safetensors + relevance.json.
    relevance_row(wrapper, cfg, default_lr) -> (ComponentRow, param_names)
    keep_count(keep, num_tokens) -> K
    WIRINGS                                     supported model types
    RELEVANCE_GROUP                             name of the report row and the parameter group
    RelevanceError                              what the modules cannot do, with the fix
"""

from vlm_tune.constants import RELEVANCE_GROUP
from vlm_tune.relevance.attending import keep_count
from vlm_tune.relevance.errors import RelevanceError
from vlm_tune.relevance.integrate import WIRINGS
from vlm_tune.relevance.wrapper import (
    RELEVANCE_CONFIG_FILE,
    RELEVANCE_FILE,
    RelevanceModules,
    RelevanceWrapper,
    attach_relevance,
    relevance_row,
)

__all__ = [
    "attach_relevance",
    "relevance_row",
    "keep_count",
    "WIRINGS",
    "RelevanceWrapper",
    "RelevanceModules",
    "RelevanceError",
    "RELEVANCE_FILE",
    "RELEVANCE_CONFIG_FILE",
    "RELEVANCE_GROUP",
]
