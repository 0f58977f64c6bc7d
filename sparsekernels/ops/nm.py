"""The N:M linear ops: fake kernels, autograd, and the backend-routing front end.

``sparsekernels::nm_linear`` and its two backward ops are declared in csrc/bindings/library.cpp.
Here they get meta/fake kernels and autograd:

    grad_input  = nm_linear_grad_input(grad_output, values, positions, n, m)
    grad_values = nm_linear_grad_values(grad_output, input, positions, n, m)   # kept values only
    grad_bias   = linear_bias_grad(grad_output)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loads the op schemas and the C++ kernels)
from .. import reference
from .. import triton as triton_backend
from ..backend import resolve_backend
from ._autograd import nm_linear_autograd
from ._checks import check_bias, check_operand, nm_features, nm_grad_values_features

__all__ = ["nm_linear"]

_ops = torch.ops.sparsekernels


@torch.library.register_fake("sparsekernels::nm_linear")
def _nm_linear_fake(input, values, positions, n, m, bias):
    out_features, in_features = nm_features(values, positions, n, m)
    check_operand(input, "input", values, "values", in_features, "in_features")
    check_bias(bias, values, out_features)
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("sparsekernels::nm_linear_grad_input")
def _nm_linear_grad_input_fake(grad_output, values, positions, n, m):
    out_features, in_features = nm_features(values, positions, n, m)
    check_operand(grad_output, "grad_output", values, "values", out_features, "out_features")
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))


@torch.library.register_fake("sparsekernels::nm_linear_grad_values")
def _nm_linear_grad_values_fake(grad_output, input, positions, n, m):
    return input.new_empty(nm_grad_values_features(grad_output, input, positions, n, m))


_setup_context, _backward = nm_linear_autograd(
    _ops.nm_linear_grad_input, _ops.nm_linear_grad_values, _ops.linear_bias_grad
)
torch.library.register_autograd("sparsekernels::nm_linear", _backward, setup_context=_setup_context)


def nm_linear(
    input: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor] = None
) -> Tensor:
    """``input @ W.T (+ bias)`` for an N:M-structured W, on the backend chosen for input's device.

    ``input`` is ``[..., in_features]``; the result is ``[..., out_features]`` in input's dtype.
    Differentiable in ``input``, ``values`` and ``bias``.
    """
    out_features, in_features = nm_features(values, positions, n, m)
    check_operand(input, "input", values, "values", in_features, "in_features")
    check_bias(bias, values, out_features)
    backend = resolve_backend(input.device)
    if backend == "reference":
        return reference.nm_linear(input, values, positions, n, m, bias)
    if backend == "triton":
        return triton_backend.nm_linear(input, values, positions, n, m, bias)
    return _ops.nm_linear(input, values, positions, n, m, bias)
