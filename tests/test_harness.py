"""The test harness itself, where the GPU tests rely on it and a CPU can check it.

* tests/conftest.py gives every test the Triton dense fallback off (so that on a GPU the kernel
  tests run the kernels, not ``F.linear``), tuning off (heuristic configurations; the tuning tests
  turn it on themselves) and the tuning cache in a file of the session's own (never
  ``~/.cache/sparsekernels``); the ``dense_fallback`` marker opts a test out.
* ``cases.misaligned`` makes contiguous tensors, and gradients, whose data is not 16-byte aligned.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cases import misaligned
from sparsekernels.triton import autotune, dispatch

_seen_by_module_fixture = {}


@pytest.fixture(autouse=True)
def _record_environment_before_module_fixtures():
    """A module's own autouse fixture runs after conftest's, so its settings win (as
    tests/test_triton_dispatch.py relies on when it clears them)."""
    for name in ("SPARSEKERNELS_DENSE_FALLBACK", "SPARSEKERNELS_AUTOTUNE", "SPARSEKERNELS_TUNE_CACHE"):
        _seen_by_module_fixture[name] = os.environ.get(name)


def test_dense_fallback_is_off_and_the_tune_cache_is_private(session_tune_cache):
    assert os.environ["SPARSEKERNELS_DENSE_FALLBACK"] == "0"
    assert not dispatch.fallback_enabled()
    assert not autotune.tuning_enabled()
    cache = Path(os.environ["SPARSEKERNELS_TUNE_CACHE"])
    assert cache == session_tune_cache
    assert Path.home() / ".cache" not in cache.parents
    # The tuner that the kernels use on a GPU reads and writes the session's file.
    assert autotune.tuner.path("NVIDIA H100 80GB HBM3") == cache
    assert _seen_by_module_fixture == {
        "SPARSEKERNELS_DENSE_FALLBACK": "0", "SPARSEKERNELS_AUTOTUNE": "0", "SPARSEKERNELS_TUNE_CACHE": str(cache)}


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8, torch.bool], ids=str)
def test_misaligned_tensors_and_their_gradients(dtype):
    tensor = (torch.randn(5, 8) * 4).to(dtype)
    moved = misaligned(tensor)
    assert torch.equal(moved, tensor) and moved.is_contiguous() and moved.data_ptr() % 16 != 0
    if not dtype.is_floating_point:
        return
    seen = []

    class Probe(torch.autograd.Function):
        """Records the gradient that reaches an op whose output went through ``misaligned``."""

        @staticmethod
        def forward(ctx, input):
            return input.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(grad)
            return grad

    leaf = tensor.clone().requires_grad_()
    misaligned(Probe.apply(misaligned(leaf))).backward(torch.ones(5, 8, dtype=dtype))
    assert seen[0].is_contiguous() and seen[0].data_ptr() % 16 != 0
    assert torch.equal(leaf.grad, torch.ones(5, 8, dtype=dtype))
