"""The recipe's `data` section: the training and evaluation sets and how samples are read and shaped.

Re-exported by vlm_tune.recipe, which holds the rest of the schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

CONVERSATION_FORMATS = ("llava", "messages", "hf")  # formats that can hold conversations (hf: a messages column)


@dataclass
class DataSourceConfig:
    format: Literal["coco", "karpathy", "jsonl", "csv", "imagefolder", "hf", "llava", "messages"] = field(
        default="coco", metadata={"help": "layout of the set (llava, messages: conversations; hf: either)"}
    )
    path: str = field(default="", metadata={"help": "annotation file, or folder (formats imagefolder, hf)"})
    images: Optional[str] = field(
        default=None,
        metadata={
            "help": "folder that image paths are relative to (default: next to `path`; coco also tries its images/)"
        },
    )
    split: Optional[str] = field(
        default=None,
        metadata={
            "help": "split to keep: karpathy train/val/test/restval (join with +), hf split, "
            "imagefolder subfolder, jsonl/csv 'split' column"
        },
    )
    image_column: str = field(default="image", metadata={"help": "column or field holding the image (path or image)"})
    caption_column: str = field(
        default="caption", metadata={"help": "column or field holding the caption (string or list of strings)"}
    )
    messages_column: str = field(default="messages", metadata={"help": "hf: column of conversations (no captions)"})
    images_column: str = field(
        default="images", metadata={"help": "hf: column holding a conversation's images (a list, or absent)"}
    )
    task: Literal["caption", "vqa"] = field(
        default="caption", metadata={"help": "evaluation scores captions, or answers (exact match, VQA acc., ANLS)"}
    )
    limit: Optional[int] = field(default=None, metadata={"help": "keep only the first N images (conversations)"})
    allow_outside_paths: bool = field(
        default=False, metadata={"help": "let image paths lead out of the image folder (`..`, absolute paths)"}
    )

    def _check(self) -> list[str]:
        errors = [] if self.path else ["path: required, the annotation file or dataset folder"]
        if self.limit is not None and self.limit <= 0:
            errors.append(f"limit: must be a positive integer, got {self.limit}")
        if self.task == "vqa" and self.format not in CONVERSATION_FORMATS:
            errors.append(
                f"task: vqa scores answers to questions, which format {self.format} cannot hold; "
                f"use one of {list(CONVERSATION_FORMATS)}"
            )
        return errors


@dataclass
class DataConfig:
    train: Optional[DataSourceConfig] = field(default=None, metadata={"help": "training set"})
    eval: Optional[DataSourceConfig] = field(
        default=None, metadata={"help": "evaluation set (eval loss and caption metrics)"}
    )
    prompt: Union[str, list[str]] = field(
        default="Describe the image.", metadata={"help": "user turn; a list is sampled per example"}
    )
    on_error: Literal["skip", "raise"] = field(
        default="skip", metadata={"help": "bad image or caption: skip and count, or stop"}
    )
    image_size: Optional[int] = field(
        default=None, metadata={"help": "longest image edge in pixels given to the processor"}
    )
    max_pixels: Optional[int] = field(
        default=None, metadata={"help": "pixel budget per image (Qwen-VL style processors)"}
    )
    max_image_pixels: Optional[int] = field(
        default=40_000_000, metadata={"help": "bigger image files: JPEG downscaled while decoding, others skipped"}
    )
    max_length: int = field(
        default=512, metadata={"help": "longest sequence; captions shortened, conversations cut after a turn"}
    )
    train_on: Literal["all", "last"] = field(
        default="all", metadata={"help": "conversations: the loss covers every assistant turn, or only the last"}
    )
    group_by_length: bool = field(default=False, metadata={"help": "batch samples of similar length to cut padding"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})

    def _check(self) -> list[str]:
        errors = []
        if isinstance(self.prompt, list) and not self.prompt:
            errors.append("prompt: the list of prompts is empty")
        if self.max_length <= 0:
            errors.append(f"max_length: must be a positive integer, got {self.max_length}")
        if self.num_workers < 0:
            errors.append(f"num_workers: must be >= 0, got {self.num_workers}")
        for name in ("image_size", "max_pixels", "max_image_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"{name}: must be a positive integer or null, got {value}")
        return errors
