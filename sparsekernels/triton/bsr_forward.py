"""Triton block-sparse forward: ``out = x @ W.T (+ bias)``, one program per (row tile, block row).

The weight is ``[out_features, in_features]`` cut into ``B x B`` blocks (B in 16, 32, 64, 128); the
kept blocks are ``values[nnz, B, B]`` (row-major, rows are output features) with a BSR index (see
sparsekernels/formats/block_sparse.py). Each program walks its block row's kept blocks,
``out[rows, block row] = sum_j x[rows, col_j] @ values[j].T`` (+ bias, fused). When the batch is too
small to keep the GPU busy, a block row is split into slices of ``TILE`` outputs over several
programs: each slice re-reads the x tile, but the weight, which dominates the traffic then, is read
once. Accumulates in float32 and rounds once, to the input dtype.

Program order (bsr_schedule.py): a one-dimensional grid, block rows visited longest first (the
most kept blocks), in groups of ``GROUP`` row tiles that share x tiles in L2.
"""

from __future__ import annotations

from typing import Callable, Optional

import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    Config, block_candidates, block_density_bucket, cdiv, clamp_index, column_tile, dot_accumulate, dot_mode,
    launch, m_bucket, pipeline_stages, rows_block, tuned_config,
)
from .bsr_schedule import LINE_GROUP, block_grid, grouped_block_tile, line_order

__all__ = ["bsr_forward", "plan_bsr_forward"]


@triton.jit
def _bsr_forward_kernel(
    x_ptr, values_ptr, row_offsets_ptr, col_indices_ptr, row_order_ptr, bias_ptr, out_ptr,
    rows, n_block_rows, n_block_cols, nnz, stride_x_row, stride_x_col, stride_out_row,
    HAS_BIAS: tl.constexpr, B: tl.constexpr, TILE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    GROUP: tl.constexpr, DOT: tl.constexpr,
):
    # Output columns [block_row * B + part * TILE, + TILE): a whole block row when TILE == B, a
    # slice of it when few input rows leave too few programs otherwise (see _common.column_tile).
    # Which (row tile, block row, part) this program computes: grouped, long rows first.
    row_tile, block_row, part = grouped_block_tile(tl.program_id(0), rows, row_order_ptr, n_block_rows,
                                                   B, TILE, BLOCK_ROWS, GROUP)
    block_row = block_row.to(tl.int64)
    offs_rows = row_tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = offs_rows < rows
    offs_k = tl.arange(0, B)
    offs_n = part * TILE + tl.arange(0, TILE)
    x_rows = x_ptr + offs_rows.to(tl.int64)[:, None] * stride_x_row

    # Index values are clamped into range (offsets to [0, nnz], columns to [0, n_block_cols)): the
    # index is validated when a pattern is set, and a corrupted one passed to the op directly then
    # gives wrong numbers, never an access outside the tensors (two integer ops per block).
    start = clamp_index(tl.load(row_offsets_ptr + block_row).to(tl.int64), 0, nnz)
    end = clamp_index(tl.load(row_offsets_ptr + block_row + 1).to(tl.int64), start, nnz)
    acc = tl.zeros([BLOCK_ROWS, TILE], dtype=tl.float32)
    for j in range(start, end):
        block_col = clamp_index(tl.load(col_indices_ptr + j).to(tl.int64), 0, n_block_cols - 1)
        x_tile = tl.load(x_rows + (block_col * B + offs_k)[None, :] * stride_x_col, mask=row_mask[:, None], other=0.0)
        # values[j] is [out, in] row-major; read rows offs_n of it as [in, out] (transposed) for x @ W.T.
        w_t = tl.load(values_ptr + j * B * B + offs_k[:, None] + offs_n[None, :] * B)
        acc = dot_accumulate(x_tile, w_t, acc, DOT)

    out_cols = block_row * B + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_rows.to(tl.int64)[:, None] * stride_out_row + out_cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])



def heuristic_config(rows: int, n_block_rows: int, block_size: int, element_size: int, device) -> Config:
    """The untuned choice: 16/32/64 rows by batch, the whole block row unless the grid is too small."""
    block_rows = rows_block(rows)
    tile = column_tile(cdiv(rows, block_rows), n_block_rows, block_size, device)
    return Config(block_rows, tile, 8 if block_rows * tile >= 64 * 128 else 4,
                  pipeline_stages((block_rows + tile) * block_size * element_size))


def plan_bsr_forward(x: Tensor, out: Tensor, values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor,
                     bias: Optional[Tensor]) -> Callable[..., None]:
    """Every host decision of a forward on these operands, taken once: the configuration (tuned on
    ``x`` and ``out`` at a tuning miss), the grid, the program order and the kernel's integer and
    constexpr arguments. ``out`` is a fresh ``[rows, out_features]`` tensor, the weight operands are
    contiguous. Returns ``launch_forward(x, out, values, block_row_offsets, block_col_indices, bias)``,
    which launches for operands with the same shapes, strides, dtype and device, ``bias`` present or
    not as here, and the same pattern (the program order is this ``block_row_offsets``'s)."""
    block_size = values.shape[-1]
    n_block_rows = block_row_offsets.shape[0] - 1
    rows, in_features = x.shape
    n_block_cols, nnz, out_features = in_features // block_size, values.shape[0], out.shape[1]
    stride_x_row, stride_x_col = x.stride()
    stride_out_row = out.stride(0)
    has_bias = bias is not None
    dot = dot_mode(_bsr_forward_kernel, x.dtype)
    row_order = line_order(block_row_offsets)  # cached per pattern: no work after the first call

    def launch_with(config: Config):
        grid = block_grid(rows, config.block_rows, n_block_rows, block_size // config.tile)
        constants = dict(HAS_BIAS=has_bias, B=block_size, TILE=config.tile, BLOCK_ROWS=config.block_rows,
                         GROUP=LINE_GROUP, DOT=dot, num_warps=config.num_warps, num_stages=config.num_stages)

        def launch_forward(x, out, values, block_row_offsets, block_col_indices, bias) -> None:
            launch(_bsr_forward_kernel, grid,
                   x, values, block_row_offsets, block_col_indices, row_order, out if bias is None else bias, out,
                   rows, n_block_rows, n_block_cols, nnz, stride_x_row, stride_x_col, stride_out_row, **constants)

        return launch_forward

    element_size = x.element_size()
    config = tuned_config(
        (rows, nnz, in_features),
        lambda: ("bsr_forward", m_bucket(rows), out_features, in_features, f"b{block_size}",
                 block_density_bucket(nnz, n_block_rows, n_block_cols), str(x.dtype)),
        x.device, (x, values), lambda: heuristic_config(rows, n_block_rows, block_size, element_size, x.device),
        lambda: block_candidates(rows, block_size, element_size),
        lambda config: launch_with(config)(x, out, values, block_row_offsets, block_col_indices, bias))
    return launch_with(config)


def bsr_forward(x: Tensor, values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor,
                bias: Optional[Tensor]) -> Tensor:
    """``x @ W.T (+ bias)`` for 2-D ``x[rows, in_features]``; returns ``[rows, out_features]``."""
    out = x.new_empty((x.shape[0], (block_row_offsets.shape[0] - 1) * values.shape[-1]))
    if out.numel() == 0:
        return out
    operands = (x, out, values.contiguous(), block_row_offsets.contiguous(), block_col_indices.contiguous(),
                None if bias is None else bias.contiguous())
    plan_bsr_forward(*operands)(*operands)
    return out
