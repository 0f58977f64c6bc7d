"""Backend choice: per-device defaults, set_backend, SPARSEKERNELS_BACKEND, and backend agreement."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import sparsekernels as sk
from cases import assert_close, layout_id
from sparsekernels import NM, BlockSparse, SparseLinear
from sparsekernels.backend import resolve_backend


def test_default_backend_per_device():
    assert sk.get_backend() == "auto"
    assert resolve_backend(torch.device("cpu")) == "cpu"
    assert resolve_backend(torch.device("meta")) == "cpu"


@pytest.mark.parametrize("layout", [BlockSparse(32, 0.25), NM(2, 4)], ids=layout_id)
def test_reference_backend_agrees_with_cpu_kernels(layout):
    layer = SparseLinear(128, 64, layout, dtype=torch.bfloat16)
    input = torch.randn(9, 128, dtype=torch.bfloat16, requires_grad=True)
    output_cpu = layer(input)
    output_cpu.float().square().sum().backward()
    grads_cpu = (input.grad.clone(), layer.values.grad.clone(), layer.bias.grad.clone())
    input.grad = None
    layer.zero_grad()
    sk.set_backend("reference")
    output_ref = layer(input)
    output_ref.float().square().sum().backward()
    assert_close(output_cpu, output_ref, torch.bfloat16, "output")
    for grad_cpu, grad_ref in zip(grads_cpu, (input.grad, layer.values.grad, layer.bias.grad)):
        assert_close(grad_cpu, grad_ref, torch.bfloat16, "grads")


def test_set_backend_validates_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.set_backend("cutlass")
    sk.set_backend("reference")
    assert sk.get_backend() == "reference"
    sk.set_backend(None)
    assert sk.get_backend() == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only build")
def test_unavailable_backends_raise():
    with pytest.raises(RuntimeError, match="not available"):
        sk.set_backend("cuda")
    assert not sk.backend_available("cuda")


def test_forced_cpu_backend_rejects_other_devices():
    sk.set_backend("cpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' was forced"):
        resolve_backend(torch.device("cuda"))


def test_environment_variable_forces_backend():
    code = "import sparsekernels as sk; print(sk.get_backend())"
    env = dict(os.environ, SPARSEKERNELS_BACKEND="reference")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "reference"
    env["SPARSEKERNELS_BACKEND"] = "nonsense"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "backend must be one of" in result.stderr
