"""Triton kernels of the block-sparse family: forward, input gradient and kept-block gradient.

The weight is ``[out_features, in_features]`` cut into ``B x B`` blocks (B in 16, 32, 64, 128); the
kept blocks are ``values[nnz, B, B]`` (row-major, rows are output features) with a BSR index and a
CSC index (see sparsekernels/formats/block_sparse.py). Inputs are 2-D ``[rows, features]`` views
with arbitrary strides (the ops flatten leading dims without copying); results are contiguous.

* forward      one program per (row tile, block row): walks the block row's kept blocks,
               ``out[rows, block row] = sum_j x[rows, col_j] @ values[j].T`` (+ bias).
* grad input   one program per (row tile, block column): walks the CSC index of that column,
               ``grad_x[rows, col] = sum_t grad_out[rows, row_t] @ values[value_t]``. Empty block
               columns write zeros, so nothing needs pre-zeroing.

  Both split a block row (column) into slices of ``TILE`` outputs over several programs when the
  batch is too small to keep the GPU busy otherwise (decode): each slice re-reads the x tile, but
  the weight, which dominates the traffic then, is still read once.
* grad values  one program per (kept block, sub-tile of the block), in CSC order (which gives the
               block row and, through ``block_col_indices[value_t]``, the column without a search):
               ``grad_values[v] = grad_out[:, row].T @ x[:, col]`` summed over every input row.

All accumulate in float32 and round once, to the input dtype.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ._common import MAX_GRID_Y, dot_accumulate, dot_mode, launch, pipeline_stages, rows_block, target_programs

__all__ = ["bsr_forward", "bsr_grad_input", "bsr_grad_values"]


@triton.jit
def _bsr_forward_kernel(
    x_ptr, values_ptr, row_offsets_ptr, col_indices_ptr, bias_ptr, out_ptr,
    rows, stride_x_row, stride_x_col, stride_out_row,
    HAS_BIAS: tl.constexpr, B: tl.constexpr, TILE: tl.constexpr, BLOCK_ROWS: tl.constexpr, DOT: tl.constexpr,
):
    # Output columns [block_row * B + part * TILE, + TILE): a whole block row when TILE == B, a
    # slice of it when few input rows leave too few programs otherwise (see _column_tile).
    row_tile = tl.program_id(0)
    block_row = tl.program_id(1) // (B // TILE)
    part = tl.program_id(1) % (B // TILE)
    offs_rows = row_tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = offs_rows < rows
    offs_k = tl.arange(0, B)
    offs_n = part * TILE + tl.arange(0, TILE)
    x_rows = x_ptr + offs_rows.to(tl.int64)[:, None] * stride_x_row

    start = tl.load(row_offsets_ptr + block_row).to(tl.int64)
    end = tl.load(row_offsets_ptr + block_row + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_ROWS, TILE], dtype=tl.float32)
    for j in range(start, end):
        block_col = tl.load(col_indices_ptr + j).to(tl.int64)
        x_tile = tl.load(x_rows + (block_col * B + offs_k)[None, :] * stride_x_col, mask=row_mask[:, None], other=0.0)
        # values[j] is [out, in] row-major; read rows offs_n of it as [in, out] (transposed) for x @ W.T.
        w_t = tl.load(values_ptr + j * B * B + offs_k[:, None] + offs_n[None, :] * B)
        acc = dot_accumulate(x_tile, w_t, acc, DOT)

    out_cols = block_row * B + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_rows.to(tl.int64)[:, None] * stride_out_row + out_cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _bsr_grad_input_kernel(
    grad_out_ptr, values_ptr, col_offsets_ptr, row_indices_ptr, value_indices_ptr, grad_x_ptr,
    rows, stride_g_row, stride_g_col, stride_gx_row,
    B: tl.constexpr, TILE: tl.constexpr, BLOCK_ROWS: tl.constexpr, DOT: tl.constexpr,
):
    # Input-gradient columns [block_col * B + part * TILE, + TILE), as in the forward kernel.
    row_tile = tl.program_id(0)
    block_col = tl.program_id(1) // (B // TILE)
    part = tl.program_id(1) % (B // TILE)
    offs_rows = row_tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = offs_rows < rows
    offs_n = tl.arange(0, B)
    offs_k = part * TILE + tl.arange(0, TILE)
    g_rows = grad_out_ptr + offs_rows.to(tl.int64)[:, None] * stride_g_row

    start = tl.load(col_offsets_ptr + block_col).to(tl.int64)
    end = tl.load(col_offsets_ptr + block_col + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_ROWS, TILE], dtype=tl.float32)
    for t in range(start, end):
        block_row = tl.load(row_indices_ptr + t).to(tl.int64)
        value = tl.load(value_indices_ptr + t).to(tl.int64)
        g_tile = tl.load(g_rows + (block_row * B + offs_n)[None, :] * stride_g_col, mask=row_mask[:, None], other=0.0)
        w = tl.load(values_ptr + value * B * B + offs_n[:, None] * B + offs_k[None, :])
        acc = dot_accumulate(g_tile, w, acc, DOT)

    out_ptrs = grad_x_ptr + offs_rows.to(tl.int64)[:, None] * stride_gx_row + (block_col * B + offs_k)[None, :]
    tl.store(out_ptrs, acc.to(grad_x_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _bsr_grad_values_kernel(
    grad_out_ptr, x_ptr, col_indices_ptr, row_indices_ptr, value_indices_ptr, grad_values_ptr,
    rows, stride_g_row, stride_g_col, stride_x_row, stride_x_col,
    B: tl.constexpr, TILE: tl.constexpr, BLOCK_ROWS: tl.constexpr, DOT: tl.constexpr,
):
    t = tl.program_id(0)  # position in the CSC index
    value = tl.load(value_indices_ptr + t).to(tl.int64)
    block_row = tl.load(row_indices_ptr + t).to(tl.int64)
    block_col = tl.load(col_indices_ptr + value).to(tl.int64)
    offs_out = tl.program_id(1) * TILE + tl.arange(0, TILE)  # output features inside the block
    offs_in = tl.program_id(2) * TILE + tl.arange(0, TILE)  # input features inside the block
    g_cols = grad_out_ptr + (block_row * B + offs_out)[:, None] * stride_g_col
    x_cols = x_ptr + (block_col * B + offs_in)[None, :] * stride_x_col

    acc = tl.zeros([TILE, TILE], dtype=tl.float32)
    for row_start in range(0, rows, BLOCK_ROWS):
        offs_rows = row_start + tl.arange(0, BLOCK_ROWS)
        row_mask = offs_rows < rows
        g_t = tl.load(g_cols + offs_rows.to(tl.int64)[None, :] * stride_g_row, mask=row_mask[None, :], other=0.0)
        x_tile = tl.load(x_cols + offs_rows.to(tl.int64)[:, None] * stride_x_row, mask=row_mask[:, None], other=0.0)
        acc = dot_accumulate(g_t, x_tile, acc, DOT)

    out_ptrs = grad_values_ptr + value * B * B + offs_out[:, None] * B + offs_in[None, :]
    tl.store(out_ptrs, acc.to(grad_values_ptr.dtype.element_ty))


def _column_tile(row_tiles: int, n_blocks: int, block_size: int, device) -> int:
    """Width of the output slice one program computes: the whole block (fewest loads of x) unless
    that leaves fewer programs than the GPU wants (decode-sized batches), then halved down to 16."""
    tile, wanted = block_size, target_programs(device)
    while tile > 16 and row_tiles * n_blocks * (block_size // tile) < wanted and n_blocks * (block_size // tile) * 2 <= MAX_GRID_Y:
        tile //= 2
    return tile


def bsr_forward(x: Tensor, values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor,
                bias: Optional[Tensor]) -> Tensor:
    """``x @ W.T (+ bias)`` for 2-D ``x[rows, in_features]``; returns ``[rows, out_features]``."""
    block_size = values.shape[-1]
    n_block_rows = block_row_offsets.shape[0] - 1
    rows = x.shape[0]
    out = x.new_empty((rows, n_block_rows * block_size))
    if out.numel() == 0:
        return out
    block_rows = rows_block(rows)
    row_tiles = triton.cdiv(rows, block_rows)
    tile = _column_tile(row_tiles, n_block_rows, block_size, x.device)
    launch(_bsr_forward_kernel, (row_tiles, n_block_rows * (block_size // tile)),
           x, values.contiguous(), block_row_offsets.contiguous(), block_col_indices.contiguous(),
           out if bias is None else bias.contiguous(), out,
           rows, x.stride(0), x.stride(1), out.stride(0),
           HAS_BIAS=bias is not None, B=block_size, TILE=tile, BLOCK_ROWS=block_rows,
           DOT=dot_mode(_bsr_forward_kernel, x.dtype), num_warps=8 if block_rows * tile >= 64 * 128 else 4,
           num_stages=pipeline_stages((block_rows + tile) * block_size * x.element_size()))
    return out


def bsr_grad_input(grad_out: Tensor, values: Tensor, block_col_offsets: Tensor, block_row_indices: Tensor,
                   block_value_indices: Tensor) -> Tensor:
    """``grad_out @ W`` for 2-D ``grad_out[rows, out_features]``; returns ``[rows, in_features]``."""
    block_size = values.shape[-1]
    n_block_cols = block_col_offsets.shape[0] - 1
    rows = grad_out.shape[0]
    grad_x = grad_out.new_empty((rows, n_block_cols * block_size))
    if grad_x.numel() == 0:
        return grad_x
    block_rows = rows_block(rows)
    row_tiles = triton.cdiv(rows, block_rows)
    tile = _column_tile(row_tiles, n_block_cols, block_size, grad_out.device)
    launch(_bsr_grad_input_kernel, (row_tiles, n_block_cols * (block_size // tile)),
           grad_out, values.contiguous(), block_col_offsets.contiguous(), block_row_indices.contiguous(),
           block_value_indices.contiguous(), grad_x,
           rows, grad_out.stride(0), grad_out.stride(1), grad_x.stride(0),
           B=block_size, TILE=tile, BLOCK_ROWS=block_rows, DOT=dot_mode(_bsr_grad_input_kernel, grad_out.dtype),
           num_warps=8 if block_rows * tile >= 64 * 128 else 4,
           num_stages=pipeline_stages((block_rows + tile) * block_size * grad_out.element_size()))
    return grad_x


def bsr_grad_values(grad_out: Tensor, x: Tensor, block_col_indices: Tensor, block_row_indices: Tensor,
                    block_value_indices: Tensor, block_size: int) -> Tensor:
    """Gradient of the kept blocks, ``[nnz, B, B]``, from 2-D ``grad_out`` and ``x`` (same rows)."""
    nnz = block_col_indices.shape[0]
    grad_values = x.new_empty((nnz, block_size, block_size))
    if nnz == 0:
        return grad_values
    tile = min(block_size, 64)
    sub_tiles = block_size // tile
    grid = (nnz, sub_tiles, sub_tiles)
    launch(_bsr_grad_values_kernel, grid,
        grad_out, x, block_col_indices.contiguous(), block_row_indices.contiguous(),
        block_value_indices.contiguous(), grad_values,
        x.shape[0], grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
        B=block_size, TILE=tile, BLOCK_ROWS=32, DOT=dot_mode(_bsr_grad_values_kernel, x.dtype),
    )
    return grad_values
