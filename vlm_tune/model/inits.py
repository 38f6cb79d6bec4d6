"""Per-component LoRA starts: `init: pissa | olora` (principal directions, PEFT's own layer methods) and
`init: loftq` (the 4-bit quantisation error, computed here).

PEFT sets `init_lora_weights` once per adapter; its layers' `pissa_init` / `olora_init` run here per
component, so a 16-bit vision encoder can start from PiSSA while the decoder starts as plain LoRA.
For LoftQ on an already quantised model PEFT offers `replace_lora_weights_loftq`, but it moves every weight
to a CUDA/XPU device (no CPU), reads only safetensors whose keys are the model's own names (transformers 5
saves several families under their original checkpoint names) and ignores the LoRA scaling alpha / r; the
same step is done here: B A = SVD_r(W - Q(W)) / scaling, with W read from the base model's safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from vlm_tune.errors import VlmTuneError

ADAPTER = "default"


class InitError(VlmTuneError, ValueError):
    """A LoRA start that cannot be computed (the message names components.NAME.init and the fix)."""


def principal_init(layer: nn.Module, method: str) -> None:
    """PiSSA or OLoRA on one PEFT LoRA layer: A, B from the weight's principal directions, the base weight
    keeps the residual (PEFT's `pissa_init` / `olora_init`)."""
    if method == "pissa":
        layer.pissa_init(ADAPTER, "pissa")
    else:
        layer.olora_init(ADAPTER)


# ----------------------------------------------------------------------------------------------
# LoftQ
# ----------------------------------------------------------------------------------------------


def loftq_init(layer: nn.Module, weight: torch.Tensor) -> None:
    """Start a LoRA layer on a 4-bit weight so that Q(W) + scaling * B A is closest (rank r) to W.

    Args:
        layer: a PEFT LoRA layer around a bitsandbytes Linear4bit.
        weight: the layer's 16-bit weight W [out, in].
    """
    from peft.utils.integrations import dequantize_module_weight

    quantized = dequantize_module_weight(layer.get_base_layer()).float()  # Q(W) [out, in]
    residual = weight.to(device=quantized.device, dtype=torch.float32) - quantized
    left, values, right = torch.linalg.svd(residual, full_matrices=False)
    rank, scaling = layer.r[ADAPTER], layer.scaling[ADAPTER]
    root = (values[:rank] / scaling).sqrt()  # [r]
    lora_a, lora_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    lora_a.data = (root[:, None] * right[:rank]).to(lora_a.dtype)  # [r, in]
    lora_b.data = (left[:, :rank] * root).to(lora_b.dtype)  # [out, r]


def quantization_error(layer: nn.Module, weight: torch.Tensor) -> tuple[float, float]:
    """(||W - Q(W)||_F, ||W - (Q(W) + scaling * B A)||_F) of one LoRA layer on a 4-bit weight."""
    from peft.utils.integrations import dequantize_module_weight

    quantized = dequantize_module_weight(layer.get_base_layer()).float()
    weight = weight.to(device=quantized.device, dtype=torch.float32)
    with torch.no_grad():
        update = layer.scaling[ADAPTER] * (layer.lora_B[ADAPTER].weight.float() @ layer.lora_A[ADAPTER].weight.float())
    return float((weight - quantized).norm()), float((weight - quantized - update).norm())


def _weight_files(source: str, revision: Optional[str]) -> list[Path]:
    """The safetensors files of a model folder or a cached hub model."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, revision=revision, local_files_only=True))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


def _shared_suffix(a: list[str], b: list[str]) -> int:
    count = 0
    while count < min(len(a), len(b)) and a[-1 - count] == b[-1 - count]:
        count += 1
    return count


class SixteenBitWeights:
    """The 16-bit weights of a quantised model's Linear layers, read from the safetensors it was loaded from.

    Checkpoint keys need not be the model's names (transformers 5 saves llava, mllama, Qwen-VL... under their
    original layouts and renames at load), so a layer's weight is the tensor of its shape whose key shares the
    longest dotted suffix with the layer's name, ties broken by closeness to the layer's dequantised weight.
    """

    def __init__(self, source: str, revision: Optional[str] = None):
        from safetensors import safe_open

        self.files = _weight_files(source, revision)
        if not self.files:
            raise InitError(
                f"components.*.init: loftq reads the 16-bit weights of the base model, but {source} has no "
                f"safetensors files; save the model with save_pretrained (safetensors), or use init: default"
            )
        self.shapes: dict[str, tuple[Path, tuple[int, ...]]] = {}
        for path in self.files:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if key.endswith(".weight"):
                        self.shapes[key] = (path, tuple(handle.get_slice(key).get_shape()))

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.shapes[key][0]), framework="pt") as handle:
            return handle.get_tensor(key)

    def weight_of(self, name: str, layer: nn.Module) -> torch.Tensor:
        """The 16-bit weight [out, in] of the LoRA layer `layer` at base-model module `name`.

        Raises:
            InitError: no tensor of the layer's shape fits it.
        """
        from peft.utils.integrations import dequantize_module_weight

        base = layer.get_base_layer()
        shape = (base.out_features, base.in_features)
        parts = f"{name}.weight".split(".")
        shared = {key: _shared_suffix(parts, key.split(".")) for key, (_, size) in self.shapes.items() if size == shape}
        best = [key for key, count in shared.items() if count == max(shared.values())]
        quantized = dequantize_module_weight(base).float().cpu()
        candidates = {key: self._read(key) for key in best}  # read once: scored here, the winner returned
        errors = {
            key: float((weight.float() - quantized).norm() / quantized.norm()) for key, weight in candidates.items()
        }
        key = min(errors, key=errors.get) if errors else None
        if key is None or errors[key] > 0.5:  # 4-bit rounding is ~0.1 of the norm; another weight is ~1.4
            raise InitError(
                f"components.*.init: loftq found no 16-bit weight for {name} {list(shape)} in "
                f"{', '.join(str(f) for f in self.files)}; use init: default for this component"
            )
        return candidates[key]
