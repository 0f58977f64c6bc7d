"""The settings tests/conftest.py gives every test: the Triton dense fallback off (so that on a GPU
the kernel tests run the kernels, not ``F.linear``), the tuning cache in a file of the session's own
(never ``~/.cache/sparsekernels``), and the ``dense_fallback`` marker that opts a test out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparsekernels.triton import autotune, dispatch

_seen_by_module_fixture = {}


@pytest.fixture(autouse=True)
def _record_environment_before_module_fixtures():
    """A module's own autouse fixture runs after conftest's, so its settings win (as
    tests/test_triton_dispatch.py relies on when it clears them)."""
    for name in ("SPARSEKERNELS_DENSE_FALLBACK", "SPARSEKERNELS_TUNE_CACHE"):
        _seen_by_module_fixture[name] = os.environ.get(name)


def test_dense_fallback_is_off_and_the_tune_cache_is_private(session_tune_cache):
    assert os.environ["SPARSEKERNELS_DENSE_FALLBACK"] == "0"
    assert not dispatch.fallback_enabled()
    cache = Path(os.environ["SPARSEKERNELS_TUNE_CACHE"])
    assert cache == session_tune_cache
    assert Path.home() / ".cache" not in cache.parents
    # The tuner that the kernels use on a GPU reads and writes the session's file.
    assert autotune.tuner.path("NVIDIA H100 80GB HBM3") == cache
    assert _seen_by_module_fixture == {"SPARSEKERNELS_DENSE_FALLBACK": "0", "SPARSEKERNELS_TUNE_CACHE": str(cache)}


@pytest.mark.dense_fallback
def test_dense_fallback_marker_restores_the_library_default(session_tune_cache):
    assert "SPARSEKERNELS_DENSE_FALLBACK" not in os.environ
    assert dispatch.fallback_enabled()
    assert Path(os.environ["SPARSEKERNELS_TUNE_CACHE"]) == session_tune_cache


def test_a_test_can_override_the_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEKERNELS_DENSE_FALLBACK", "1")
    monkeypatch.setenv("SPARSEKERNELS_TUNE_CACHE", str(tmp_path / "own.json"))
    assert dispatch.fallback_enabled()
    assert autotune.Tuner().path("any gpu") == tmp_path / "own.json"
