"""The dense reference: what every sparse kernel must compute, written as plain PyTorch math.

Each backend (C++ CPU, Triton, CUDA) is tested against these functions, and the ``reference``
backend runs them directly. They expand the sparse weight to a dense masked matrix and call a dense
matmul in float32 (or wider), so they are slow and memory-hungry by design and obviously correct.
Everything here is differentiable with respect to the kept values.

A dropped weight is absent, not a stored zero: a NaN or Inf in an input (or output-gradient)
entry reaches only the outputs whose kept weights touch it, never through ``0 * NaN``
(``kept_only_linear``), as the CPU kernels guarantee (docs/reliability.md).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "bsr_to_dense",
    "nm_column_indices",
    "nm_to_dense",
    "unpack_positions",
    "linear",
    "kept_only_linear",
    "bsr_linear",
    "nm_linear",
]

# N:M in-group offsets are packed into uint8: 1 bit for m=2, 2 bits for m=4, 4 bits for m=8 and 16
# (m=8 uses 4 rather than 3 bits so that no offset straddles a byte). See csrc/cpu/nm.h.
NM_BITS_PER_POSITION = {2: 1, 4: 2, 8: 4, 16: 4}


def bsr_to_dense(
    values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor, out_features: int, in_features: int
) -> Tensor:
    """Dense ``[out_features, in_features]`` weight from kept blocks ``values[nnz, b, b]`` (BSR)."""
    block_size = values.shape[-1]
    n_block_rows, n_block_cols = out_features // block_size, in_features // block_size
    counts = block_row_offsets[1:] - block_row_offsets[:-1]
    block_rows = torch.repeat_interleave(
        torch.arange(n_block_rows, device=values.device), counts.to(torch.int64), output_size=values.shape[0]
    )
    flat_index = block_rows * n_block_cols + block_col_indices.to(torch.int64)
    blocks = values.new_zeros(n_block_rows * n_block_cols, block_size, block_size)
    blocks = blocks.index_put((flat_index,), values)
    return (
        blocks.reshape(n_block_rows, n_block_cols, block_size, block_size)
        .permute(0, 2, 1, 3)
        .reshape(out_features, in_features)
    )


def unpack_positions(positions: Tensor, m: int, kept_per_row: int) -> Tensor:
    """In-group offsets ``[rows, kept_per_row]`` (int64, 0..m-1) from packed uint8 ``positions``."""
    bits = NM_BITS_PER_POSITION[m]
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=positions.device, dtype=torch.int32) * bits
    unpacked = (positions.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return unpacked.reshape(positions.shape[0], -1)[:, :kept_per_row].to(torch.int64)


def nm_column_indices(positions: Tensor, n: int, m: int, kept_per_row: int) -> Tensor:
    """Input-feature column of every kept value: ``group * m + offset``, shape ``[rows, kept]``."""
    groups = torch.arange(kept_per_row, device=positions.device) // n
    return groups * m + unpack_positions(positions, m, kept_per_row)


def nm_to_dense(values: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    """Dense ``[out, in]`` weight from N:M ``values[out, in * n / m]`` and packed ``positions``."""
    out_features, kept_per_row = values.shape
    in_features = kept_per_row // n * m
    columns = nm_column_indices(positions, n, m, kept_per_row)
    return values.new_zeros(out_features, in_features).scatter(1, columns, values)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``input @ weight.T + bias`` accumulated in float32 (float64 stays float64), cast back."""
    compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    output = torch.nn.functional.linear(
        input.to(compute_dtype),
        weight.to(compute_dtype),
        None if bias is None else bias.to(compute_dtype),
    )
    return output.to(input.dtype)


def _kept_only_matmul(a: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """``a @ weight.T`` (2-D operands) over the kept terms only.

    ``weight`` is zero where ``mask`` is False, so rows of ``a`` that are all finite are a dense
    product. Rows holding a non-finite entry are recomputed term by term over kept weights only
    (rare, so only those rows): zeroing the entry instead would still meet a non-finite kept weight
    as 0 * Inf = NaN where Inf * Inf = Inf is right.
    """
    finite = torch.isfinite(a)
    out = torch.matmul(torch.where(finite, a, torch.zeros((), dtype=a.dtype, device=a.device)), weight.T)
    if not bool(finite.all()):
        rows = (~finite).any(dim=1).nonzero().squeeze(1)
        terms = a[rows, None, :] * weight[None]  # [rows, out, in]
        kept_terms = torch.where(mask[None], terms, torch.zeros((), dtype=terms.dtype, device=a.device))
        out = out.index_copy(0, rows, kept_terms.sum(-1))
    return out


class _KeptOnlyLinear(torch.autograd.Function):
    """``input @ weight.T`` where dropped weights are absent in the forward and in the input gradient."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(input, weight, mask)
        output = _kept_only_matmul(input.reshape(-1, input.shape[-1]), weight, mask)
        return output.reshape(*input.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight, mask = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = _kept_only_matmul(grad_rows, weight.T, mask.T).reshape(input.shape)
        if ctx.needs_input_grad[1]:
            # Entry (i, j) involves only grad_output[:, i] and input[:, j]: dropped terms cannot leak.
            product = grad_rows.T @ input.reshape(-1, input.shape[-1])
            grad_weight = torch.where(mask, product, torch.zeros((), dtype=product.dtype, device=product.device))
        return grad_input, grad_weight, None


def kept_only_linear(input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``input @ weight.T + bias`` in float32 (float64 stays float64) summing the kept terms only.

    ``weight`` is the masked dense weight (zero where ``mask`` is False); the result equals
    :func:`linear` whenever the operands are finite.
    """
    compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    output = _KeptOnlyLinear.apply(input.to(compute_dtype), weight.to(compute_dtype), mask)
    if bias is not None:
        output = output + bias.to(compute_dtype)
    return output.to(input.dtype)


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
    """Reference for ``sparsekernels::bsr_linear`` (same arguments)."""
    block_size = values.shape[-1]
    out_features = (block_row_offsets.shape[0] - 1) * block_size
    in_features = (block_col_offsets.shape[0] - 1) * block_size
    weight = bsr_to_dense(values, block_row_offsets, block_col_indices, out_features, in_features)
    kept = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    mask = bsr_to_dense(kept, block_row_offsets, block_col_indices, out_features, in_features)
    return kept_only_linear(input, weight, mask, bias)


def nm_linear(
    input: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor] = None
) -> Tensor:
    """Reference for ``sparsekernels::nm_linear`` (same arguments)."""
    mask = nm_to_dense(torch.ones(values.shape, dtype=torch.bool, device=values.device), positions, n, m)
    return kept_only_linear(input, nm_to_dense(values, positions, n, m), mask, bias)
