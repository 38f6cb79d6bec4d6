"""Data: caption sets in common layouts, robust image loading, collators, samplers, the shapes set.

Public API:
    build_dataset(source, data_cfg, train, seed=0) -> CaptionDataset
    CaptionDataset.bad_samples, .set_epoch(epoch), .caption_lengths()
    write_bad_samples(records, path)            save skipped samples as JSONL in the run folder
    DataError                                   bad data / bad data settings, with file and fix
    load_rgb(source)                            any image file -> upright 8-bit RGB
"""

from vlm_tune.data.bad_samples import DataError, write_bad_samples
from vlm_tune.data.dataset import CaptionDataset, build_dataset
from vlm_tune.data.images import ImageLoadError, load_rgb

__all__ = ["build_dataset", "CaptionDataset", "DataError", "write_bad_samples", "ImageLoadError", "load_rgb"]
