"""Shared test configuration: the gpu marker, seeding, and a clean backend for every test."""

from __future__ import annotations

import pytest
import torch

import sparsekernels


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    torch.manual_seed(0)
    previous = sparsekernels.get_backend()
    yield
    sparsekernels.set_backend(previous)
