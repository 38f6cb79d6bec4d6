"""Relevance: choose, per image and prompt, which visual tokens the language model reads.

knowing (three scores per token) -> balancing (opponent-pair combination) -> attending (K per image),
placed after the projector and before the language model, trained fully next to LoRA.

Public API:
    attach_relevance(model, relevance_cfg, component_map) -> RelevanceWrapper
        wrapper.forward(**batch), wrapper.generate(**inputs); wrapper.model is the wrapped model
        (save its adapter with wrapper.model.save_pretrained), wrapper.relevance the modules.
    relevance_row(wrapper, cfg, default_lr) -> (ComponentRow, param_names)
    save_relevance(wrapper, folder, cfg), load_relevance(wrapper, folder)
    keep_count(keep, num_tokens) -> K
    WIRINGS                                     supported model types
"""

from vlm_tune.relevance.attending import keep_count
from vlm_tune.relevance.integrate import WIRINGS
from vlm_tune.relevance.wrapper import (
    RELEVANCE_FILE,
    RelevanceModules,
    RelevanceWrapper,
    attach_relevance,
    load_relevance,
    relevance_row,
    save_relevance,
)

__all__ = [
    "attach_relevance",
    "relevance_row",
    "save_relevance",
    "load_relevance",
    "keep_count",
    "WIRINGS",
    "RelevanceWrapper",
    "RelevanceModules",
    "RELEVANCE_FILE",
]
