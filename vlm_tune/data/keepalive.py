"""Every process's micro-batch reaches the vision side, so multi-process training never hangs on text-only batches.

DDP all-reduces the gradient of every trainable parameter after each backward and waits until all of them
have one. A micro-batch without an image leaves the vision encoder, projector, cross-attention layers (and
relevance modules) out of the graph on that process, and the other processes wait forever (the known
DDP/ZeRO hang). The conversation collator then adds `dummy_sample()`: one tiny image and a one-word exchange
whose labels are all ignored, so the loss is unchanged and those parameters get a (zero) gradient.
"""

from __future__ import annotations

from PIL import Image

from vlm_tune.recipe import Recipe

VISION_SIDE = ("vision", "projector", "cross_attention")
DUMMY_ID = "<dummy image: no labels>"


def vision_side_trains(recipe: Recipe) -> bool:
    """Whether a parameter that only images reach trains: a vision-side component or the relevance modules."""
    return recipe.relevance.enabled or any(recipe.component(name).mode != "frozen" for name in VISION_SIDE)


def dummy_sample() -> dict:
    """A conversation item with one small white image; `"dummy": True` tells the collator to label none of it."""
    return {
        "image_id": DUMMY_ID,
        "images": [Image.new("RGB", (56, 56), "white")],  # 56 px: the smallest input of every family's processor
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "."}]},
        ],
        "answers": ["."],
        "dummy": True,
    }
