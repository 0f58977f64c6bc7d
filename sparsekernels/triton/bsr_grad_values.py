"""Triton block-sparse weight gradient on the kept blocks only (SDDMM).

One program per (kept block, sub-tile of the block, slice of the input rows), in CSC order, which
gives the block row and, through ``block_col_indices[value_t]``, the column without a search:
``grad_values[v] = grad_out[:, row].T @ x[:, col]`` summed over the input rows, in float32.

Split reduction over the rows. With few kept blocks and many rows (a small layer in training with a
large batch), one program per block and sub-tile would leave most of the GPU idle while each loops
over every row. Then ``_common.row_split`` cuts the rows into slices: each program reduces one slice
into a float32 partial buffer ``[splits, nnz, B, B]``, and the slices are summed afterwards by
``torch.sum`` in float32, then rounded once to the gradient's dtype. No atomics: every partial sum
has one writer and the final sum has a fixed order, so the weight gradient is bitwise repeatable
(``torch.use_deterministic_algorithms``). Without a split (``splits == 1``) the program writes the
gradient directly, with no extra buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    Config, block_density_bucket, clamp_index, dot_accumulate, dot_mode, launch, m_bucket, row_split,
    tuned_config,
)

__all__ = ["bsr_grad_values"]


@triton.jit
def _bsr_grad_values_kernel(
    grad_out_ptr, x_ptr, col_indices_ptr, row_indices_ptr, value_indices_ptr, grad_values_ptr,
    rows, rows_per_split, split_stride, n_block_rows, n_block_cols, nnz, stride_g_row, stride_g_col, stride_x_row, stride_x_col,
    B: tl.constexpr, TILE: tl.constexpr, BLOCK_ROWS: tl.constexpr, DOT: tl.constexpr,
):
    t = tl.program_id(0)  # position in the CSC index
    # Index values clamped into range (a corrupted index gives wrong numbers, never an access outside
    # the tensors; validated indexes are unchanged).
    value = clamp_index(tl.load(value_indices_ptr + t).to(tl.int64), 0, nnz - 1)
    block_row = clamp_index(tl.load(row_indices_ptr + t).to(tl.int64), 0, n_block_rows - 1)
    block_col = clamp_index(tl.load(col_indices_ptr + value).to(tl.int64), 0, n_block_cols - 1)
    SUB_TILES: tl.constexpr = B // TILE
    offs_out = (tl.program_id(1) // SUB_TILES) * TILE + tl.arange(0, TILE)  # output features inside the block
    offs_in = (tl.program_id(1) % SUB_TILES) * TILE + tl.arange(0, TILE)  # input features inside the block
    g_cols = grad_out_ptr + (block_row * B + offs_out)[:, None] * stride_g_col
    x_cols = x_ptr + (block_col * B + offs_in)[None, :] * stride_x_col

    # This program's slice of the input rows: all of them when not split. Slices are multiples of
    # BLOCK_ROWS, so only the last chunk of the last slice is partial.
    split = tl.program_id(2)
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, rows)
    acc = tl.zeros([TILE, TILE], dtype=tl.float32)
    for row_start in range(row_begin, row_end, BLOCK_ROWS):
        offs_rows = row_start + tl.arange(0, BLOCK_ROWS)
        row_mask = offs_rows < row_end
        g_t = tl.load(g_cols + offs_rows.to(tl.int64)[None, :] * stride_g_row, mask=row_mask[None, :], other=0.0)
        x_tile = tl.load(x_cols + offs_rows.to(tl.int64)[:, None] * stride_x_row, mask=row_mask[:, None], other=0.0)
        acc = dot_accumulate(g_t, x_tile, acc, DOT)

    # The gradient itself (split 0 of 1), or this slice's float32 partial sum: split_stride apart.
    out_ptrs = (grad_values_ptr + split.to(tl.int64) * split_stride + value * B * B
                + offs_out[:, None] * B + offs_in[None, :])
    tl.store(out_ptrs, acc.to(grad_values_ptr.dtype.element_ty))


def bsr_grad_values(grad_out: Tensor, x: Tensor, block_col_indices: Tensor, block_row_indices: Tensor,
                    block_value_indices: Tensor, block_size: int) -> Tensor:
    """Gradient of the kept blocks, ``[nnz, B, B]``, from 2-D ``grad_out`` and ``x`` (same rows)."""
    nnz = block_col_indices.shape[0]
    rows = x.shape[0]
    if nnz == 0:
        return x.new_empty((nnz, block_size, block_size))
    block_col_indices, block_row_indices, block_value_indices = (
        block_col_indices.contiguous(), block_row_indices.contiguous(), block_value_indices.contiguous())
    dot = dot_mode(_bsr_grad_values_kernel, x.dtype)

    def run(config: Config) -> Tensor:
        # block_rows is the reduction chunk over the input rows; tile the square sub-tile of a block.
        sub_tiles = block_size // config.tile
        splits, rows_per_split = row_split(rows, nnz * sub_tiles * sub_tiles, config.block_rows, x.device)
        if splits == 1:
            target = x.new_empty((nnz, block_size, block_size))
        else:
            target = torch.empty((splits, nnz, block_size, block_size), dtype=torch.float32, device=x.device)
        launch(_bsr_grad_values_kernel, (nnz, sub_tiles * sub_tiles, splits),
               grad_out, x, block_col_indices, block_row_indices, block_value_indices, target,
               rows, rows_per_split, nnz * block_size * block_size,
               grad_out.shape[1] // block_size, x.shape[1] // block_size, nnz, grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
               B=block_size, TILE=config.tile, BLOCK_ROWS=config.block_rows, DOT=dot,
               num_warps=config.num_warps, num_stages=config.num_stages)
        # The partial sums are added in float32 in a fixed order (deterministic), rounded once.
        return target if splits == 1 else target.sum(0).to(x.dtype)

    out_features, in_features = grad_out.shape[1], x.shape[1]
    heuristic = Config(block_rows=32, tile=min(block_size, 64), num_warps=4, num_stages=3)

    def candidates() -> list:
        tiles = [tile for tile in (64, 32) if tile <= block_size]
        return [Config(block_rows, tile, warps, 3) for block_rows in (32, 64) for tile in tiles for warps in (4, 8)]

    # The tuner times run(config) per candidate; the gradient is what the chosen config's run returns.
    return run(tuned_config(
        (rows, nnz, out_features, in_features),
        lambda: ("bsr_grad_values", m_bucket(rows), out_features, in_features, f"b{block_size}",
                 block_density_bucket(nnz, out_features // block_size, in_features // block_size), str(x.dtype)),
        x.device, (x, grad_out), heuristic, candidates, run))
