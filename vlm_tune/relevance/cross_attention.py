"""Wiring for cross-attention families (mllama / Llama-3.2-Vision).

The language model reads images through cross-attention layers, so selection shortens the keys and
values those layers see: the kept tokens of every image of a sample become that sample's
`cross_attention_states` [B, S, D], and `cross_attention_mask` gets one column per kept token
([B, T, S, 1], each column copied from the tile the token came from). The text sequence is unchanged.

Shapes: B = samples, T = text length, I = images per sample, G = tiles per image, P = tokens per tile
(patches + class token), D = language-model width, U = images in the batch, S = kept tokens per sample.
"""

from __future__ import annotations

import torch

from vlm_tune.model.patches import mllama_cross_attention_per_token
from vlm_tune.relevance.prepared import PreparedInputs, SelectFn
from vlm_tune.relevance.sequence import VisualTokens, compact, pad_units, prompt_mask_of, prompt_tokens


class MllamaWiring:
    """mllama: select among the tokens of each image's real tiles; feed fewer cross-attention keys."""

    consumed = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")

    def __init__(self, base_model: torch.nn.Module):
        """Args: base_model: MllamaForConditionalGeneration (under any PEFT wrapper)."""
        self.base = base_model
        self.image_token_id = base_model.config.image_token_index

    def has_images(self, batch: dict) -> bool:
        """True when the batch carries images to select from."""
        return batch.get("pixel_values") is not None

    def image_states(self, batch: dict) -> torch.Tensor:
        """Vision model + projector, as the model computes them: [B, I, G, P, D]."""
        inner = self.base.model
        vision = inner.vision_model(
            pixel_values=batch["pixel_values"],
            aspect_ratio_ids=batch["aspect_ratio_ids"],
            aspect_ratio_mask=batch.get("aspect_ratio_mask"),
        )
        return inner.multi_modal_projector(vision.last_hidden_state)  # [B, I, G, P, D]

    def image_units(self, states: torch.Tensor, batch: dict) -> tuple[VisualTokens, torch.Tensor]:
        """One selection unit per real image: the tokens of its real tiles, in order.

        Args:
            states: [B, I, G, P, D] from `image_states`. batch: its `aspect_ratio_mask` [B, I, G] marks real tiles.
        Returns:
            (the units' `VisualTokens` [U, N, D], keys [U, N]: each token's flat index among its sample's keys).
        """
        batch_size, num_images, num_tiles, per_tile, width = states.shape
        tile_mask = batch.get("aspect_ratio_mask")
        if tile_mask is None:
            tile_mask = torch.ones(batch_size, num_images, num_tiles, dtype=torch.long, device=states.device)
        units, samples, unit_keys = [], [], []
        key_index = torch.arange(num_images * num_tiles * per_tile, device=states.device).view(
            num_images, num_tiles, per_tile
        )  # flat key index of every token of a sample
        for sample in range(batch_size):
            for image in range(num_images):
                tiles = tile_mask[sample, image].bool()
                if not bool(tiles.any()):
                    continue
                units.append(states[sample, image, tiles].reshape(-1, width))  # [n_u, D]
                unit_keys.append(key_index[image, tiles].reshape(-1))
                samples.append(sample)
        keys = torch.nn.utils.rnn.pad_sequence(unit_keys, batch_first=True, padding_value=0)  # [U, N]
        return pad_units(units, samples, [None] * len(units)), keys

    def prepare(self, batch: dict, select: SelectFn, generating: bool) -> PreparedInputs:
        """Select each image's tokens and build cross-attention states and mask with one column per token.

        Args:
            batch: processor outputs (+ labels in training).
            select: the relevance modules (or a baseline) as a function.
            generating: inputs for `generate` (the states are injected at the prefill step).
        Returns:
            The `PreparedInputs`; run the call inside its `context`.
        """
        states = self.image_states(batch)  # [B, I, G, P, D]
        batch_size, per_tile, width = states.shape[0], states.shape[3], states.shape[4]
        tokens, keys = self.image_units(states, batch)  # [U, N, D], [U, N]

        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt_mask = prompt_mask_of(attention_mask, input_ids == self.image_token_id, batch.get("labels"))
        embeds = self.base.get_input_embeddings()(input_ids).detach()  # [B, T, D]
        prompt, prompt_valid = prompt_tokens(embeds, prompt_mask, tokens.unit_sample)
        selection = select(tokens, prompt, prompt_valid)

        # Gather every sample's slots (over its images, in order) into [B, S].
        owner = tokens.unit_sample[:, None, None] == torch.arange(batch_size, device=states.device)  # [U, 1, B]
        per_sample = (selection.slot_valid[..., None] & owner).permute(2, 0, 1).reshape(batch_size, -1)  # [B, U*S]
        index, valid = compact(per_sample)  # [B, S']
        values = selection.values.reshape(-1, width)[index]  # [B, S', D]
        slot_keys = torch.gather(keys, 1, selection.slots).reshape(-1)[index]  # [B, S'] flat key of each slot
        cross_states = values * valid[..., None].to(values.dtype)

        # One mask column per kept token, copied from its tile's column.
        tile_of = slot_keys // per_tile  # [B, S'] index into I * G
        text_mask = batch["cross_attention_mask"].flatten(2)  # [B, T, I * G]
        column_mask = torch.gather(text_mask, 2, tile_of[:, None, :].expand(-1, text_mask.shape[1], -1))
        column_mask = column_mask * valid[:, None, :].to(column_mask.dtype)  # [B, T, S']

        inputs = {key: value for key, value in batch.items() if key not in self.consumed}
        inputs["cross_attention_mask"] = column_mask[..., None]  # [B, T, S', 1]
        inputs["attention_mask"] = attention_mask
        if generating:  # generate drops pixel_values after prefill; the patch swaps them for our states
            inputs["pixel_values"] = batch["pixel_values"]
        else:
            inputs["cross_attention_states"] = cross_states
        context = lambda: mllama_cross_attention_per_token(self.base, cross_states)
        return PreparedInputs(inputs, selection, tokens.unit_sample, context=context)
