"""Shared test configuration: the gpu marker, seeding, a clean backend for every test, and the
Triton backend for the modules that test its kernels."""

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


@pytest.fixture
def triton_backend(monkeypatch):
    """The Triton backend, and on a GPU its kernels themselves: no dense fallback and no tuning
    (tests/test_triton_dispatch.py covers both). Used by the Triton test modules through
    ``pytest.mark.usefixtures`` (with ``cases.skip_without_triton``)."""
    sparsekernels.set_backend("triton")
    monkeypatch.setenv("SPARSEKERNELS_DENSE_FALLBACK", "0")
    monkeypatch.setenv("SPARSEKERNELS_AUTOTUNE", "0")


# Hypothesis profiles of the fuzz tests (tests/test_fuzz.py), chosen with SPARSEKERNELS_FUZZ_PROFILE:
# "short" (default) is derandomized, so CI is reproducible, and sized to about a minute on two
# cores; "long" draws ~25x as many random examples and keeps failing ones in the example database.
# max_examples is the budget the fuzz tests share out; no profile is loaded globally, so other
# hypothesis tests keep their own settings.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile(
    "sparsekernels-short", max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True
)
_hypothesis_settings.register_profile("sparsekernels-long", max_examples=2000, deadline=None, print_blob=True)
