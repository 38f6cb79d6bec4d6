"""Typed training recipe: a YAML file plus dotted `a.b=value` overrides, validated in one pass.

Every problem (unknown key, wrong type, bad value, bad combination) is collected with its dotted
path and reported together in one `RecipeError`, so a user fixes a recipe in one round trip.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from vlm_tune.constants import ATTENTION_IMPLEMENTATIONS, BEST_METRICS, COMPONENT_NAMES  # noqa: F401 - re-exported
from vlm_tune.data_config import CONVERSATION_FORMATS, DataConfig, DataSourceConfig  # noqa: F401 - re-exported
from vlm_tune.recipe_adapters import AdaLoraSchedule, ComponentConfig, check_adapters
from vlm_tune.recipe_files import RecipeError, apply_overrides, read_recipe_file
from vlm_tune.recipe_hints import FOREIGN_KEYS
from vlm_tune.relevance_config import RelevanceConfig
from vlm_tune.speed_config import SpeedConfig, speed_problems
from vlm_tune.typed_config import build_dataclass

# ----------------------------------------------------------------------------------------------
# Schema. One help line per field; `_check` returns messages about combinations of fields.
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantizationConfig:
    bits: Literal[4] = field(
        default=4, metadata={"help": "weight bits of the quantized components (bitsandbytes 4-bit)"}
    )
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type"})
    double_quant: bool = field(
        default=True, metadata={"help": "also quantize the quantization constants (saves ~0.4 bit/param)"}
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata={"help": "matmul dtype of 4-bit layers"}
    )
    keep_16bit: list[str] = field(
        default_factory=lambda: ["vision", "projector"], metadata={"help": "components left unquantized"}
    )

    def _check(self) -> list[str]:
        return [
            f"keep_16bit: unknown component '{name}', expected one of {list(COMPONENT_NAMES)}"
            for name in self.keep_16bit
            if name not in COMPONENT_NAMES
        ]


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default="vlm_tune:smolvlm-demo", metadata={"help": "hub id, local folder, or a built-in `vlm_tune:NAME`"}
    )
    dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata={"help": "dtype of the 16-bit weights"}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager | sdpa | flash_attention_2"})
    quantization: Optional[QuantizationConfig] = field(
        default=None, metadata={"help": "omit for 16-bit weights; set for QLoRA"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward to save memory"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the checkpoint folder"})
    revision: Optional[str] = field(default=None, metadata={"help": "hub revision (branch, tag or commit)"})

    def _check(self) -> list[str]:
        known = self.attn_implementation in ATTENTION_IMPLEMENTATIONS
        if known or re.fullmatch(r"[^/:@]+/[^/:@]+(@[^/:]+)?(:[^/:]+)?", self.attn_implementation):
            return []
        return [
            f"attn_implementation: unknown '{self.attn_implementation}', expected one of "
            f"{list(ATTENTION_IMPLEMENTATIONS)} or a hub kernel such as kernels-community/flash-attn"
        ]


@dataclass
class TrainConfig:
    output_dir: str = field(default="runs/demo", metadata={"help": "run folder: recipe, report, logs, checkpoints"})
    epochs: int = field(default=1, metadata={"help": "passes over data.train (ignored when max_steps is set)"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "optimizer steps to run; overrides epochs"})
    batch_size: int = field(default=8, metadata={"help": "samples per device per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1.0e-4, metadata={"help": "learning rate of components without their own lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay of components without their own"})
    schedule: Literal["constant", "linear", "cosine"] = field(
        default="cosine", metadata={"help": "lr schedule after warmup"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    seed: int = field(default=0, metadata={"help": "seed for weights of new modules, sampling and data order"})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="bf16", metadata={"help": "autocast dtype (accelerate)"}
    )
    save_every: int = field(default=0, metadata={"help": "checkpoint every N optimizer steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept on disk (0: keep all)"})
    eval_every: int = field(default=0, metadata={"help": "eval loss every N steps (0: only at the end)"})
    eval_generate_every: int = field(
        default=0, metadata={"help": "data.eval.task metrics on eval.generate_limit samples every N steps (0: off)"}
    )
    log_every: int = field(default=1, metadata={"help": "log a line every N steps"})
    resume: Optional[str] = field(
        default=None, metadata={"help": "auto (latest complete checkpoint in output_dir) or a checkpoint path"}
    )
    init_from: Optional[str] = field(
        default=None,
        metadata={"help": "start from a checkpoint's trained weights, fresh optimizer and schedule (same components)"},
    )
    adalora: AdaLoraSchedule = field(
        default_factory=AdaLoraSchedule, metadata={"help": "rank allocation of components with variant adalora"}
    )
    report_to: Optional[list[Literal["tensorboard", "mlflow", "wandb"]]] = field(
        default=None,
        metadata={"help": "trackers (through accelerate): tensorboard, mlflow, wandb; null: tensorboard if installed"},
    )
    keep_best: Optional[str] = field(
        default=None,
        metadata={"help": "also keep the best checkpoint by eval_loss or a caption metric (CIDEr-D, BLEU-4...)"},
    )
    early_stopping_patience: Optional[int] = field(
        default=None,
        metadata={"help": "stop after N evaluations without improvement (of keep_best, else eval_loss)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may start in an output_dir with checkpoints"})
    skip_nonfinite_steps: int = field(default=0, metadata={"help": "NaN/inf steps skipped (no update) before stopping"})

    def _check(self) -> list[str]:
        errors = []
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        positive.update({"log_every": self.log_every, "max_steps": self.max_steps})  # max_steps: None or > 0
        positive["early_stopping_patience"] = self.early_stopping_patience  # None or > 0
        invalid = {name: value for name, value in positive.items() if value is not None and value <= 0}
        errors += [f"{name}: must be a positive integer, got {value}" for name, value in invalid.items()]
        non_negative = {
            "warmup_steps": self.warmup_steps,
            "save_every": self.save_every,
            "eval_every": self.eval_every,
            "eval_generate_every": self.eval_generate_every,
            "keep_checkpoints": self.keep_checkpoints,
            "skip_nonfinite_steps": self.skip_nonfinite_steps,
            "max_grad_norm": self.max_grad_norm,
            "weight_decay": self.weight_decay,
        }
        errors += [f"{name}: must be >= 0, got {value}" for name, value in non_negative.items() if value < 0]
        if self.lr <= 0:
            errors.append(f"lr: must be positive, got {self.lr}")
        if self.keep_best is not None and self.keep_best not in BEST_METRICS:
            errors.append(f"keep_best: unknown metric '{self.keep_best}', expected one of {list(BEST_METRICS)}")
        return errors


@dataclass
class EvalConfig:
    batch_size: int = field(default=8, metadata={"help": "images per generation batch"})
    num_beams: int = field(default=1, metadata={"help": "1: greedy decoding; >1: beam search"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest generated caption"})
    limit: Optional[int] = field(default=None, metadata={"help": "evaluate only the first N images"})
    generate_limit: int = field(default=32, metadata={"help": "images scored by train.eval_generate_every"})
    output_dir: Optional[str] = field(
        default=None, metadata={"help": "evaluation folder (default: <checkpoint>/eval-<set>-<split>, see Evaluation)"}
    )
    contact_sheet_images: int = field(default=16, metadata={"help": "images drawn on contact_sheet.png (0: none)"})
    use_java: Optional[bool] = field(
        default=None, metadata={"help": "Java PTB tokenizer + METEOR: null detects Java, false never, true requires it"}
    )

    def _check(self) -> list[str]:
        values = {
            "batch_size": self.batch_size,
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "generate_limit": self.generate_limit,
        }
        errors = [f"{name}: must be a positive integer, got {value}" for name, value in values.items() if value <= 0]
        if self.contact_sheet_images < 0:
            errors.append(f"contact_sheet_images: must be >= 0, got {self.contact_sheet_images}")
        if self.limit is not None and self.limit <= 0:
            errors.append(f"limit: must be a positive integer, got {self.limit}")
        return errors


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "what to load and how"})
    components: dict[str, ComponentConfig] = field(default_factory=dict, metadata={"help": "per-component policy"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training and evaluation sets"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the training loop"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "caption generation and metrics"})
    relevance: RelevanceConfig = field(default_factory=RelevanceConfig, metadata={"help": "visual token selection"})
    speed: SpeedConfig = field(default_factory=SpeedConfig, metadata={"help": "speed and memory levers"})

    def _check(self) -> list[str]:
        errors = [
            f"components.{name}: unknown component, expected one of {list(COMPONENT_NAMES)}"
            for name in self.components
            if name not in COMPONENT_NAMES
        ]
        if (
            not any(c.mode != "frozen" for c in self.components.values())
            and not self.relevance.enabled
            and all(name in COMPONENT_NAMES for name in self.components)
        ):
            errors.append(
                "components: every component is frozen, nothing would train; set components.<name>.mode to lora or full"
            )
        errors += speed_problems(self.speed, self.components, self.relevance.enabled, self.model.gradient_checkpointing)
        return errors + self._check_best() + check_adapters(self.components, self.model.quantization, self.relevance)

    def _check_best(self) -> list[str]:  # keep_best / early stopping need evaluations that compute their metric
        setting = "train.keep_best" if self.train.keep_best else "train.early_stopping_patience"
        if (self.train.keep_best or self.train.early_stopping_patience) and self.data.eval is None:
            return [f"{setting}: needs an evaluation set; set data.eval.path"]
        if self.train.keep_best not in (None, "eval_loss") and not self.train.eval_generate_every:
            return [f"{setting}: {self.train.keep_best} is computed every train.eval_generate_every steps, set it"]
        return []

    def component(self, name: str) -> ComponentConfig:
        """The policy of one component; components not named in the recipe are frozen."""
        return self.components.get(name, ComponentConfig())

    def to_dict(self) -> dict:
        """Plain-data form of the recipe (for YAML dumps and run folders)."""
        return dataclasses.asdict(self)


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    """Validate plain data into a `Recipe`.

    Raises:
        RecipeError: listing every problem, each with its dotted path.
    """
    errors: list[str] = []
    recipe = build_dataclass(Recipe, raw if raw is not None else {}, "", errors, renamed=FOREIGN_KEYS)
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise RecipeError(f"{source}: {len(errors)} problem(s) in the recipe:\n{lines}")
    return recipe


def load_recipe(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, and validate it.

    A recipe may start from another with `base: other.yaml` (a path relative to the recipe); its keys
    are merged on top of the base's.

    Args:
        path: the YAML file.
        overrides: strings such as `components.vision.rank=16`; values are parsed as YAML.
    Returns:
        The typed, validated `Recipe`.
    Raises:
        RecipeError: the file is missing or not YAML, or the recipe has problems (all listed).
    """
    raw = read_recipe_file(Path(path))
    return recipe_from_dict(apply_overrides(raw, list(overrides or [])), source=str(path))


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (the run folder's record of what ran)."""
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
