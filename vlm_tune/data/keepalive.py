"""Every process's micro-batch reaches the vision side, so multi-process training never hangs on text-only batches.

DDP all-reduces the gradient of every trainable parameter after each backward and waits until all of them
have one. A micro-batch without an image leaves the vision encoder, projector, cross-attention layers (and
relevance modules) out of the graph on that process, and the other processes wait forever (the known
DDP/ZeRO hang). Under FSDP every layer gathers its weights from all processes when it runs, so a vision side
that only some processes run hangs even when it is frozen. The conversation collator then adds
`dummy_sample()`: one tiny image and a one-word exchange whose labels are all ignored, so the loss is unchanged,
those parameters get a (zero) gradient and every process runs the vision side (`needs_dummy_images` says when).
"""

from __future__ import annotations

from PIL import Image

from vlm_tune.recipe import Recipe

VISION_SIDE = ("vision", "projector", "cross_attention")
DUMMY_ID = "<dummy image: no labels>"


def vision_side_trains(recipe: Recipe) -> bool:
    """Whether a parameter that only images reach trains: a vision-side component or the relevance modules."""
    return recipe.relevance.enabled or any(recipe.component(name).mode != "frozen" for name in VISION_SIDE)


def needs_dummy_images(recipe: Recipe, accelerator) -> bool:
    """Whether text-only training micro-batches get the dummy image: with several processes, when a vision side
    trains (DDP waits for its gradients), and always under FSDP (every forward gathers the vision layers'
    weights, frozen or not, and every process must take part; so evaluation batches get it too under FSDP)."""
    from vlm_tune.distributed import is_sharded

    return accelerator.num_processes > 1 and (vision_side_trains(recipe) or is_sharded(accelerator))


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
