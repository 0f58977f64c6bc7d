"""Shared test configuration: the gpu marker, seeding, a clean backend for every test, the Triton
dispatch settings every test runs under, and the Triton backend for the modules that test its kernels."""

from __future__ import annotations

import pytest
import torch

import sparsekernels


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "dense_fallback: runs with the Triton dense fallback on (the default of every other test is off)"
    )


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


@pytest.fixture(scope="session")
def session_tune_cache(tmp_path_factory):
    """The tuning cache file of this test session (a fresh temporary folder): tests never read or
    write the user's ``~/.cache/sparsekernels``."""
    return tmp_path_factory.mktemp("sparsekernels-tune") / "triton-tune.json"


@pytest.fixture(autouse=True)
def _sparse_kernels_and_private_tune_cache(request, monkeypatch, session_tune_cache):
    """Every test runs with ``SPARSEKERNELS_DENSE_FALLBACK=0``, ``SPARSEKERNELS_AUTOTUNE=0`` and
    ``SPARSEKERNELS_TUNE_CACHE`` set to the session's own file. On CUDA the Triton front end would
    otherwise time the sparse kernel against ``F.linear`` (and the CUDA op) and may run another path,
    so a test of the kernels would not run them (on CPU tensors it always takes the sparse path); and
    tuning would compile and time every candidate for every new shape, minutes of a GPU visit that
    tests/test_triton_dispatch.py's tuning tests cover once. A test of the dense fallback itself opts
    out with ``@pytest.mark.dense_fallback`` (the variable unset: the library's default, fallback on),
    or sets or removes the variables with its own ``monkeypatch``, which runs after this fixture."""
    if request.node.get_closest_marker("dense_fallback") is None:
        monkeypatch.setenv("SPARSEKERNELS_DENSE_FALLBACK", "0")
    else:
        monkeypatch.delenv("SPARSEKERNELS_DENSE_FALLBACK", raising=False)
    monkeypatch.setenv("SPARSEKERNELS_AUTOTUNE", "0")
    monkeypatch.setenv("SPARSEKERNELS_TUNE_CACHE", str(session_tune_cache))


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
# cores; "long" draws 10x as many random examples and keeps failing ones in the example database.
# max_examples is the budget the fuzz tests share out; no profile is loaded globally, so other
# hypothesis tests keep their own settings.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile(
    "sparsekernels-short", max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True
)
_hypothesis_settings.register_profile("sparsekernels-long", max_examples=2000, deadline=None, print_blob=True)
