"""The Triton kernels as ``torch.library.triton_op`` ops, with autograd, in ``sparsekernels_triton``.

``triton_op`` (rather than an opaque custom op) lets torch.compile / Inductor see the kernel launches,
and fake tensors run the same Python with the launches skipped, so no separate fake kernel is needed
(under the Triton interpreter the ops are opaque custom ops instead; see ``_define``).
The ops mirror the schemas of ``torch.ops.sparsekernels`` (csrc/bindings/library.cpp), minus
``linear_bias_grad``: the bias gradient is a plain float32 reduction done by torch.

Arguments are checked here too (the same checks as the front ends, csrc/bindings/checks.h), so that
calling an op directly with a bad argument raises a clear error before any kernel runs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from ..ops import OP_NAMES as SPARSEKERNELS_OP_NAMES
from ..ops.bias import bias_grad_reduction
from ..ops._autograd import bsr_linear_autograd, nm_linear_autograd
from ..ops._checks import (
    bsr_features, bsr_grad_values_features, check_bias, check_operand, nm_features, nm_grad_values_features,
)
from .bsr_forward import _bsr_forward_kernel, bsr_forward
from .bsr_grad_input import _bsr_grad_input_kernel, bsr_grad_input
from .bsr_grad_values import _bsr_grad_values_kernel, bsr_grad_values
from .nm_forward import _nm_forward_kernel, nm_forward
from .nm_grad_input import _nm_grad_input_kernel, nm_grad_input
from .nm_grad_values import _nm_grad_values_kernel, nm_grad_values
from ._common import check_device, is_interpreted

__all__ = ["OP_NAMES", "bsr_linear", "nm_linear"]


def _define(name: str):
    """``triton_op`` for compiled kernels; an opaque ``custom_op`` for interpreted ones.

    Under torch.compile a ``triton_op`` is decomposed into its body so that Inductor sees the launches;
    interpreted kernels cannot be traced that way (see ``_common.launch``), so under the interpreter
    the op stays opaque, with the same function as its fake kernel (launches skipped on fake tensors).
    """
    if not is_interpreted(_bsr_forward_kernel):
        return triton_op(name, mutates_args=())

    def define(fn):
        op = custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return define


# ---------------------------------------------------------------------------------------- block-sparse
@_define("sparsekernels_triton::bsr_linear")
def _bsr_linear(input: Tensor, values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor,
                block_col_offsets: Tensor, block_row_indices: Tensor, block_value_indices: Tensor,
                bias: Optional[Tensor]) -> Tensor:
    out_features, in_features = bsr_features(values, block_row_offsets, block_col_indices, block_col_offsets,
                                             block_row_indices, block_value_indices)
    check_operand(input, "input", values, "values", in_features, "in_features")
    check_bias(bias, values, out_features)
    check_device(_bsr_forward_kernel, input, "input")
    out = bsr_forward(input.reshape(-1, in_features), values, block_row_offsets, block_col_indices, bias)
    return out.reshape(*input.shape[:-1], out_features)


@_define("sparsekernels_triton::bsr_linear_grad_input")
def _bsr_linear_grad_input(grad_output: Tensor, values: Tensor, block_row_offsets: Tensor,
                           block_col_indices: Tensor, block_col_offsets: Tensor, block_row_indices: Tensor,
                           block_value_indices: Tensor) -> Tensor:
    out_features, in_features = bsr_features(values, block_row_offsets, block_col_indices, block_col_offsets,
                                             block_row_indices, block_value_indices)
    check_operand(grad_output, "grad_output", values, "values", out_features, "out_features")
    check_device(_bsr_grad_input_kernel, grad_output, "grad_output")
    grad_input = bsr_grad_input(grad_output.reshape(-1, out_features), values, block_col_offsets,
                                block_row_indices, block_value_indices)
    return grad_input.reshape(*grad_output.shape[:-1], in_features)


@_define("sparsekernels_triton::bsr_linear_grad_values")
def _bsr_linear_grad_values(grad_output: Tensor, input: Tensor, block_row_offsets: Tensor,
                            block_col_indices: Tensor, block_col_offsets: Tensor, block_row_indices: Tensor,
                            block_value_indices: Tensor, block_size: int) -> Tensor:
    index = (block_row_offsets, block_col_indices, block_col_offsets, block_row_indices, block_value_indices)
    bsr_grad_values_features(grad_output, input, index, block_size)
    out_features = (block_row_offsets.shape[0] - 1) * block_size
    in_features = (block_col_offsets.shape[0] - 1) * block_size
    check_device(_bsr_grad_values_kernel, input, "input")
    return bsr_grad_values(grad_output.reshape(-1, out_features), input.reshape(-1, in_features),
                           block_col_indices, block_row_indices, block_value_indices, block_size)


_bsr_setup_context, _bsr_backward = bsr_linear_autograd(
    torch.ops.sparsekernels_triton.bsr_linear_grad_input,
    torch.ops.sparsekernels_triton.bsr_linear_grad_values,
    bias_grad_reduction,
)
_bsr_linear.register_autograd(_bsr_backward, setup_context=_bsr_setup_context)


# ---------------------------------------------------------------------------------------- N:M
@_define("sparsekernels_triton::nm_linear")
def _nm_linear(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    out_features, in_features = nm_features(values, positions, n, m)
    check_operand(input, "input", values, "values", in_features, "in_features")
    check_bias(bias, values, out_features)
    check_device(_nm_forward_kernel, input, "input")
    out = nm_forward(input.reshape(-1, in_features), values, positions, n, m, bias)
    return out.reshape(*input.shape[:-1], out_features)


@_define("sparsekernels_triton::nm_linear_grad_input")
def _nm_linear_grad_input(grad_output: Tensor, values: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    out_features, in_features = nm_features(values, positions, n, m)
    check_operand(grad_output, "grad_output", values, "values", out_features, "out_features")
    check_device(_nm_grad_input_kernel, grad_output, "grad_output")
    grad_input = nm_grad_input(grad_output.reshape(-1, out_features), values, positions, n, m)
    return grad_input.reshape(*grad_output.shape[:-1], in_features)


@_define("sparsekernels_triton::nm_linear_grad_values")
def _nm_linear_grad_values(grad_output: Tensor, input: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    out_features, _ = nm_grad_values_features(grad_output, input, positions, n, m)
    check_device(_nm_grad_values_kernel, input, "input")
    in_features = input.shape[-1]
    return nm_grad_values(grad_output.reshape(-1, out_features), input.reshape(-1, in_features),
                          positions, n, m)


_nm_setup_context, _nm_backward = nm_linear_autograd(
    torch.ops.sparsekernels_triton.nm_linear_grad_input,
    torch.ops.sparsekernels_triton.nm_linear_grad_values,
    bias_grad_reduction,
)
_nm_linear.register_autograd(_nm_backward, setup_context=_nm_setup_context)

# The ops of torch.ops.sparsekernels, minus linear_bias_grad (a torch reduction here, see above).
OP_NAMES = tuple(name for name in SPARSEKERNELS_OP_NAMES if name != "linear_bias_grad")


def bsr_linear(input: Tensor, values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor,
               block_col_offsets: Tensor, block_row_indices: Tensor, block_value_indices: Tensor,
               bias: Optional[Tensor] = None) -> Tensor:
    """``input @ W.T (+ bias)`` for a block-sparse W with the Triton kernels (differentiable)."""
    return torch.ops.sparsekernels_triton.bsr_linear(
        input, values, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
        block_value_indices, bias,
    )


def nm_linear(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int,
              bias: Optional[Tensor] = None) -> Tensor:
    """``input @ W.T (+ bias)`` for an N:M-structured W with the Triton kernels (differentiable)."""
    return torch.ops.sparsekernels_triton.nm_linear(input, values, positions, n, m, bias)
