"""Soft prompts for the language decoder: `components.language.mode: prompt | prefix` with `num_virtual_tokens`.

- prompt (prompt tuning): P trained vectors enter the decoder as the first P input tokens. P placeholder ids
  are put into `input_ids` (and every per-token tensor: attention mask, labels, token types, mllama's
  cross-attention mask), so the model still finds its image tokens and computes its positions (Qwen's M-RoPE)
  from the ids; a hook swaps the placeholders' embeddings for the trained vectors.
- prefix (prefix tuning, P-tuning v2): every decoder self-attention layer attends to P trained keys and values
  in front of its own (patches.attend_to_prefix); they carry no position, so nothing else in the model changes.

Why our own wrapper rather than PEFT's prompt learning: PEFT's PromptTuning / PrefixTuning models prepend
embeddings before a VLM merges its image features and computes M-RoPE (and fill a KV cache that gradient
checkpointing drops), and one PEFT model cannot hold a prompt-learning adapter next to the LoRA adapter
of the other components (PeftMixedModel takes LoRA-family tuners only). The wrapper wraps that PeftModel.
Layout (what checkpoints rely on): `wrapper.model` (the PeftModel), `wrapper.soft_prompt` (the parameters;
`soft_prompt.safetensors` + `soft_prompt.json` via `save` / `load`).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from vlm_tune.constants import IGNORE_INDEX
from vlm_tune.errors import VlmTuneError
from vlm_tune.model.patches import attend_to_prefix, virtual_token_embeddings
from vlm_tune.model.wrapping import ModelWrapper, base_model, with_original_prompt

SOFT_PROMPT_FILE = "soft_prompt.safetensors"
SOFT_PROMPT_CONFIG_FILE = "soft_prompt.json"

# model_type -> the soft-prompt modes checked on that family (tests/model/test_soft_prompt.py compares each with
# the same tokens written into the input); a family or mode not listed is refused, naming it.
CHECKED_FAMILIES: dict[str, tuple[str, ...]] = {
    family: ("prompt", "prefix")
    for family in (
        "llava",
        "llava_next",
        "idefics3",
        "smolvlm",
        "qwen2_vl",
        "qwen2_5_vl",
        "mllama",
        "paligemma",
        "gemma3",
        "blip-2",
    )
}

# Per-token batch tensors and what their placeholder positions hold.
_PER_TOKEN_FILL = {
    "attention_mask": 1,
    "labels": IGNORE_INDEX,
    "token_type_ids": 0,
    "mm_token_type_ids": 0,
    "cross_attention_mask": 0,
}


class SoftPromptError(VlmTuneError, ValueError):
    """Soft prompts that cannot be used here (the message names the family, the field and the fix)."""


def check_family(model_type: str, mode: str, attn_implementation: str) -> None:
    """Raises SoftPromptError when `mode` is not checked on this family, or prefix on an unsupported attention."""
    if mode not in CHECKED_FAMILIES.get(model_type, ()):
        checked = sorted(family for family, modes in CHECKED_FAMILIES.items() if mode in modes)
        raise SoftPromptError(
            f"components.language.mode: {mode} is not supported on {model_type} models (checked on: "
            f"{', '.join(checked)}); use mode: lora for the language component"
        )
    if mode == "prefix" and attn_implementation not in ("sdpa", "eager"):
        raise SoftPromptError(
            f"components.language.mode: prefix runs on sdpa or eager attention, not {attn_implementation}; "
            f"set model.attn_implementation: sdpa"
        )


def _self_attention(decoder: nn.Module) -> list[nn.Module]:
    """The decoder's self-attention modules in layer order (mllama's cross-attention layers left out)."""
    return [module for name, module in decoder.named_modules() if re.search(r"layers\.\d+\.self_attn$", name)]


def _sample_tokens(processor, vocab: int, count: int, seed: int) -> torch.Tensor:
    """`count` random ids of ordinary tokens (no special or image tokens): the start of the virtual tokens."""
    tokenizer = getattr(processor, "tokenizer", processor)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (count,), generator=generator)]


class SoftPrompt(nn.Module):
    """The trained virtual tokens: `embeddings` [P, D] (prompt) or `keys` / `values` [L, H_kv, P, hd] (prefix)."""

    def __init__(self, mode: str, start: dict[str, torch.Tensor]):
        super().__init__()
        self.mode = mode
        for name, tensor in start.items():
            self.register_parameter(name, nn.Parameter(tensor.detach().float().clone()))

    def layer(self, index: int):
        """A callable giving layer `index`'s prefix (keys, values) [H_kv, P, hd]."""
        return lambda: (self.keys[index], self.values[index])


def _prefix_start(decoder: nn.Module, attention: list[nn.Module], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keys and values the decoder computes for the sampled tokens: a prefix that starts as real text would."""
    device = next(decoder.parameters()).device
    with torch.no_grad():
        cache = decoder(input_ids=ids[None].to(device), use_cache=True).past_key_values
    layers = [cache.layers[module.layer_idx] for module in attention]
    return {
        "keys": torch.stack([layer.keys[0] for layer in layers]),  # [L, H_kv, P, hd]
        "values": torch.stack([layer.values[0] for layer in layers]),
    }


class SoftPromptWrapper(ModelWrapper):
    """A VLM whose language decoder reads trained virtual tokens; `forward` / `generate` behave like the model's.

    Attributes:
        model: the wrapped model (a PeftModel). soft_prompt: the `SoftPrompt`.
        settings: {"mode", "num_virtual_tokens", "model_type"} (saved as soft_prompt.json).
    """

    def __init__(self, model: nn.Module, soft_prompt: SoftPrompt, settings: dict, placeholder_id: int):
        super().__init__()
        self.model = model
        self.soft_prompt = soft_prompt
        self.settings = settings
        self.placeholder_id = placeholder_id

    def _with_virtual_tokens(self, batch: dict):
        """(batch with P placeholders before each row's first token, a context swapping in their embeddings)."""
        if self.soft_prompt.mode != "prompt":
            return batch, contextlib.nullcontext()
        batch, virtual, slot = insert_placeholders(batch, self.settings["num_virtual_tokens"], self.placeholder_id)
        values = self.soft_prompt.embeddings[slot]  # [B, T + P, D]
        embedding = base_model(self.model).get_input_embeddings()
        return batch, virtual_token_embeddings(embedding, virtual, values)

    def forward(self, **batch):
        """The wrapped model's forward with the virtual tokens (prompt mode: logits cover them too)."""
        batch, context = self._with_virtual_tokens(batch)
        with context:
            return self.model(**batch)

    @torch.no_grad()
    def generate(self, **inputs):
        """The wrapped model's `generate` with the virtual tokens; returns the original `input_ids` + new tokens."""
        if self.soft_prompt.mode != "prompt":
            return self.model.generate(**inputs)
        prepared, context = self._with_virtual_tokens(inputs)
        with context:
            output = self.model.generate(**prepared)
        return with_original_prompt(output, inputs["input_ids"], prepared["input_ids"].shape[1])

    def save(self, folder: str | Path) -> Path:
        """Write the virtual tokens (`soft_prompt.safetensors`) and their settings (`soft_prompt.json`)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().contiguous().cpu() for key, value in self.soft_prompt.state_dict().items()}
        save_file(state, str(folder / SOFT_PROMPT_FILE))
        (folder / SOFT_PROMPT_CONFIG_FILE).write_text(json.dumps(self.settings, indent=2))
        return folder / SOFT_PROMPT_FILE

    def load(self, folder: str | Path) -> None:
        """Load virtual tokens written by `save`.

        Raises:
            SoftPromptError: the folder has none, or they were trained with another mode or token count.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        settings_file = folder / SOFT_PROMPT_CONFIG_FILE
        if not settings_file.is_file() or not (folder / SOFT_PROMPT_FILE).is_file():
            raise SoftPromptError(
                f"{folder}: no soft prompt; was it trained with components.language.mode prompt / prefix?"
            )
        saved = json.loads(settings_file.read_text())
        changed = [f"{k}={saved.get(k)!r} (recipe: {v!r})" for k, v in self.settings.items() if saved.get(k) != v]
        if changed:
            raise SoftPromptError(f"{folder}: soft prompt trained with {', '.join(changed)}; use the run's settings")
        device = str(next(self.soft_prompt.parameters()).device)
        self.soft_prompt.load_state_dict(load_file(str(folder / SOFT_PROMPT_FILE), device=device))


def insert_placeholders(batch: dict, count: int, placeholder_id: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Put `count` placeholder tokens before each row's first attended token (after any left padding).

    Returns:
        (the batch with every per-token tensor [B, T, ...] grown to [B, T + P, ...], virtual [B, T + P] bool,
        slot [B, T + P] long: which virtual token a position holds (0 elsewhere)).
    """
    input_ids = batch["input_ids"]  # [B, T]
    rows, length = input_ids.shape
    mask = batch.get("attention_mask")
    start = (mask.cumsum(1) == 0).sum(1) if mask is not None else torch.zeros(rows, dtype=torch.long)  # [B]
    position = torch.arange(length + count, device=input_ids.device)[None]  # [1, T + P]
    start = start.to(input_ids.device)[:, None]
    virtual = (position >= start) & (position < start + count)  # [B, T + P]
    source = torch.where(position < start, position, position - count).clamp(min=0)  # old position of each new one
    out = dict(batch)
    fills = {"input_ids": placeholder_id, **_PER_TOKEN_FILL}
    for key, fill in fills.items():
        value = batch.get(key)
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[:2] != (rows, length):
            continue
        index = source.reshape(rows, length + count, *([1] * (value.dim() - 2))).expand(-1, -1, *value.shape[2:])
        grown = value.gather(1, index)
        out[key] = grown.masked_fill(virtual.reshape(index.shape[:2] + (1,) * (value.dim() - 2)), fill)
    slot = (position - start).clamp(0, count - 1)
    return out, virtual, slot


def attach_soft_prompt(model: nn.Module, cfg, components, processor, seed: int) -> SoftPromptWrapper:
    """Wrap `model` (from apply_targeting) with trained virtual tokens for its language decoder.

    Args:
        model: the PeftModel. cfg: the language component's ComponentConfig (mode, num_virtual_tokens).
        components: the ComponentMap (its model_type picks the checks). processor: gives the ordinary tokens
            the virtual tokens start from. seed: their draw.
    Raises:
        SoftPromptError: the family or its attention cannot take this mode.
    """
    base = base_model(model)
    decoder = base.get_decoder()
    attention = _self_attention(decoder)
    check_family(components.model_type, cfg.mode, attention[0].config._attn_implementation if attention else "?")
    embedding = base.get_input_embeddings()
    ids = _sample_tokens(processor, embedding.weight.shape[0], cfg.num_virtual_tokens, seed)
    if cfg.mode == "prompt":
        with torch.no_grad():
            start = {"embeddings": embedding(ids.to(embedding.weight.device))}  # [P, D]
    else:
        start = _prefix_start(decoder, attention, ids)
    soft_prompt = SoftPrompt(cfg.mode, start).to(embedding.weight.device)
    if cfg.mode == "prefix":
        attend_to_prefix(attention, [soft_prompt.layer(index) for index in range(len(attention))])
    tokenizer = getattr(processor, "tokenizer", processor)
    settings = {"mode": cfg.mode, "num_virtual_tokens": cfg.num_virtual_tokens, "model_type": components.model_type}
    wrapper = SoftPromptWrapper(model, soft_prompt, settings, placeholder_id=tokenizer.pad_token_id)
    wrapper.train(model.training)
    return wrapper


def report_soft_prompt(report, wrapper: SoftPromptWrapper) -> None:
    """Make the language row of the targeting report count the virtual tokens (their own parameter group)."""
    names = [name for name, _ in wrapper.named_parameters() if name.startswith("soft_prompt.")]
    count = sum(param.numel() for param in wrapper.soft_prompt.parameters())
    report.total_params += count
    row = next(row for row in report.rows if row.component == "language")
    row.trainable_params, row.total_params = count, row.total_params + count
    row.modules_wrapped, row.saved_as = wrapper.settings["num_virtual_tokens"], SOFT_PROMPT_FILE
    report.param_names["language"] = names
    for other in report.rows:
        other.share = other.trainable_params / max(report.total_params, 1)
