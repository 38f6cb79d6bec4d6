"""The recipe's `speed` section: the speed and memory levers (applied by vlm_tune/model/speed.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from vlm_tune.constants import COMPONENT_NAMES


@dataclass
class SpeedConfig:
    loss: Literal["chunked", "model"] = field(
        default="chunked",
        metadata={
            "help": "chunked: cross-entropy over the label positions only, a chunk of rows at a time "
            "(no full-vocabulary logits); model: the model's own loss over logits of every position"
        },
    )
    loss_chunk_tokens: int = field(default=1024, metadata={"help": "label positions per chunk of the chunked loss"})
    padding_tiles: Literal["drop", "keep"] = field(
        default="drop",
        metadata={
            "help": "mllama in training: padding tiles' features skip the projector and the cross-attention "
            "keys (same result: they are masked); keep: the model's own path"
        },
    )
    vision_states: Literal["needed", "model"] = field(
        default="needed",
        metadata={
            "help": "mllama: the vision encoders keep only the layer outputs the model reads (5 of 40, and "
            "their last); a frozen tower keeps all to its end otherwise (2.6 GiB for 11B bf16 at batch 4; same "
            "result); model: transformers' encoders"
        },
    )
    padding_read: Literal["early", "model"] = field(
        default="early",
        metadata={
            "help": "mllama on sdpa: the decoder's padding mask is read on the host before the vision tower "
            "is launched, not after it, so the host does not wait for the tower (same attention); model: "
            "transformers reads it in the text model"
        },
    )
    vision_attention: Literal["batched", "model"] = field(
        default="batched",
        metadata={
            "help": "Qwen2-VL / Qwen2.5-VL vision towers on sdpa: the images' and windows' attention in one call "
            "per segment length (same result); model: transformers' one call per image or window"
        },
    )
    lora_input: Literal["autocast", "fp32"] = field(
        default="autocast",
        metadata={
            "help": "under mixed precision, LoRA layers hand their 16-bit input to autocast as it is (same "
            "products); fp32: PEFT's cast of it to the fp32 trained weights first (a copy per layer and its backward)"
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "training batches reach the model as one row of their real tokens, each sample attending to "
            "itself (same loss); LLaVA, LLaVA-NeXT, Idefics3 (SmolVLM-Instruct), Qwen2-VL / Qwen2.5-VL"
        },
    )
    liger_kernel: bool = field(
        default=False,
        metadata={
            "help": "CUDA: the language decoder's RMSNorms, gated MLPs (SwiGLU / GeGLU) and RoPE run liger-kernel's "
            "Triton kernels (pip install liger-kernel); LLaVA, LLaVA-NeXT, Idefics3 / SmolVLM, Qwen2-VL / "
            "Qwen2.5-VL, mllama, PaliGemma, Gemma 3"
        },
    )
    checkpoint_components: list[str] = field(
        default_factory=lambda: list(COMPONENT_NAMES),
        metadata={"help": "with model.gradient_checkpointing: the components whose layers recompute activations"},
    )
    checkpoint_every: int = field(
        default=1, metadata={"help": "with model.gradient_checkpointing: recompute every n-th layer of a component"}
    )
    activation_budget_gib: Optional[float] = field(
        default=None,
        metadata={
            "help": "with model.gradient_checkpointing: recompute only as many layers (those saving the most first) "
            "as keep the first batch's saved activations under this many GiB; null: every chosen layer"
        },
    )
    vision_cache_gib: float = field(
        default=0.0,
        metadata={
            "help": "Qwen2-VL / Qwen2.5-VL with vision and projector frozen: keep up to this many GiB of CPU memory "
            "of each image's vision features (and pixels, to check a match) for its next epochs; 0: off"
        },
    )
    offload_activations: bool = field(
        default=False,
        metadata={
            "help": "with model.gradient_checkpointing: hold each checkpointed layer's input in pinned CPU memory "
            "until its backward (frees layers x batch x tokens x hidden bytes of GPU memory, costs two copies a layer)"
        },
    )
    optimizer: Literal["adamw", "adamw_fused", "paged_adamw_8bit"] = field(
        default="adamw_fused",
        metadata={
            "help": "adamw (torch, foreach), adamw_fused (torch, one fused kernel), "
            "paged_adamw_8bit (bitsandbytes: 8-bit states, paged to CPU memory under pressure)"
        },
    )

    compile: Literal["none", "layers"] = field(
        default="none",
        metadata={
            "help": "layers: torch.compile each repeated transformer block (decoder layers; vision and "
            "cross-attention layers when on the gradient path), one graph shared by the layers of a class; "
            "training only, evaluation and generate run eagerly; none: no compilation"
        },
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = field(
        default="default",
        metadata={"help": "with compile: layers, torch.compile's mode (max-autotune: longer compile, tuned kernels)"},
    )
    compile_components: list[str] = field(
        default_factory=lambda: list(COMPONENT_NAMES),
        metadata={"help": "with compile: layers, the components whose layers are compiled"},
    )

    def _check(self) -> list[str]:
        errors = [
            f"{setting}: unknown component '{name}', expected one of {list(COMPONENT_NAMES)}"
            for setting, names in (
                ("compile_components", self.compile_components),
                ("checkpoint_components", self.checkpoint_components),
            )
            for name in names
            if name not in COMPONENT_NAMES
        ]
        if self.checkpoint_every <= 0:
            errors.append(f"checkpoint_every: must be a positive integer, got {self.checkpoint_every}")
        if self.activation_budget_gib is not None and self.activation_budget_gib <= 0:
            errors.append(f"activation_budget_gib: must be a positive number of GiB, got {self.activation_budget_gib}")
        if self.vision_cache_gib < 0:
            errors.append(f"vision_cache_gib: must be 0 (off) or a positive number of GiB, got {self.vision_cache_gib}")
        if self.loss_chunk_tokens <= 0:
            errors.append(f"loss_chunk_tokens: must be a positive integer, got {self.loss_chunk_tokens}")
        return errors


def speed_problems(speed: SpeedConfig, components: dict, relevance_enabled: bool, checkpointing: bool) -> list[str]:
    """What `speed.compile: layers`, `speed.offload_activations`, `speed.activation_budget_gib`,
    `speed.vision_cache_gib`, `speed.padding_free` and `speed.liger_kernel` cannot be combined with (one message per
    conflict, naming the fields)."""
    problems = []
    if speed.offload_activations and not checkpointing:
        problems.append(
            "speed.offload_activations: offloads the inputs of checkpointed layers; set "
            "model.gradient_checkpointing: true, or speed.offload_activations: false"
        )
    if speed.activation_budget_gib is not None and not checkpointing:
        problems.append(
            "speed.activation_budget_gib: chooses which checkpointed layers recompute; set "
            "model.gradient_checkpointing: true, or speed.activation_budget_gib: null"
        )
    if speed.activation_budget_gib is not None and speed.compile != "none":
        problems.append(
            "speed.activation_budget_gib is not checked with speed.compile: layers (its probe counts saved tensors "
            "outside compiled graphs); set one of them off"
        )
    for name in ("vision", "projector"):
        if speed.vision_cache_gib > 0 and name in components and components[name].mode != "frozen":
            problems.append(
                f"speed.vision_cache_gib keeps frozen vision features; components.{name} is "
                f"{components[name].mode} (set it to frozen, or speed.vision_cache_gib: 0)"
            )
    if speed.padding_free and relevance_enabled:
        problems.append("speed.padding_free: relevance scores each sample's own rows; set speed.padding_free: false")
    for name, component in components.items():
        if speed.padding_free and component.mode in ("prompt", "prefix"):
            problems.append(
                f"speed.padding_free does not combine with components.{name} mode {component.mode} (virtual tokens "
                "in front of each sample); set speed.padding_free: false"
            )
    if speed.compile == "none":
        return problems
    if speed.liger_kernel:
        problems.append(
            "speed.liger_kernel does not combine with speed.compile: layers (torch.compile fuses the same norms and "
            "MLP products); set speed.liger_kernel: false or speed.compile: none"
        )
    if relevance_enabled:
        problems.append("speed.compile: layers is not checked with relevance.enabled; set speed.compile: none")
    for name, component in components.items():
        if component.mode in ("prompt", "prefix") or component.variant == "adalora":
            what = f"mode {component.mode}" if component.mode in ("prompt", "prefix") else "variant adalora"
            problems.append(
                f"speed.compile: layers does not combine with components.{name} {what} (virtual tokens / rank "
                "masks change the layers' inputs between steps); set speed.compile: none or use lora, dora, rslora"
            )
    return problems
