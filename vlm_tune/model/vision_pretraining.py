"""Pre-training of the demo model's vision encoder on freshly rendered shapes scenes.

Part of the `vlm_tune:smolvlm-demo` build, so it runs once and is cached with the model. Every patch
token of the encoder learns to name what covers its patch: the colour, kind and size of the shape that
owns most of its pixels (or background), and whether the patch holds a shape's centre (one patch per
shape, which tells shapes apart). Linear heads read the tokens during pre-training and are thrown away
after it. They are factorised (colour apart from kind), so the features
carry each attribute on its own and a held-out colour-kind pair is made of parts the encoder knows.

The scenes are `make_scene("train", i)` for i past the shipped training images: the training
distribution, which never draws a pair of `NOVEL_COMBINATIONS`. A scene equal to one of the val, test
or test_novel images is skipped, so the evaluation images stay unseen.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from torch import nn

from vlm_tune.data.shapes import (
    BACKGROUND,
    COLOURS,
    KINDS,
    NOVEL_COMBINATIONS,
    SIZES,
    SPLIT_SIZES,
    Scene,
    draw_scene,
    make_scene,
)

logger = logging.getLogger("vlm_tune.model")

ATTRIBUTES = {  # the classes of each head; the first three name the shape owning the patch
    "colour": ("background", *sorted(COLOURS)),
    "kind": ("background", *KINDS),
    "size": ("background", *SIZES),
    "centre": ("no", "yes"),  # the patch holds the centre pixel of a shape
}  # a head of the shape count as well made the kind learn slower (object patches 0.63 right against 0.93)
MIN_PIXELS = 6  # a patch names a shape when the shape owns at least this many of its pixels
STEPS, BATCH_SIZE = 400, 32  # the build's pre-training: 400 steps of 32 fresh scenes


def evaluation_scenes() -> frozenset[Scene]:
    """Every scene of the val, test and test_novel splits (pre-training never renders them)."""
    return frozenset(make_scene(split, i) for split in ("val", "test", "test_novel") for i in range(SPLIT_SIZES[split]))


def pretraining_scenes(count: int, held_out: frozenset[Scene]) -> list[Scene]:
    """The first `count` training-distribution scenes past the shipped training images, minus `held_out`.

    Raises:
        AssertionError: a scene holds a held-out colour-kind combination (the renderer changed).
    """
    scenes, index = [], SPLIT_SIZES["train"]
    while len(scenes) < count:
        scene = make_scene("train", index)
        index += 1
        if scene in held_out:
            continue
        assert not any((s.colour, s.kind) in NOVEL_COMBINATIONS for s in scene.shapes), f"novel pair in {scene}"
        scenes.append(scene)
    return scenes


def patch_targets(scene: Scene, grid: int) -> torch.Tensor:
    """Class of each attribute (ATTRIBUTES) for each patch of a grid x grid split of the image: [4, grid * grid].

    A patch takes the colour, kind and size of the shape owning most of its pixels (drawn later wins, as
    in `draw_scene`), or background when no shape owns MIN_PIXELS of them.
    """
    owner = None
    for number, shape in enumerate(scene.shapes, start=1):
        pixels = np.asarray(draw_scene(Scene(scene.layout, scene.arrangement, (shape,))))  # [H, W, 3]
        drawn = (pixels != np.array(BACKGROUND, dtype=pixels.dtype)).any(-1)  # [H, W]
        owner = np.where(drawn, number, 0 if owner is None else owner)
    side = owner.shape[0] // grid
    cells = owner.reshape(grid, side, grid, side).transpose(0, 2, 1, 3).reshape(grid * grid, side * side)
    counts = np.stack([(cells == number).sum(-1) for number in range(len(scene.shapes) + 1)], -1)  # [P, S + 1]
    counts[:, 0] = MIN_PIXELS - 1  # background wins unless a shape owns MIN_PIXELS
    winner = counts.argmax(-1)  # [P]; 0: background, n: scene.shapes[n - 1]
    targets = torch.zeros(len(ATTRIBUTES), grid * grid, dtype=torch.long)
    for number, shape in enumerate(scene.shapes, start=1):
        where = torch.from_numpy(winner == number)
        for row, (name, value) in enumerate((("colour", shape.colour), ("kind", shape.kind), ("size", shape.size))):
            targets[row, where] = ATTRIBUTES[name].index(value)
        targets[3, (shape.y // side) * grid + shape.x // side] = 1
    return targets


class PatchHeads(nn.Module):
    """One linear classifier per attribute (ATTRIBUTES) over each patch token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_size, len(classes)) for classes in ATTRIBUTES.values())

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the attributes, and each attribute's accuracy.

        tokens: [B, P, D] patch tokens; targets: [B, A, P] class indices of the A attributes.
        """
        losses, accuracy = [], []
        for row, head in enumerate(self.heads):
            logits = head(tokens.float())  # [B, P, classes]
            losses.append(nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, row].flatten()))
            accuracy.append((logits.argmax(-1) == targets[:, row]).float().mean())
        return torch.stack(losses).sum(), torch.stack(accuracy)


def _batch(scenes: list[Scene], image_processor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values [B, 3, H, W] (the processor's, as in training) and patch targets [B, A, P] of `scenes`."""
    images = [[draw_scene(scene)] for scene in scenes]  # one image per sample
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"][:, 0]
    return pixel_values, torch.stack([patch_targets(scene, grid) for scene in scenes])


def pretrain_vision_encoder(
    vision_model: nn.Module, image_processor, steps: int = STEPS, batch_size: int = BATCH_SIZE, lr: float = 1e-3
) -> dict[str, float]:
    """Train `vision_model` (an Idefics3-style encoder of square images) to name what each patch shows.

    Uses the global torch generator for the heads' initialisation: call it inside an isolated one
    (`resolve_builtin` builds every model inside `torch.random.fork_rng`).

    Returns:
        The first step's loss, and the last step's loss and patch accuracy of each attribute.
    """
    config = vision_model.config
    grid = config.image_size // config.patch_size
    scenes = pretraining_scenes(steps * batch_size, evaluation_scenes())
    heads = PatchHeads(config.hidden_size)
    parameters = [*vision_model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
    )
    vision_model.train()
    result, first_loss, started = {}, None, time.perf_counter()
    for step in range(steps):
        pixel_values, targets = _batch(scenes[step * batch_size : (step + 1) * batch_size], image_processor, grid)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = vision_model(pixel_values=pixel_values).last_hidden_state  # [B, P, D]
            loss, accuracy = heads(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = loss.item() if first_loss is None else first_loss
        result = {"loss": loss.item(), **{f"{name}_accuracy": a.item() for name, a in zip(ATTRIBUTES, accuracy)}}
        if (step + 1) % 50 == 0 or step + 1 == steps:
            logger.info(
                "vision pre-training step %d/%d (%.0f s): %s",
                step + 1,
                steps,
                time.perf_counter() - started,
                ", ".join(f"{k} {v:.3f}" for k, v in result.items()),
            )
    vision_model.eval()
    return {"first_loss": first_loss, **result}
