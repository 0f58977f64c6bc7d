"""The block-sparse linear ops: fake kernels, autograd, and the backend-routing front end.

``sparsekernels::bsr_linear`` and its two backward ops are declared in csrc/bindings/library.cpp.
Here they get meta/fake kernels (shape inference for torch.compile and export) and autograd:

    grad_input  = bsr_linear_grad_input(grad_output, values, *index)   # walks the CSC index
    grad_values = bsr_linear_grad_values(grad_output, input, *index)   # kept blocks only
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
from ._autograd import bsr_linear_autograd
from ._checks import bsr_features, bsr_grad_values_features, check_bias, check_operand

__all__ = ["bsr_linear"]

_ops = torch.ops.sparsekernels


@torch.library.register_fake("sparsekernels::bsr_linear")
def _bsr_linear_fake(input, values, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
                     block_value_indices, bias):
    out_features, in_features = bsr_features(
        values, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices, block_value_indices
    )
    check_operand(input, "input", values, "values", in_features, "in_features")
    check_bias(bias, values, out_features)
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("sparsekernels::bsr_linear_grad_input")
def _bsr_linear_grad_input_fake(grad_output, values, block_row_offsets, block_col_indices, block_col_offsets,
                                block_row_indices, block_value_indices):
    out_features, in_features = bsr_features(
        values, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices, block_value_indices
    )
    check_operand(grad_output, "grad_output", values, "values", out_features, "out_features")
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))


@torch.library.register_fake("sparsekernels::bsr_linear_grad_values")
def _bsr_linear_grad_values_fake(grad_output, input, block_row_offsets, block_col_indices, block_col_offsets,
                                 block_row_indices, block_value_indices, block_size):
    index = (block_row_offsets, block_col_indices, block_col_offsets, block_row_indices, block_value_indices)
    nnz = bsr_grad_values_features(grad_output, input, index, block_size)
    return input.new_empty((nnz, block_size, block_size))


_setup_context, _backward = bsr_linear_autograd(
    _ops.bsr_linear_grad_input, _ops.bsr_linear_grad_values, _ops.linear_bias_grad
)
torch.library.register_autograd("sparsekernels::bsr_linear", _backward, setup_context=_setup_context)


def bsr_linear(
    input: Tensor,
    values: Tensor,
    block_row_offsets: Tensor,
    block_col_indices: Tensor,
    block_col_offsets: Tensor,
    block_row_indices: Tensor,
    block_value_indices: Tensor,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``input @ W.T (+ bias)`` for a block-sparse W, on the backend chosen for input's device.

    ``input`` is ``[..., in_features]``; the result is ``[..., out_features]`` in input's dtype.
    Differentiable in ``input``, ``values`` and ``bias``.
    """
    out_features, in_features = bsr_features(
        values, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices, block_value_indices
    )
    check_operand(input, "input", values, "values", in_features, "in_features")
    check_bias(bias, values, out_features)
    index = (block_row_offsets, block_col_indices, block_col_offsets, block_row_indices, block_value_indices)
    backend = resolve_backend(input.device)
    if backend == "reference":
        return reference.bsr_linear(input, values, *index, bias)
    if backend == "triton":
        return triton_backend.bsr_linear(input, values, *index, bias)
    return _ops.bsr_linear(input, values, *index, bias)
