"""Load a transformers VLM and its processor in 16-bit or 4-bit (QLoRA), ready for targeting.

What `peft.prepare_model_for_kbit_training` is for, without its pitfalls: it upcasts every
non-quantized parameter to fp32 (a whole 16-bit vision tower) and defaults to re-entrant
checkpointing (which fails on mllama). Here only the norms of quantized components compute in fp32,
checkpointing is non-reentrant, and the vision tower / projector stay 16-bit (`keep_16bit`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from vlm_tune.errors import VlmTuneError
from vlm_tune.model.components import ComponentError, ComponentMap, find_components
from vlm_tune.model.patches import compute_in_fp32, no_cpu_4bit_repacking
from vlm_tune.model.report import param_count
from vlm_tune.recipe import COMPONENT_NAMES, ComponentConfig, ModelConfig, QuantizationConfig

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "vlm_tune:"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class LoadError(VlmTuneError, ValueError):
    """A model that cannot be loaded: bad path, not a VLM, missing dependency (the message says the fix)."""


# ----------------------------------------------------------------------------------------------
# Where the weights are, and which class reads them
# ----------------------------------------------------------------------------------------------


def resolve_source(name_or_path: str) -> str:
    """A local folder or a hub id for `name_or_path` (`vlm_tune:NAME` built-ins become their folder).

    Raises:
        LoadError: a local path that does not exist or holds no config.json.
    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        from vlm_tune.model.builtin import resolve_builtin

        return str(resolve_builtin(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"model.name_or_path: {path} is a file; name the model folder (written by save_pretrained)")
        if not (path / "config.json").is_file():
            raise LoadError(
                f"model.name_or_path: {path} is not a model folder (no config.json); name a folder "
                f"written by save_pretrained, a hub id such as HuggingFaceTB/SmolVLM-256M-Instruct, "
                f"or a built-in such as vlm_tune:smolvlm-demo"
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise LoadError(f"model.name_or_path: no such folder: {path}")
    return name_or_path  # a hub id such as org/name


def _load_config(source: str, cfg: ModelConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "folder" if Path(source).is_dir() else "hub id"
        if _names_custom_code(source, str(exc)) and not cfg.trust_remote_code:
            fix = "The model ships its own code: set model.trust_remote_code: true if you trust it"
        else:
            fix = "Check the name (and network / HF_TOKEN for hub ids), and that transformers knows this model type"
        raise LoadError(
            f"model.name_or_path: cannot read the model config of {where} '{source}': {first_line}. {fix}"
        ) from None


def _names_custom_code(source: str, error: str) -> bool:
    """True when the model's config names code of its own (an `auto_map`), or transformers says it does."""
    if "trust_remote_code=True" in error or "contains custom code" in error:
        return True
    config = Path(source) / "config.json"
    try:
        return config.is_file() and "auto_map" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def vlm_class(config, source: str = "") -> type:
    """The transformers class that loads this config as an image-text-to-text model.

    Raises:
        LoadError: the config describes a model without a vision part (e.g. a text-only LLM).
    """
    import transformers
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = getattr(config, "model_type", "?")
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or (
        getattr(config, "auto_map", None) and "AutoModelForImageTextToText" in config.auto_map
    ):
        return AutoModelForImageTextToText
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:  # a VLM class transformers knows but the auto mapping does not list
        cls = getattr(transformers, name, None)
        if cls is not None and hasattr(config, "vision_config") and "CausalLM" not in name:
            return cls
    classes = ", ".join(architectures) or "no architectures listed"
    raise LoadError(
        f"model.name_or_path: '{source}' holds a {model_type} model ({classes}), not a "
        f"vision-language model. vlm_tune fine-tunes image-text models "
        f"(e.g. llava, idefics3 / SmolVLM, qwen2_5_vl, mllama, paligemma, blip-2, gemma3)"
    )


# ----------------------------------------------------------------------------------------------
# 4-bit quantization
# ----------------------------------------------------------------------------------------------


def _skeleton_components(model_class: type, config, components) -> tuple[ComponentMap, list[str]]:
    """Components (and output head names) of the model, found on an empty (meta-device) instance."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = (
            model_class.from_config(config) if hasattr(model_class, "from_config") else model_class._from_config(config)
        )
    named = {id(m): n for n, m in skeleton.named_modules()}
    heads = [named[id(skeleton.get_output_embeddings())]] if skeleton.get_output_embeddings() is not None else []
    return find_components(skeleton, components), heads


def bnb_config(quant: QuantizationConfig, cmap: ComponentMap, heads: list[str]):
    """A BitsAndBytesConfig for 4-bit weights; `keep_16bit` components and the output head stay unquantized.

    Args:
        quant: the recipe's model.quantization section.
        cmap, heads: the components and output head names of the model (from `_skeleton_components`).
    Raises:
        LoadError: bitsandbytes is not installed.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoadError(
            "model.quantization: 4-bit loading needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes (or pip install 'vlm_tune[quant]'), or remove model.quantization "
            "to load 16-bit weights"
        ) from None
    from transformers import BitsAndBytesConfig

    keep = [m for comp in quant.keep_16bit for m in cmap.modules.get(comp, [])] + heads
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        # anchored at a module boundary: transformers matches these as regex prefixes
        llm_int8_skip_modules=[re.escape(name) + r"(?:\.|$)" for name in keep],
    )


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith(("RMSNorm", "LayerNorm", "Norm"))


def stabilize_norms(model: nn.Module, cmap: ComponentMap, components: list[str]) -> int:
    """Norms of these components keep fp32 weights and compute in fp32 (`patches.compute_in_fp32`).

    Returns the number of norms changed."""
    changed = 0
    for name, module in model.named_modules():
        if _is_norm(module) and cmap.component_of(name) in components and any(True for _ in module.parameters()):
            compute_in_fp32(module)
            changed += 1
    return changed


# ----------------------------------------------------------------------------------------------
# Memory report and the public entry point
# ----------------------------------------------------------------------------------------------


def weight_memory(model: nn.Module, cmap: Optional[ComponentMap]) -> dict[str, dict]:
    """Per component: parameter count, bytes held (4-bit: packed weights + quantization constants), dtypes."""
    usage: dict[str, dict] = {}
    for name, param in model.named_parameters():
        comp = (cmap.component_of(name) if cmap else None) or "other"
        entry = usage.setdefault(comp, {"params": 0, "bytes": 0, "dtypes": set()})
        entry["params"] += param_count(param)
        entry["bytes"] += param.numel() * param.element_size()
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            entry["bytes"] += quant_state.absmax.numel() * quant_state.absmax.element_size()
            entry["dtypes"].add(f"4-bit {quant_state.quant_type}")
        else:
            entry["dtypes"].add(str(param.dtype).removeprefix("torch."))
    order = [*COMPONENT_NAMES, "other"]
    return {comp: usage[comp] for comp in order if comp in usage}


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count} B"


def weight_memory_table(usage: dict[str, dict]) -> str:
    """`weight_memory` as text lines."""
    rows = [(comp, f"{u['params']:,}", _bytes(u["bytes"]), ", ".join(sorted(u["dtypes"]))) for comp, u in usage.items()]
    rows.append(
        ("all", f"{sum(u['params'] for u in usage.values()):,}", _bytes(sum(u["bytes"] for u in usage.values())), "")
    )
    widths = [max(len(r[i]) for r in rows + [("component", "params", "weights", "dtypes")]) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        for r in [("component", "params", "weights", "dtypes"), *rows]
    ]
    return "\n".join(lines)


def _enable_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}  # re-entrant checkpointing fails on mllama's cross-attention
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False


def ensure_pad_token(processor) -> None:
    """Give a tokenizer without a padding token its end-of-sequence token as padding (batches need one).

    Padding positions are masked and carry no loss, so which token pads does not change training.
    Raises:
        LoadError: the tokenizer has neither a padding nor an end-of-sequence token.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise LoadError(
            f"the tokenizer ({type(tokenizer).__name__}) has no padding and no end-of-sequence token; "
            "set tokenizer.pad_token and save the processor into the model folder"
        )
    tokenizer.pad_token = tokenizer.eos_token
    logger.info("The tokenizer has no padding token; padding with its end-of-sequence token %r", tokenizer.eos_token)


def _device_map(quantized: bool):
    if not quantized or not torch.cuda.is_available():
        return None  # 16-bit weights load on CPU; the training loop moves them
    return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}  # 4-bit: place at load


def _load_processor(source: str, model_cfg: ModelConfig):
    """The model's processor, with a padding token.

    Raises:
        LoadError: the folder has no processor files, or a processor without an image processor.
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(
            source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision
        )
    except (OSError, ValueError, TypeError) as exc:
        raise LoadError(
            f"model.name_or_path: cannot load the processor of '{source}' ({str(exc).splitlines()[0]}); "
            f"a model folder needs its processor files (processor.save_pretrained(folder))"
        ) from None
    if not hasattr(processor, "image_processor"):
        raise LoadError(
            f"model.name_or_path: '{source}' has a {type(processor).__name__} but no image processor; "
            f"save the model's full processor (e.g. AutoProcessor) into the folder"
        )
    ensure_pad_token(processor)
    return processor


def _components_or_none(model: nn.Module, components: Optional[dict[str, ComponentConfig]]):
    """The model's components, or None when they cannot be found (a bare model needs none)."""
    try:
        return find_components(model, components)
    except ComponentError:
        return None  # reported with the fix by whoever needs them (targeting), when the recipe asks for them


@dataclass
class LoadedModel:
    """What `load_vlm` returns.

    Attributes:
        model: the transformers model, every parameter frozen.
        processor: its processor (with a padding token).
        components: its ComponentMap, found once (on the empty skeleton for 4-bit loading), or None when a
            16-bit model's components cannot be found (`find_components` on the model then says why).
    """

    model: nn.Module
    processor: Any
    components: Optional[ComponentMap]


def load_vlm(
    model_cfg: ModelConfig, components: Optional[dict[str, ComponentConfig]] = None, verbose: bool = True
) -> LoadedModel:
    """Load a VLM, its processor and its components as the recipe's `model` section says.

    Args:
        model_cfg: name_or_path (hub id, folder or `vlm_tune:NAME`), dtype, attention, quantization,
            gradient checkpointing.
        components: the recipe's components; their `modules` regexes define or override components.
        verbose: print weight memory by component.
    Returns:
        The `LoadedModel`; every parameter frozen (targeting decides what trains).
    Raises:
        LoadError: a path that is not a model, a model that is not a VLM, bitsandbytes missing for 4-bit.
        ComponentError: 4-bit loading cannot tell which modules form the components kept in 16-bit.
    """
    source = resolve_source(model_cfg.name_or_path)
    config = _load_config(source, model_cfg)
    model_class = vlm_class(config, model_cfg.name_or_path)
    processor = _load_processor(source, model_cfg)
    quant = model_cfg.quantization
    kwargs = dict(
        dtype=DTYPES[model_cfg.dtype],
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        revision=model_cfg.revision,
        device_map=_device_map(quant is not None),
    )
    cmap = None
    if quant is not None:  # the skeleton's components name what stays 16-bit; module names do not change at load
        cmap, heads = _skeleton_components(model_class, config, components)
        kwargs["quantization_config"] = bnb_config(quant, cmap, heads)
    model = _from_pretrained(model_class, source, kwargs)
    model.requires_grad_(False)
    if cmap is None:
        cmap = _components_or_none(model, components)
    if quant is not None:
        stabilize_norms(model, cmap, [c for c in COMPONENT_NAMES if c not in quant.keep_16bit])
        no_cpu_4bit_repacking(model)
    if model_cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    if verbose:
        weights = f"4-bit {quant.quant_type}" if quant else model_cfg.dtype
        print(f"Loaded {model.config.model_type} from {source} ({weights})")
        print(weight_memory_table(weight_memory(model, cmap)))
    return LoadedModel(model, processor, cmap)


def _from_pretrained(model_class, source: str, kwargs: dict) -> nn.Module:
    """`from_pretrained`; an attention implementation that cannot run here becomes one line naming the field."""
    try:
        return model_class.from_pretrained(source, **kwargs)
    except (ImportError, ValueError) as exc:
        text = str(exc).strip()
        if "attention" not in text.lower() and "kernel" not in text.lower():
            raise
        raise LoadError(
            f"model.attn_implementation={kwargs['attn_implementation']}: {text.splitlines()[0]} "
            f"(sdpa and eager run everywhere)"
        ) from None


def load_model(
    model_cfg: ModelConfig, components: Optional[dict[str, ComponentConfig]] = None, verbose: bool = True
) -> tuple[nn.Module, object]:
    """Load a VLM and its processor (`load_vlm` without the component map); see `load_vlm`.

    Returns:
        (model, processor); every parameter frozen (targeting decides what trains).
    """
    loaded = load_vlm(model_cfg, components, verbose)
    return loaded.model, loaded.processor
