"""Training order: a shuffle that depends only on (seed, epoch), optionally grouping similar lengths.

The order never reads global random state, so a resumed run, and every process of a multi-GPU
run (accelerate shards the batches of one shared order), see the same sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch.utils.data import Sampler

from vlm_tune.recipe import DataConfig


class EpochShuffleSampler(Sampler[int]):
    """Indices of a dataset in a (seed, epoch)-determined order.

    Args:
        num_samples: size of the dataset.
        batch_size: samples per batch (the grouping unit of `lengths`).
        seed: base seed of the order.
        lengths: per-sample lengths; when given, each run of `batch_size` consecutive indices holds
            samples of similar length (mega-batches of shuffled samples sorted by length).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, lengths: Optional[list[int]] = None):
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.lengths = lengths
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields (accelerate's loaders call this too)."""
        self.epoch = epoch

    def order(self) -> list[int]:
        """The full order of the current epoch."""
        # Not stored as `self.generator`: accelerate replaces a sampler's `generator` with a shared one.
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.lengths is None:
            return torch.randperm(self.num_samples, generator=rng).tolist()
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return get_length_grouped_indices(self.lengths, self.batch_size, generator=rng)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def __len__(self) -> int:
        return self.num_samples


def build_train_sampler(dataset, data_cfg: DataConfig, batch_size: int, seed: int = 0) -> EpochShuffleSampler:
    """The training sampler of `dataset`: shuffled per (seed, epoch); grouped by caption length
    when `data.group_by_length` is set.

    Args:
        dataset: a `CaptionDataset` (its `caption_lengths()` is the length proxy).
        data_cfg: the `data` section.
        batch_size: per-device batch size.
        seed: `train.seed`.
    Returns:
        A sampler with `set_epoch(epoch)`; pass it to the DataLoader as `sampler=`.
    """
    lengths = dataset.caption_lengths() if data_cfg.group_by_length else None
    return EpochShuffleSampler(len(dataset), batch_size, seed, lengths)
