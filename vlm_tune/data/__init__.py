"""Data: caption sets in common layouts, robust image loading, collators, samplers, the shapes set.

Public API:
    build_dataset(source, data_cfg, train, seed=0) -> CaptionDataset
    CaptionDataset.bad_samples, .set_epoch(epoch), .caption_lengths()
    TrainCollator(processor, data_cfg)          items -> model inputs with labels (+ "skipped")
    GenerateCollator(processor, data_cfg)       items -> (left-padded inputs, meta) for generate
    build_train_sampler(dataset, data_cfg, batch_size, seed) -> EpochShuffleSampler
    write_bad_samples(records, path)            save skipped samples as JSONL in the run folder
    DataError                                   bad data / bad data settings, with file and fix
    load_rgb(source)                            any image file -> upright 8-bit RGB
"""

from vlm_tune.data.bad_samples import DataError, write_bad_samples
from vlm_tune.data.collate import GenerateCollator, TrainCollator
from vlm_tune.data.dataset import CaptionDataset, build_dataset
from vlm_tune.data.images import ImageLoadError, load_rgb
from vlm_tune.data.sampler import EpochShuffleSampler, build_train_sampler

__all__ = [
    "build_dataset",
    "CaptionDataset",
    "TrainCollator",
    "GenerateCollator",
    "build_train_sampler",
    "EpochShuffleSampler",
    "DataError",
    "write_bad_samples",
    "ImageLoadError",
    "load_rgb",
]
