"""Per-architecture wiring: compute the image features once, let the relevance modules select, and
hand the language model a sequence that really holds fewer visual tokens.

Placeholder families (LLaVA, Idefics3 / SmolVLM, Qwen2-VL / Qwen2.5-VL, PaliGemma, Gemma 3) put one
placeholder token per visual token in `input_ids`; here the placeholders of dropped tokens are removed
from `inputs_embeds`, `attention_mask`, `labels`, the position ids (and `token_type_ids`). Every remaining
token keeps the position id it has in the full sequence (Qwen: its M-RoPE (t, h, w) ids from the model's own
`get_rope_index`), so with every token kept the model computes exactly what it computes without the relevance
modules.
Cross-attention families (mllama) are in `cross_attention.py`.

Shapes: B = samples, T = sequence length, D = language-model width, U = images, N = tokens per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch

from vlm_tune.constants import IGNORE_INDEX
from vlm_tune.model.patches import embeds_at_prefill
from vlm_tune.relevance.cross_attention import MllamaWiring
from vlm_tune.relevance.errors import RelevanceError
from vlm_tune.relevance.prepared import PreparedInputs, SelectFn
from vlm_tune.relevance.sequence import (
    full_positions,
    pad_units,
    padding_is_left,
    placeholder_units,
    prompt_mask_of,
    prompt_tokens,
    shorten_sequence,
)


def _as_image_list(output) -> list[torch.Tensor]:
    """Normalise a `get_image_features` result (output object, list or tensor) to a list of [n, D] tensors."""
    features = getattr(output, "pooler_output", output)
    if isinstance(features, torch.Tensor):
        features = list(features) if features.dim() == 3 else [features]
    return [f.reshape(-1, f.shape[-1]) for f in features]


def _square_grid(count: int) -> Optional[tuple[int, int]]:
    side = math.isqrt(count)
    return (side, side) if side * side == count else None


class PlaceholderWiring:
    """Families whose image features fill placeholder tokens in the input sequence."""

    # Batch keys this wiring consumes (turned into inputs_embeds / positions); the rest pass through.
    consumed: tuple[str, ...] = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")
    shortened_keys: tuple[str, ...] = ()  # other per-token batch tensors shortened with the sequence
    generate_takes_embeds = True  # the family's generate accepts inputs_embeds

    def __init__(self, base_model: torch.nn.Module):
        """Args: base_model: the transformers model (under any PEFT wrapper)."""
        self.base = base_model
        config = base_model.config
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = config.image_token_index

    def has_images(self, batch: dict) -> bool:
        """True when the batch carries images to select from."""
        return batch.get("pixel_values") is not None and batch.get("input_ids") is not None

    # --- per-family hooks ----------------------------------------------------------------------------
    def image_features(self, batch: dict) -> list[torch.Tensor]:
        """Features after the projector of each image (selection unit), [n_u, D], in placeholder order."""
        raise NotImplementedError

    def image_grids(self, batch: dict, sizes: list[int]) -> list[Optional[tuple[int, int]]]:
        """(rows, cols) token grid of each image, None when unknown."""
        return [_square_grid(size) for size in sizes]

    def full_position_ids(self, batch: dict, attention_mask: torch.Tensor, generating: bool) -> torch.Tensor:
        """Position ids of the full sequence, as the model itself would compute them ([B, T] or [3, B, T])."""
        return full_positions(attention_mask, generating)

    # --- shared ------------------------------------------------------------------------------------------
    def prepare(self, batch: dict, select: SelectFn, generating: bool) -> PreparedInputs:
        """Select visual tokens and build the shortened model inputs.

        Args:
            batch: processor outputs (+ labels in training).
            select: the relevance modules (or a baseline) as a function.
            generating: build inputs for `generate` (left-aligned, with input_ids) instead of `forward`.
        Returns:
            The `PreparedInputs`.
        """
        input_ids = batch["input_ids"]  # [B, T]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        labels = batch.get("labels")
        visual_mask = input_ids == self.image_token_id  # [B, T]

        units = self.image_features(batch)  # U x [n_u, D]
        sizes = [unit.shape[0] for unit in units]
        samples, unit_positions = placeholder_units(visual_mask, sizes)  # [U, N] positions in the sequence
        tokens = pad_units(units, samples, self.image_grids(batch, sizes))

        embeds = self.base.get_input_embeddings()(input_ids)  # [B, T, D]
        prompt_mask = prompt_mask_of(attention_mask, visual_mask, labels)
        prompt, prompt_valid = prompt_tokens(embeds.detach(), prompt_mask, tokens.unit_sample)  # [U, L, D]
        selection = select(tokens, prompt, prompt_valid)

        per_token = {"position_ids": (self.full_position_ids(batch, attention_mask, generating), 0)}
        if labels is not None:
            per_token["labels"] = (labels, IGNORE_INDEX)
        per_token.update({key: (batch[key], 0) for key in self.shortened_keys if batch.get(key) is not None})
        short = shorten_sequence(
            embeds,
            input_ids,
            attention_mask,
            visual_mask,
            unit_positions,
            tokens.unit_sample,
            selection,
            per_token,
            align_right=generating or padding_is_left(attention_mask),
        )

        inputs = {key: value for key, value in batch.items() if key not in self.consumed}
        inputs.update(attention_mask=short.attention_mask, **short.per_token)
        if not generating:
            inputs["inputs_embeds"] = short.inputs_embeds
            return PreparedInputs(inputs, selection, tokens.unit_sample)
        inputs["input_ids"] = short.input_ids
        if self.generate_takes_embeds:
            inputs["inputs_embeds"] = short.inputs_embeds
            return PreparedInputs(inputs, selection, tokens.unit_sample)
        return PreparedInputs(
            inputs, selection, tokens.unit_sample, context=lambda: embeds_at_prefill(self.base, short.inputs_embeds)
        )


class LlavaWiring(PlaceholderWiring):
    """LLaVA-1.5 style: vision tower + MLP projector, one placeholder per patch."""

    consumed = PlaceholderWiring.consumed + ("image_sizes",)

    def image_features(self, batch: dict) -> list[torch.Tensor]:
        kwargs = {"image_sizes": batch["image_sizes"]} if batch.get("image_sizes") is not None else {}
        return _as_image_list(self.base.get_image_features(pixel_values=batch["pixel_values"], **kwargs))


class Idefics3Wiring(PlaceholderWiring):
    """Idefics3 / SmolVLM: each crop of an image is pixel-shuffled to `image_seq_len` tokens.

    A crop is the selection unit (an image that is not split is one crop), so a fraction `keep` gives the
    same share of every image; a count `keep` applies per crop.
    """

    consumed = PlaceholderWiring.consumed + ("pixel_attention_mask",)

    def crop_tokens(self) -> int:
        """Visual tokens per crop: (image_size / patch_size)^2 / scale_factor^2."""
        vision = self.base.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // self.base.config.scale_factor**2

    def image_features(self, batch: dict) -> list[torch.Tensor]:
        output = self.base.get_image_features(
            pixel_values=batch["pixel_values"], pixel_attention_mask=batch.get("pixel_attention_mask")
        )
        flat = torch.cat(_as_image_list(output))  # [crops * S, D]
        return list(flat.split(self.crop_tokens()))


class QwenVLWiring(PlaceholderWiring):
    """Qwen2-VL / Qwen2.5-VL: merged 2x2 patches; positions are M-RoPE (t, h, w) ids."""

    consumed = PlaceholderWiring.consumed + ("image_grid_thw", "mm_token_type_ids")

    def has_images(self, batch: dict) -> bool:
        if batch.get("pixel_values_videos") is not None:
            raise RelevanceError("relevance: video inputs are not supported; turn relevance off for video data")
        return super().has_images(batch)

    def merge(self) -> int:
        return self.base.config.vision_config.spatial_merge_size

    def image_features(self, batch: dict) -> list[torch.Tensor]:
        output = self.base.get_image_features(
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]
        )
        return _as_image_list(output)

    def image_grids(self, batch: dict, sizes: list[int]) -> list[Optional[tuple[int, int]]]:
        grids = []
        for frames, height, width in batch["image_grid_thw"].tolist():
            grids.append((height // self.merge(), width // self.merge()) if frames == 1 else None)
        return grids

    def full_position_ids(self, batch: dict, attention_mask: torch.Tensor, generating: bool) -> torch.Tensor:
        input_ids = batch["input_ids"]
        token_types = batch.get("mm_token_type_ids")
        if token_types is None:  # older processors: derive it (0 text, 1 image)
            token_types = (input_ids == self.image_token_id).int()
        owner = (
            self.base.model if hasattr(self.base, "model") and hasattr(self.base.model, "get_rope_index") else self.base
        )
        positions, _ = owner.get_rope_index(
            input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=attention_mask,
        )
        return positions  # [3, B, T]


class Gemma3Wiring(PlaceholderWiring):
    """Gemma 3: pooled image tokens attend to each other bidirectionally (`token_type_ids`)."""

    consumed = PlaceholderWiring.consumed + ("token_type_ids",)
    shortened_keys = ("token_type_ids",)
    generate_takes_embeds = False

    def image_features(self, batch: dict) -> list[torch.Tensor]:
        return _as_image_list(self.base.get_image_features(pixel_values=batch["pixel_values"]))


class PaliGemmaWiring(Gemma3Wiring):
    """PaliGemma: image + prompt form a bidirectional prefix (`token_type_ids`); positions count from 1."""

    def full_position_ids(self, batch: dict, attention_mask: torch.Tensor, generating: bool) -> torch.Tensor:
        positions = full_positions(attention_mask, generating)
        return positions if generating else positions + 1  # generate adds the 1 itself


# model_type -> wiring factory. Families not listed here cannot use relevance yet.
WIRINGS: dict[str, Callable[[torch.nn.Module], object]] = {
    "llava": LlavaWiring,
    "idefics3": Idefics3Wiring,
    "smolvlm": Idefics3Wiring,
    "qwen2_vl": QwenVLWiring,
    "qwen2_5_vl": QwenVLWiring,
    "mllama": MllamaWiring,
    "paligemma": PaliGemmaWiring,
    "gemma3": Gemma3Wiring,
}


def wiring_for(model_type: str, base_model: torch.nn.Module):
    """The wiring of one architecture family.

    Raises:
        RelevanceError: the family has no relevance wiring (lists the supported ones).
    """
    if model_type not in WIRINGS:
        raise RelevanceError(
            f"relevance: model type '{model_type}' is not supported; supported: "
            f"{', '.join(sorted(WIRINGS))}. Fix: set relevance.enabled=false for this model."
        )
    return WIRINGS[model_type](base_model)
