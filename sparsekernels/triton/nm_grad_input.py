"""Triton N:M input gradient: ``grad_x = grad_out @ W``, one program per (row tile, input tile).

The same register rebuild of dense weight tiles as the forward (``_common.nm_dense_weight_tile``),
walking the output features.

NaN and Inf (as after an fp16 loss-scale overflow): ``grad_x[r, k]`` sums ``grad_out[r, o] * W[o, k]``
over the outputs ``o`` that keep ``W[o, k]``, so a NaN in ``grad_out[r, o]`` must not reach
``grad_x[r, k]`` through a dropped weight (a stored 0 in the dense tile). As in the forward
(nm_forward.py): a finished accumulator that is all finite proves the tile exact (one reduction per
program); otherwise ``_nm_grad_input_kept_only`` computes the tile again over kept terms only.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..reference import NM_BITS_PER_POSITION
from ._common import (
    NM_BLOCK_IN, NM_KEPT_ONLY_ROWS, Config, add_kept_terms, any_nonfinite, cdiv, dot_accumulate, dot_mode,
    launch, m_bucket, nm_dense_weight_tile, nm_weight_row, rows_block, tuned_config,
)

__all__ = ["nm_grad_input"]


@triton.jit
def _store_grad_x(acc, grad_x_ptr, offs_rows, offs_in, row_mask, in_features, stride_gx_row):
    """Store a float32 tile of ``grad_x`` in its dtype."""
    out_ptrs = grad_x_ptr + offs_rows.to(tl.int64)[:, None] * stride_gx_row + offs_in[None, :]
    tl.store(out_ptrs, acc.to(grad_x_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_in < in_features)[None, :])


@triton.jit
def _nm_grad_input_kept_only(
    grad_out_ptr, values_ptr, positions_ptr, grad_x_ptr, row_start, in_start,
    rows, out_features, in_features, n_groups, stride_g_row, stride_g_col, stride_val_row, stride_pos_row,
    stride_gx_row,
    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_IN: tl.constexpr, CHUNK_ROWS: tl.constexpr,
):
    """The exact path: this program's ``grad_x`` tile (stored) summed over kept terms only, each formed
    on its own, with IEEE NaN / Inf semantics. ``CHUNK_ROWS`` rows at a time, one output feature at a
    time: ``grad_out[:, o]`` times the kept ``W[o, in_start : in_start + BLOCK_IN]``."""
    offs_in = in_start + tl.arange(0, BLOCK_IN)
    for chunk_start in range(row_start, tl.minimum(row_start + BLOCK_ROWS, rows), CHUNK_ROWS):
        offs_rows = chunk_start + tl.arange(0, CHUNK_ROWS)
        row_mask = offs_rows < rows
        g_rows = grad_out_ptr + offs_rows.to(tl.int64)[:, None] * stride_g_row
        acc = tl.zeros([CHUNK_ROWS, BLOCK_IN], dtype=tl.float32)
        for out_feature in range(0, out_features):
            g_column = tl.load(g_rows + tl.cast(out_feature, tl.int64) * stride_g_col, mask=row_mask[:, None],
                               other=0.0)
            w_row, kept = nm_weight_row(values_ptr, positions_ptr, out_feature, in_start, n_groups,
                                        stride_val_row, stride_pos_row, N, M, BITS, BLOCK_IN)
            acc = add_kept_terms(acc, g_column, w_row, kept)
        _store_grad_x(acc, grad_x_ptr, offs_rows, offs_in, row_mask, in_features, stride_gx_row)


@triton.jit
def _nm_grad_input_kernel(
    grad_out_ptr, values_ptr, positions_ptr, grad_x_ptr,
    rows, out_features, in_features,
    stride_g_row, stride_g_col, stride_val_row, stride_pos_row, stride_gx_row,
    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, DOT: tl.constexpr,
):
    offs_rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    in_start = tl.program_id(1) * BLOCK_IN
    offs_in = in_start + tl.arange(0, BLOCK_IN)
    row_mask = offs_rows < rows
    g_rows = grad_out_ptr + offs_rows.to(tl.int64)[:, None] * stride_g_row
    n_groups = in_features // M

    acc = tl.zeros([BLOCK_ROWS, BLOCK_IN], dtype=tl.float32)
    for out_start in range(0, out_features, BLOCK_OUT):
        offs_out = out_start + tl.arange(0, BLOCK_OUT)
        out_mask = offs_out < out_features
        g_tile = tl.load(g_rows + offs_out.to(tl.int64)[None, :] * stride_g_col,
                         mask=row_mask[:, None] & out_mask[None, :], other=0.0)
        w = nm_dense_weight_tile(values_ptr, positions_ptr, offs_out.to(tl.int64), out_mask, in_start, n_groups,
                               stride_val_row, stride_pos_row, N, M, BITS, BLOCK_OUT, BLOCK_IN)
        acc = dot_accumulate(g_tile, w.to(g_tile.dtype), acc, DOT)

    # All finite: no NaN / Inf met a dropped zero, the tile is exact. Else the kept-only path (module docstring).
    if any_nonfinite(acc):
        _nm_grad_input_kept_only(grad_out_ptr, values_ptr, positions_ptr, grad_x_ptr, tl.program_id(0) * BLOCK_ROWS,
                                 in_start, rows, out_features, in_features, n_groups,
                                 stride_g_row, stride_g_col, stride_val_row, stride_pos_row, stride_gx_row,
                                 N, M, BITS, BLOCK_ROWS, BLOCK_IN, NM_KEPT_ONLY_ROWS)
    else:
        _store_grad_x(acc, grad_x_ptr, offs_rows, offs_in, row_mask, in_features, stride_gx_row)



def nm_grad_input(grad_out: Tensor, values: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    """``grad_out @ W`` for 2-D ``grad_out[rows, out_features]``; returns ``[rows, in_features]``."""
    out_features, kept = values.shape
    in_features = kept // n * m
    rows = grad_out.shape[0]
    grad_x = grad_out.new_empty((rows, in_features))
    if grad_x.numel() == 0:
        return grad_x
    values, positions = values.contiguous(), positions.contiguous()
    dot = dot_mode(_nm_grad_input_kernel, grad_out.dtype)

    def run(config: Config) -> None:
        # tile: the output features consumed per loop step (the grid runs over rows x input tiles).
        grid = (cdiv(rows, config.block_rows), cdiv(in_features, NM_BLOCK_IN))
        launch(_nm_grad_input_kernel, grid,
               grad_out, values, positions, grad_x,
               rows, out_features, in_features,
               grad_out.stride(0), grad_out.stride(1), values.stride(0), positions.stride(0), grad_x.stride(0),
               N=n, M=m, BITS=NM_BITS_PER_POSITION[m], BLOCK_ROWS=config.block_rows, BLOCK_OUT=config.tile,
               BLOCK_IN=NM_BLOCK_IN, DOT=dot, num_warps=config.num_warps, num_stages=config.num_stages)

    heuristic = Config(rows_block(rows), 32, 4, 3)

    def candidates() -> list:
        return [Config(heuristic.block_rows, tile, warps, 3) for tile in (32, 64) for warps in (4, 8)]

    run(tuned_config(
        (rows, out_features, in_features),
        lambda: ("nm_grad_input", m_bucket(rows), in_features, out_features, f"{n}:{m}", round(n / m, 4),
                 str(grad_out.dtype)),
        grad_out.device, (grad_out, values), heuristic, candidates, run))
    return grad_x
