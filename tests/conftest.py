"""Shared pytest setup: make `from tiny import tiny_vlm` work from any test folder; skip
`@pytest.mark.gpu` tests on machines without CUDA."""

import sys
from pathlib import Path

import pytest
import torch

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
