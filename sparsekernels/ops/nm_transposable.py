"""N:M linear with a transposable mask: the input gradient runs on the N:M *forward* kernels.

``sparsekernels::nm_linear_transposable(input, values, positions, transpose_index, positions_t, n, m,
bias)`` computes exactly what ``nm_linear(input, values, positions, n, m, bias)`` computes. It differs
in its backward. When W's mask is N:M along both dimensions, ``W.T`` ``[in, out]`` is an N:M matrix
with the fixed pattern ``positions_t``, and its kept values are a permutation of W's
(``values_t.flatten() = values.flatten()[transpose_index]``, see sparsekernels/formats/nm.py). So

    grad_input  = nm_linear(grad_output, values_t, positions_t, n, m)    # one gather + an N:M forward
    grad_values = nm_linear_grad_values(grad_output, input, positions, n, m)
    grad_bias   = grad_output summed over leading dims (float32 accumulation)

and the input gradient runs wherever the forward runs best: the CUTLASS 2:4 sparse tensor core GEMM
on CUDA for 2:4 bf16/fp16 (the ``cuda`` backend's ``nm_linear_grad_input`` expands the weight to
dense instead), the Triton N:M forward kernel with the ``triton`` backend. The ``cpu`` backend is
the exception: there the gather costs more than the C++ ``nm_linear_grad_input`` it would replace
(measured in :func:`transposable_grad_input`), so the CPU input gradient is that kernel, and the
transposed pattern goes unused. No new kernel: the op composes existing ones, each reached through
the backend-routing front end (``sparsekernels.ops.nm_linear``) or the backend's own ops.

Design. The op is declared here, in Python (``torch.library.custom_op``; one schema, in the
``sparsekernels`` namespace beside the C++-declared ops), rather than in csrc/bindings/library.cpp,
because it has no kernel of its own. It is not ``CompositeImplicitAutograd``: such an op decomposes
*before* autograd, so its gradient would be ``nm_linear``'s own backward, which is exactly the path
this op exists to replace. A custom op with ``register_autograd`` keeps the plain-tensor interface of
the other ops (``SparseLinear`` is a thin wrapper that holds the two extra buffers), is checked by
``torch.library.opcheck``, and traces under ``torch.compile(fullgraph=True)``: the forward is one
opaque op (its fake kernel gives the shape), and the backward formula above is traced op by op (the
gather and the backend's ``nm_linear`` / ``nm_linear_grad_values`` ops; on CPU
``nm_linear_grad_input`` in place of the first two), so with the Triton backend
Inductor sees the backward's kernel launches. The price of opacity is the forward only: under
``torch.compile`` the Triton forward launches from inside the opaque op rather than from the graph.

Checks. Metadata only (as every op, ops/_checks.py): ``transpose_index`` int64 with one entry per
kept weight, ``positions_t`` uint8 of W.T's shape, both on the operands' device, out_features a
multiple of m. The *contents* of both are derived once from the mask when a pattern is set
(``NMMatrix.transposed_pattern``, ``SparseLinear``); an out-of-range ``transpose_index`` entry is
caught by the gather's own bounds check, a wrong but in-range one gives a wrong input gradient
(on the ``cpu`` backend neither is read).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loads the schemas of the ops composed here)
from .. import reference
from ..backend import resolve_backend
from ._checks import check_bias, check_operand, nm_features
from .bias import bias_grad_reduction
from .nm import nm_linear

__all__ = ["nm_linear_transposable", "transposable_grad_input", "transposed_values"]

_ops = torch.ops.sparsekernels


def check_transposed_pattern(transpose_index: Tensor, positions_t: Tensor, values: Tensor, n: int, m: int,
                             out_features: int, in_features: int) -> None:
    """Metadata of W.T's pattern for an N:M ``values[out_features, in_features * n / m]``."""
    if not isinstance(transpose_index, Tensor):
        raise TypeError(f"transpose_index must be a torch.Tensor, got {type(transpose_index).__name__}")
    if transpose_index.dtype != torch.int64:
        raise TypeError(f"transpose_index must be int64, got {transpose_index.dtype}")
    if transpose_index.dim() != 1 or transpose_index.shape[0] != values.numel():
        raise ValueError(
            f"transpose_index must be 1-D with nnz={values.numel()} entries (one per kept weight), "
            f"got shape {tuple(transpose_index.shape)}"
        )
    if transpose_index.device != values.device:
        raise ValueError(
            f"transpose_index must be on the device of the operands ({values.device}), got {transpose_index.device}"
        )
    if out_features % m:
        raise ValueError(
            f"out_features={out_features} must be a multiple of m={m}: W.T is {n}:{m} along out_features"
        )
    if not isinstance(positions_t, Tensor):
        raise TypeError(f"positions_t must be a torch.Tensor, got {type(positions_t).__name__}")
    if positions_t.dtype != torch.uint8:
        raise TypeError(f"positions_t must be uint8, got {positions_t.dtype}")
    per_byte = {2: 8, 4: 4, 8: 2, 16: 2}[m]
    kept_per_row_t = out_features // m * n
    expected = (in_features, -(-kept_per_row_t // per_byte))
    if tuple(positions_t.shape) != expected:
        raise ValueError(
            f"positions_t (the pattern of W.T [{in_features}, {out_features}]) must have shape {list(expected)}, "
            f"got {list(positions_t.shape)}"
        )
    if positions_t.device != values.device:
        raise ValueError(
            f"positions_t must be on the device of the operands ({values.device}), got {positions_t.device}"
        )


def _check_arguments(input, values, positions, transpose_index, positions_t, n, m, bias) -> tuple[int, int]:
    out_features, in_features = nm_features(values, positions, n, m)
    check_operand(input, "input", values, "values", in_features, "in_features")
    check_bias(bias, values, out_features)
    check_transposed_pattern(transpose_index, positions_t, values, n, m, out_features, in_features)
    return out_features, in_features


def transposed_values(values: Tensor, transpose_index: Tensor, in_features: int) -> Tensor:
    """W.T's kept values ``[in_features, out_features * n / m]``: one gather of nnz elements."""
    return values.reshape(-1).index_select(0, transpose_index).view(in_features, values.numel() // in_features)


def transposable_grad_input(grad_output: Tensor, values: Tensor, positions: Tensor, transpose_index: Tensor,
                            positions_t: Tensor, n: int, m: int) -> Tensor:
    """The input gradient of :func:`nm_linear_transposable`: ``grad_output @ W``.

    With the ``cpu`` backend it is ``nm_linear_grad_input`` (the C++ kernel that expands the weight
    tile by tile); elsewhere the gather of W.T's values and the N:M forward on W.T. On CPU the
    gather is the cost: walking each column of W over all its rows misses the TLB on nearly every
    element (about 85 ms for a 4096x4096 2:4 weight on a 2-core Zen 3, 2026-12-07), more than the
    whole expanding kernel (8 ms at M = 16, 76 ms at M = 256), and at M = 1024 and 2048 the two
    routes measured the same. A tiled gather (tried: 32 to 37 ms, half of it the page faults of the
    fresh 32 MB output) does not change the verdict.
    """
    if resolve_backend(grad_output.device) == "cpu":
        return _ops.nm_linear_grad_input(grad_output, values, positions, n, m)
    values_t = transposed_values(values, transpose_index, positions_t.shape[0])  # positions_t: [in_features, ...]
    return nm_linear(grad_output, values_t, positions_t, n, m)


@torch.library.custom_op("sparsekernels::nm_linear_transposable", mutates_args=())
def _nm_linear_transposable(input: Tensor, values: Tensor, positions: Tensor, transpose_index: Tensor,
                            positions_t: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    _check_arguments(input, values, positions, transpose_index, positions_t, n, m, bias)
    return nm_linear(input, values, positions, n, m, bias)


@_nm_linear_transposable.register_fake
def _nm_linear_transposable_fake(input, values, positions, transpose_index, positions_t, n, m, bias):
    out_features, _ = _check_arguments(input, values, positions, transpose_index, positions_t, n, m, bias)
    return input.new_empty((*input.shape[:-1], out_features))


def _grad_values(grad_output: Tensor, input: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    """Gradient of the kept values, by the grad-values op of the backend that runs ``input``'s device."""
    backend = resolve_backend(input.device)
    if backend == "triton":
        from ..triton import ops as _triton_ops  # noqa: F401  (registers torch.ops.sparsekernels_triton)

        return torch.ops.sparsekernels_triton.nm_linear_grad_values(grad_output, input, positions, n, m)
    if backend == "reference":
        # Entry (i, j) of grad_output.T @ input involves only column i and column j: sampled at the
        # kept positions, dropped weights cannot contribute (reference.py's kept-only rule).
        kept_per_row = input.shape[-1] // m * n
        dense = grad_output.reshape(-1, grad_output.shape[-1]).float().T @ input.reshape(-1, input.shape[-1]).float()
        columns = reference.nm_column_indices(positions, n, m, kept_per_row)
        return dense.gather(1, columns).to(input.dtype)
    return _ops.nm_linear_grad_values(grad_output, input, positions, n, m)


def _bias_grad(grad_output: Tensor) -> Tensor:
    if resolve_backend(grad_output.device) in ("cpu", "cuda"):
        return _ops.linear_bias_grad(grad_output)
    return bias_grad_reduction(grad_output)


def _setup_context(ctx, inputs, output):
    input, values, positions, transpose_index, positions_t, n, m, bias = inputs
    ctx.save_for_backward(input, values, positions, transpose_index, positions_t)
    ctx.n, ctx.m = n, m
    ctx.has_bias = bias is not None


def _backward(ctx, grad_output):
    input, values, positions, transpose_index, positions_t = ctx.saved_tensors
    n, m = ctx.n, ctx.m
    needs_input, needs_values, needs_bias = (ctx.needs_input_grad[i] for i in (0, 1, 7))
    grad_input = grad_values = grad_bias = None
    if needs_input:
        grad_input = transposable_grad_input(grad_output, values, positions, transpose_index, positions_t, n, m)
    if needs_values:
        grad_values = _grad_values(grad_output, input, positions, n, m)
    if ctx.has_bias and needs_bias:
        grad_bias = _bias_grad(grad_output)
    return grad_input, grad_values, None, None, None, None, None, grad_bias


_nm_linear_transposable.register_autograd(_backward, setup_context=_setup_context)


def nm_linear_transposable(
    input: Tensor,
    values: Tensor,
    positions: Tensor,
    transpose_index: Tensor,
    positions_t: Tensor,
    n: int,
    m: int,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``input @ W.T (+ bias)`` for an N:M W whose mask is transposable; the input gradient runs the
    N:M forward on ``W.T`` (see the module doc).

    ``transpose_index`` and ``positions_t`` come from ``NMMatrix.transposed_pattern()`` (or a
    ``SparseLinear`` with ``NM(n, m, transposable=True)``, which holds them as buffers).
    Differentiable in ``input``, ``values`` and ``bias``; same result as :func:`nm_linear`.
    """
    return torch.ops.sparsekernels.nm_linear_transposable(
        input, values, positions, transpose_index, positions_t, n, m, bias
    )
