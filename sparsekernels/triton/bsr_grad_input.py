"""Triton block-sparse input gradient: ``grad_x = grad_out @ W``, one program per (row tile, block column).

Each program walks the CSC index of its block column, ``grad_x[rows, col] = sum_t grad_out[rows, row_t]
@ values[value_t]``. Empty block columns write zeros, so nothing needs pre-zeroing. Small batches split
a block column into ``TILE``-wide slices, as the forward kernel does. Accumulates in float32.

Program order (bsr_schedule.py), as in the forward kernel with block columns in place of block rows:
a one-dimensional grid, the columns with the most kept blocks first (a single long column starts in
the first wave instead of finishing alone), in groups of ``GROUP`` row tiles of grad_out.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    Config, block_candidates, block_density_bucket, clamp_index, dot_accumulate, dot_mode, launch, m_bucket,
    tuned_config,
)
from .bsr_forward import heuristic_config
from .bsr_schedule import LINE_GROUP, block_grid, grouped_block_tile, line_order

__all__ = ["bsr_grad_input"]


@triton.jit
def _bsr_grad_input_kernel(
    grad_out_ptr, values_ptr, col_offsets_ptr, row_indices_ptr, value_indices_ptr, col_order_ptr, grad_x_ptr,
    rows, n_block_cols, n_block_rows, nnz, stride_g_row, stride_g_col, stride_gx_row,
    B: tl.constexpr, TILE: tl.constexpr, BLOCK_ROWS: tl.constexpr, GROUP: tl.constexpr, DOT: tl.constexpr,
):
    # Input-gradient columns [block_col * B + part * TILE, + TILE), as in the forward kernel, and
    # the same grouped, long-columns-first program order.
    row_tile, block_col, part = grouped_block_tile(tl.program_id(0), rows, col_order_ptr, n_block_cols,
                                                   B, TILE, BLOCK_ROWS, GROUP)
    block_col = block_col.to(tl.int64)
    offs_rows = row_tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = offs_rows < rows
    offs_n = tl.arange(0, B)
    offs_k = part * TILE + tl.arange(0, TILE)
    g_rows = grad_out_ptr + offs_rows.to(tl.int64)[:, None] * stride_g_row

    # Index values clamped into range, as in the forward kernel: a corrupted index never addresses
    # memory outside the tensors.
    start = clamp_index(tl.load(col_offsets_ptr + block_col).to(tl.int64), 0, nnz)
    end = clamp_index(tl.load(col_offsets_ptr + block_col + 1).to(tl.int64), start, nnz)
    acc = tl.zeros([BLOCK_ROWS, TILE], dtype=tl.float32)
    for t in range(start, end):
        block_row = clamp_index(tl.load(row_indices_ptr + t).to(tl.int64), 0, n_block_rows - 1)
        value = clamp_index(tl.load(value_indices_ptr + t).to(tl.int64), 0, nnz - 1)
        g_tile = tl.load(g_rows + (block_row * B + offs_n)[None, :] * stride_g_col, mask=row_mask[:, None], other=0.0)
        w = tl.load(values_ptr + value * B * B + offs_n[:, None] * B + offs_k[None, :])
        acc = dot_accumulate(g_tile, w, acc, DOT)

    out_ptrs = grad_x_ptr + offs_rows.to(tl.int64)[:, None] * stride_gx_row + (block_col * B + offs_k)[None, :]
    tl.store(out_ptrs, acc.to(grad_x_ptr.dtype.element_ty), mask=row_mask[:, None])



def bsr_grad_input(grad_out: Tensor, values: Tensor, block_col_offsets: Tensor, block_row_indices: Tensor,
                   block_value_indices: Tensor) -> Tensor:
    """``grad_out @ W`` for 2-D ``grad_out[rows, out_features]``; returns ``[rows, in_features]``."""
    block_size = values.shape[-1]
    n_block_cols = block_col_offsets.shape[0] - 1
    rows, out_features = grad_out.shape
    grad_x = grad_out.new_empty((rows, n_block_cols * block_size))
    if grad_x.numel() == 0:
        return grad_x
    values, block_col_offsets, block_row_indices, block_value_indices = (
        values.contiguous(), block_col_offsets.contiguous(), block_row_indices.contiguous(),
        block_value_indices.contiguous())
    dot = dot_mode(_bsr_grad_input_kernel, grad_out.dtype)
    col_order = line_order(block_col_offsets)  # cached per pattern: no work after the first call

    def run(config: Config) -> None:
        grid = block_grid(rows, config.block_rows, n_block_cols, block_size // config.tile)
        launch(_bsr_grad_input_kernel, grid,
               grad_out, values, block_col_offsets, block_row_indices, block_value_indices, col_order, grad_x,
               rows, n_block_cols, out_features // block_size, values.shape[0],
               grad_out.stride(0), grad_out.stride(1), grad_x.stride(0),
               B=block_size, TILE=config.tile, BLOCK_ROWS=config.block_rows, GROUP=LINE_GROUP, DOT=dot,
               num_warps=config.num_warps, num_stages=config.num_stages)

    nnz, in_features, element_size = values.shape[0], grad_x.shape[1], grad_out.element_size()
    # Same tiling as the forward kernel, with block columns in place of block rows.
    config = tuned_config(
        (rows, nnz, out_features),
        lambda: ("bsr_grad_input", m_bucket(rows), in_features, out_features, f"b{block_size}",
                 block_density_bucket(nnz, out_features // block_size, n_block_cols), str(grad_out.dtype)),
        grad_out.device, (grad_out, values),
        heuristic_config(rows, n_block_cols, block_size, element_size, grad_out.device),
        lambda: block_candidates(rows, block_size, element_size), run)
    run(config)
    return grad_x
