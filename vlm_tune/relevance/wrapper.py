"""The relevance wrapper: knowing -> balancing -> attending between the projector and the language model.

`attach_relevance` wraps a (PEFT) vision-language model; the wrapper's `forward(**batch)` and
`generate(**inputs)` behave like the model's, but the language model receives only the selected visual
tokens. Layout of the wrapper (what checkpoints rely on):

- `wrapper.model`: the wrapped model as given (a `peft.PeftModel` or a transformers model); save the
  adapter with `wrapper.model.save_pretrained(...)`;
- `wrapper.relevance`: the relevance modules (`knowing`, `balancing`, `attending`); their state-dict
  keys start with `relevance.`; `wrapper.save(folder)` / `wrapper.load(folder)` write and read them
  (`relevance.safetensors`) with the settings they were built with (`relevance.json`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from vlm_tune.constants import RELEVANCE_GROUP
from vlm_tune.model.wrapping import ModelWrapper, base_model, with_original_prompt
from vlm_tune.recipe import RelevanceConfig
from vlm_tune.relevance.attending import Attending, Selection, keep_count, select_pool, select_random
from vlm_tune.relevance.balancing import Balancing
from vlm_tune.relevance.errors import RelevanceError, RelevanceWeightsMissing
from vlm_tune.relevance.integrate import wiring_for
from vlm_tune.relevance.knowing import Knowing
from vlm_tune.relevance.sequence import VisualTokens

RELEVANCE_FILE = "relevance.safetensors"
RELEVANCE_CONFIG_FILE = "relevance.json"


class RelevanceModules(nn.Module):
    """The selection step as one module: scores (knowing), combination (balancing), budget (attending).

    With `method` random or pool the module holds no scoring parameters (only the summary marker when
    `summary_token` is set) and applies that baseline at the same budget.
    """

    def __init__(self, cfg: RelevanceConfig, visual_size: int, text_size: int):
        """Args: cfg: the recipe's relevance section; visual_size / text_size: widths of the visual
        tokens and prompt embeddings (both the language model's width in supported families)."""
        super().__init__()
        self.keep = cfg.keep
        self.method = cfg.method
        self.summary_token = cfg.summary_token
        if cfg.method == "relevance":
            self.knowing = Knowing(visual_size, text_size, cfg.hidden_size)
            self.balancing = Balancing(cfg.hidden_size)
            self.attending = Attending(visual_size, cfg.temperature, cfg.summary_token, cfg.exploration)
        elif cfg.summary_token and cfg.method == "random":
            self.summary_embedding = nn.Parameter(torch.zeros(visual_size))  # same marker as `Attending`

    def counts(self, valid: torch.Tensor) -> torch.Tensor:
        """Tokens kept by each image: [U] long, from `keep` and the image's token count.

        With `summary_token`, the summary takes one of the budget's slots (K - 1 kept + 1 summary) when the
        budget has room for it (K >= 2 and tokens dropped), so the language model still reads K tokens.
        """
        sizes = [int(n) for n in valid.sum(-1).tolist()]
        budgets = [keep_count(self.keep, n) for n in sizes]
        if self.summary_token:
            budgets = [k - 1 if 2 <= k < n else k for k, n in zip(budgets, sizes)]
        return torch.tensor(budgets, device=valid.device)

    def forward(self, tokens: VisualTokens, prompt: torch.Tensor, prompt_valid: torch.Tensor) -> Selection:
        """Select the visual tokens of every image.

        Args:
            tokens: the batch's visual tokens per image ([U, N, D]).
            prompt: [U, L, E] prompt embeddings of each image's sample. prompt_valid: [U, L] bool.
        Returns:
            The `Selection` the wiring applies to the sequence.
        """
        counts = self.counts(tokens.valid)  # [U]
        if self.method == "random":
            selection = select_random(tokens.features, tokens.valid, counts, self.summary_token)
            if self.summary_token:
                marker = self.summary_embedding.to(selection.values.dtype)
                at_summary = selection.slots == selection.summary_slot[:, None]  # [U, S]
                selection.values = selection.values + (at_summary & selection.slot_valid)[..., None] * marker
            return selection
        if self.method == "pool":
            return select_pool(tokens.features, tokens.valid, counts, tokens.grids)
        # The scores read the features without pushing gradients into the vision side, in float32 even under
        # mixed precision: bf16 rounds the small differences between an image's tokens away (measured: flat
        # coupling scores, and gradients 300x the model's that starved it through the shared clipping norm).
        with torch.autocast(device_type=tokens.features.device.type, enabled=False):
            scores = self.knowing(
                tokens.features.detach().float(), tokens.valid, prompt.float(), prompt_valid, tokens.grids
            )
            relevance = self.balancing(scores, tokens.valid)  # [U, N] float32
        return self.attending(relevance, tokens.features, tokens.valid, counts)


class RelevanceWrapper(ModelWrapper):
    """A vision-language model whose language model reads only the selected visual tokens.

    Attributes:
        model: the wrapped model (PEFT or transformers); `model.save_pretrained` saves its adapter.
        relevance: the `RelevanceModules`.
        settings: the recipe's relevance section the modules were built with (saved as `relevance.json`).
        last_selection: the `Selection` of the last call (with `last_unit_sample`, the sample of each image).
    """

    def __init__(self, model: nn.Module, relevance: RelevanceModules, wiring, settings: RelevanceConfig):
        super().__init__()
        self.model = model
        self.relevance = relevance
        self.wiring = wiring
        self.settings = settings
        self.last_selection: Optional[Selection] = None
        self.last_unit_sample: Optional[torch.Tensor] = None

    def _prepare(self, batch: dict, generating: bool):
        prepared = self.wiring.prepare(batch, self.relevance, generating)
        self.last_selection, self.last_unit_sample = prepared.selection, prepared.unit_sample
        return prepared

    def forward(self, **batch):
        """The wrapped model's forward on the selected visual tokens.

        Args:
            batch: processor outputs (+ `labels`), as the data collator produces them.
        Returns:
            The model's output (`.loss`, `.logits`). Logits cover the shortened sequence (placeholder
            families); they equal the unwrapped model's when every token is kept.
        """
        if not self.wiring.has_images(batch):
            return self.model(**batch)
        prepared = self._prepare(batch, generating=False)
        with prepared.context():
            return self.model(**prepared.model_inputs)

    @torch.no_grad()
    def generate(self, **inputs):
        """The wrapped model's `generate` on the selected visual tokens.

        Args:
            inputs: processor outputs plus generation keyword arguments (max_new_tokens, num_beams...).
        Returns:
            Like `model.generate`: the original `input_ids` followed by the new tokens (or an output
            object whose `.sequences` are so built, with `return_dict_in_generate=True`).
        """
        if not self.wiring.has_images(inputs):
            return self.model.generate(**inputs)
        prepared = self._prepare(inputs, generating=True)
        with prepared.context():
            output = self.model.generate(**prepared.model_inputs)
        return with_original_prompt(output, inputs["input_ids"], prepared.model_inputs["input_ids"].shape[1])

    def save(self, folder: str | Path, state: Optional[dict[str, torch.Tensor]] = None) -> Path:
        """Write the relevance modules' weights (`relevance.safetensors`) and settings (`relevance.json`).

        Args:
            folder: where to write them.
            state: their weights gathered from a sharded (FSDP) model, keyed as `relevance.state_dict()`;
                None reads them from the modules.
        Returns:
            The weights file.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.relevance.state_dict() if state is None else state
        state = {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}
        save_file(state, str(folder / RELEVANCE_FILE))
        (folder / RELEVANCE_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.settings), indent=2))
        return folder / RELEVANCE_FILE

    def load(self, folder: str | Path) -> None:
        """Load weights written by `save` into the relevance modules.

        Raises:
            RelevanceWeightsMissing: the folder has no relevance weights (the run trained without relevance).
            RelevanceError: the weights do not fit the modules (another method, summary_token or hidden_size);
                the message names the settings that differ from the saved `relevance.json`.
        """
        from safetensors.torch import load_file

        path = Path(folder) / RELEVANCE_FILE
        if not path.is_file():
            raise RelevanceWeightsMissing(
                f"{path}: no relevance weights; was this checkpoint trained with relevance.enabled?"
            )
        state = load_file(str(path), device=str(next(self.relevance.parameters(), torch.empty(0)).device))
        expected = self.relevance.state_dict()
        # Checkpoints before FSDP support saved attending.log_sharpness as a scalar; it is now shape [1].
        state = {
            key: value.reshape(1) if value.dim() == 0 and key in expected and expected[key].shape == (1,) else value
            for key, value in state.items()
        }
        problems = _misfits(state, expected)
        if problems:
            raise RelevanceError(
                f"{path}: relevance weights do not fit the recipe's relevance section ({'; '.join(problems[:4])}"
                f"{'...' if len(problems) > 4 else ''}); use the relevance settings the run was trained with"
                f"{_changed_settings(Path(folder) / RELEVANCE_CONFIG_FILE, self.settings)}."
            )
        self.relevance.load_state_dict(state)


def _misfits(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Keys missing from or unexpected in `saved`, and tensors whose shapes differ."""
    problems = [f"missing {key}" for key in expected if key not in saved]
    problems += [f"unexpected {key}" for key in saved if key not in expected]
    problems += [
        f"{key}: saved {tuple(saved[key].shape)}, modules {tuple(value.shape)}"
        for key, value in expected.items()
        if key in saved and saved[key].shape != value.shape
    ]
    return problems


def _changed_settings(config_file: Path, settings: RelevanceConfig) -> str:
    """`: relevance.x=saved (recipe: y), ...` from the saved settings file, or where to find it."""
    if not config_file.is_file():
        return f" (see {config_file})"
    saved = json.loads(config_file.read_text())
    current = dataclasses.asdict(settings)
    changed = [f"relevance.{k}={v!r} (recipe: {current[k]!r})" for k, v in saved.items() if current.get(k, v) != v]
    return f": {', '.join(changed)}" if changed else f" (see {config_file})"


def attach_relevance(model: nn.Module, relevance_cfg: RelevanceConfig, component_map) -> RelevanceWrapper:
    """Wrap `model` so its language model reads only the visual tokens the relevance modules keep.

    Args:
        model: what `apply_targeting` returns (a `peft.PeftModel`) or a bare transformers VLM.
        relevance_cfg: the recipe's `relevance` section (keep, method, summary_token, hidden_size...).
        component_map: from `find_components`; its `model_type` picks the wiring.
    Returns:
        The `RelevanceWrapper` (modules float32, on the model's device, in the model's train/eval mode).
    Raises:
        RelevanceError: the model family has no relevance wiring (the message lists the supported ones).
    """
    base = base_model(model)
    wiring = wiring_for(component_map.model_type, base)
    embedding = base.get_input_embeddings()
    width = embedding.weight.shape[-1]
    modules = RelevanceModules(relevance_cfg, visual_size=width, text_size=width)
    modules.to(device=embedding.weight.device, dtype=torch.float32)
    wrapper = RelevanceWrapper(model, modules, wiring, relevance_cfg)
    wrapper.train(model.training)
    return wrapper


def relevance_row(wrapper: RelevanceWrapper, cfg: RelevanceConfig, default_lr: float):
    """The component-report row of the relevance modules and the names of their parameters.

    Args:
        wrapper: from `attach_relevance`. cfg: the recipe's relevance section.
        default_lr: train.lr, used when `cfg.lr` is unset.
    Returns:
        (ComponentRow, parameter names as in `wrapper.named_parameters()`).
    """
    from vlm_tune.model.targeting import ComponentRow

    names = [name for name, _ in wrapper.named_parameters() if name.startswith("relevance.")]
    trainable = sum(p.numel() for _, p in wrapper.relevance.named_parameters())
    total = sum(p.numel() for p in wrapper.parameters())
    row = ComponentRow(
        component=RELEVANCE_GROUP,
        mode="full",
        rank=None,
        alpha=None,
        modules_wrapped=len(list(wrapper.relevance.children())),
        trainable_params=trainable,
        total_params=trainable,
        share=trainable / max(total, 1),
        detected=False,  # added, not found in the model
        lr=cfg.lr if cfg.lr is not None else default_lr,
        weight_decay=None,
        saved_as=RELEVANCE_FILE,
    )
    return row, names
