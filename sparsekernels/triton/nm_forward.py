"""Triton N:M forward: ``out = x @ W.T (+ bias)``, one program per (row tile, output tile).

The weight keeps ``n`` of every ``m`` consecutive input features in each row: ``values[out, kept]``
and packed in-group offsets ``positions`` (see sparsekernels/formats/nm.py). The kernel never stores
a dense weight: each ``[BLOCK_OUT, 64]`` tile is rebuilt in registers (``_common.nm_dense_weight_tile``)
and goes to ``tl.dot`` like a dense one. in_features need not be a multiple of 64 (the tail is masked).
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ..reference import NM_BITS_PER_POSITION
from ._common import (
    cdiv,
    NM_BLOCK_IN, Config, dot_accumulate, dot_mode, launch, m_bucket, nm_candidates, nm_dense_weight_tile,
    nm_out_block, rows_block, tuned_config,
)

__all__ = ["nm_forward"]


@triton.jit
def _nm_forward_kernel(
    x_ptr, values_ptr, positions_ptr, bias_ptr, out_ptr,
    rows, out_features, in_features,
    stride_x_row, stride_x_col, stride_val_row, stride_pos_row, stride_out_row,
    HAS_BIAS: tl.constexpr, N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, DOT: tl.constexpr,
):
    offs_rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_out = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_mask = offs_rows < rows
    out_mask = offs_out < out_features
    x_rows = x_ptr + offs_rows.to(tl.int64)[:, None] * stride_x_row
    offs_out64 = offs_out.to(tl.int64)
    n_groups = in_features // M

    acc = tl.zeros([BLOCK_ROWS, BLOCK_OUT], dtype=tl.float32)
    for in_start in range(0, in_features, BLOCK_IN):
        offs_in = in_start + tl.arange(0, BLOCK_IN)
        x_tile = tl.load(x_rows + offs_in[None, :] * stride_x_col,
                         mask=row_mask[:, None] & (offs_in < in_features)[None, :], other=0.0)
        w = nm_dense_weight_tile(values_ptr, positions_ptr, offs_out64, out_mask, in_start, n_groups,
                               stride_val_row, stride_pos_row, N, M, BITS, BLOCK_OUT, BLOCK_IN)
        acc = dot_accumulate(x_tile, tl.trans(w.to(x_tile.dtype)), acc, DOT)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_out, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_rows.to(tl.int64)[:, None] * stride_out_row + offs_out[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])



def nm_forward(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    """``x @ W.T (+ bias)`` for 2-D ``x[rows, in_features]``; returns ``[rows, out_features]``.

    At most 16 rows go to ``nm_forward_small_m`` (reads only the compressed weight, no ``tl.dot``)."""
    from . import nm_forward_small_m as small_m

    out_features, kept = values.shape
    in_features = kept // n * m
    rows = x.shape[0]
    # Decode-sized batches: the kernel that reads only the compressed weight (no tl.dot). A symbolic
    # row count (dynamic-shape tracing) stays here rather than specialising the graph on it.
    if type(rows) is int and rows <= small_m.SMALL_M_MAX_ROWS:
        return small_m.nm_forward_small_m(x, values, positions, n, m, bias)
    out = x.new_empty((rows, out_features))
    if out.numel() == 0:
        return out
    values, positions = values.contiguous(), positions.contiguous()
    bias = out if bias is None else bias.contiguous()
    has_bias = bias is not out
    dot = dot_mode(_nm_forward_kernel, x.dtype)

    def run(config: Config) -> None:
        grid = (cdiv(rows, config.block_rows), cdiv(out_features, config.tile))
        launch(_nm_forward_kernel, grid,
               x, values, positions, bias, out,
               rows, out_features, in_features,
               x.stride(0), x.stride(1), values.stride(0), positions.stride(0), out.stride(0),
               HAS_BIAS=has_bias, N=n, M=m, BITS=NM_BITS_PER_POSITION[m],
               BLOCK_ROWS=config.block_rows, BLOCK_OUT=config.tile, BLOCK_IN=NM_BLOCK_IN, DOT=dot,
               num_warps=config.num_warps, num_stages=config.num_stages)

    block_rows = rows_block(rows)

    def heuristic() -> Config:
        return Config(block_rows, nm_out_block(out_features, cdiv(rows, block_rows), x.device), 4, 3)

    run(tuned_config(
        (rows, out_features, in_features),
        lambda: ("nm_forward", m_bucket(rows), out_features, in_features, f"{n}:{m}", round(n / m, 4), str(x.dtype)),
        x.device, (x, values), heuristic, lambda: nm_candidates(rows, out_features), run))
    return out
