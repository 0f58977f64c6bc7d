"""Triton N:M forward: ``out = x @ W.T (+ bias)``, one program per (row tile, output tile).

The weight keeps ``n`` of every ``m`` consecutive input features in each row: ``values[out, kept]``
and packed in-group offsets ``positions`` (see sparsekernels/formats/nm.py). The kernel never stores
a dense weight: each ``[BLOCK_OUT, 64]`` tile is rebuilt in registers (``_common.nm_dense_weight_tile``)
and goes to ``tl.dot`` like a dense one. in_features need not be a multiple of 64 (the tail is masked).

NaN and Inf. In that dense product a dropped weight is a stored 0, so a NaN or Inf input would reach
every output of its row (``0 * Inf = NaN``), while a dropped weight must be absent (docs/reliability.md).
The dense product cannot hide such an input: it meets the whole weight tile, zeros included, and
leaves its row of the accumulator non-finite. So one check of the finished accumulator proves the
tile exact, and that is all the common case pays (one reduction per program). A tile that fails it
(a NaN / Inf input or weight, or an overflow) is computed again by ``_nm_forward_kept_only``: every
kept term on its own, none for a dropped weight. That path is much slower than the dot, and it is
kept small in registers on purpose, so that it does not raise the register count, and so lower the
occupancy, of the common path it shares the kernel with.
"""

from __future__ import annotations

from typing import Callable, Optional

import triton
import triton.language as tl
from torch import Tensor

from ..reference import NM_BITS_PER_POSITION
from ._common import (
    NM_BLOCK_IN, NM_KEPT_ONLY_ROWS, Config, add_kept_terms, any_nonfinite, cdiv, dot_accumulate, dot_mode,
    launch, m_bucket, nm_candidates, nm_dense_weight_tile, nm_group_slots, nm_out_block, rows_block,
    tuned_config,
)

__all__ = ["nm_forward", "plan_nm_forward"]


@triton.jit
def _add_bias_and_store(acc, bias_ptr, out_ptr, offs_rows, offs_out, row_mask, out_mask, stride_out_row,
                        HAS_BIAS: tl.constexpr):
    """Add the bias (``HAS_BIAS``) to a float32 tile of outputs and store it in the output dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_out, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_rows.to(tl.int64)[:, None] * stride_out_row + offs_out[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def _nm_forward_kept_only(
    x_ptr, values_ptr, positions_ptr, bias_ptr, out_ptr, row_start, offs_out, out_mask,
    rows, n_groups, stride_x_row, stride_x_col, stride_val_row, stride_pos_row, stride_out_row,
    HAS_BIAS: tl.constexpr, N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, CHUNK_ROWS: tl.constexpr,
):
    """The exact path: this program's outputs (bias added, stored) summed over kept terms only, each
    formed on its own, with IEEE NaN / Inf semantics. ``CHUNK_ROWS`` rows at a time; per input group,
    its kept slots are loaded once, then one column at a time: ``x[:, column]`` times the kept
    ``W[:, column]`` (``_common.add_kept_terms``)."""
    offs_out64 = offs_out.to(tl.int64)
    for chunk_start in range(row_start, tl.minimum(row_start + BLOCK_ROWS, rows), CHUNK_ROWS):
        offs_rows = chunk_start + tl.arange(0, CHUNK_ROWS)
        row_mask = offs_rows < rows
        x_rows = x_ptr + offs_rows.to(tl.int64)[:, None] * stride_x_row
        acc = tl.zeros([CHUNK_ROWS, BLOCK_OUT], dtype=tl.float32)
        for group in range(0, n_groups):
            kept_values, kept_offsets = nm_group_slots(values_ptr, positions_ptr, offs_out64, out_mask, group,
                                                       stride_val_row, stride_pos_row, N, M, BITS)
            for offset in range(0, M):
                column = tl.cast(group * M + offset, tl.int64)  # 64-bit before the stride (docs/reliability.md)
                x_column = tl.load(x_rows + column * stride_x_col, mask=row_mask[:, None], other=0.0)
                # Offsets within a group are distinct: at most one slot per output holds this column.
                here = kept_offsets == offset
                w_column = tl.sum(tl.where(here, kept_values, 0.0), axis=1)
                kept = tl.max(here.to(tl.int32), axis=1) > 0
                acc = add_kept_terms(acc, x_column, w_column[None, :], kept[None, :])
        _add_bias_and_store(acc, bias_ptr, out_ptr, offs_rows, offs_out, row_mask, out_mask, stride_out_row,
                            HAS_BIAS)


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
        x_tile = tl.load(x_rows + offs_in.to(tl.int64)[None, :] * stride_x_col,
                         mask=row_mask[:, None] & (offs_in < in_features)[None, :], other=0.0)
        w = nm_dense_weight_tile(values_ptr, positions_ptr, offs_out64, out_mask, in_start, n_groups,
                               stride_val_row, stride_pos_row, N, M, BITS, BLOCK_OUT, BLOCK_IN)
        acc = dot_accumulate(x_tile, tl.trans(w.to(x_tile.dtype)), acc, DOT)

    # All finite: no NaN / Inf met a dropped zero, the tile is exact. Else the kept-only path (module docstring).
    if any_nonfinite(acc):
        _nm_forward_kept_only(x_ptr, values_ptr, positions_ptr, bias_ptr, out_ptr, tl.program_id(0) * BLOCK_ROWS,
                              offs_out, out_mask, rows, n_groups,
                              stride_x_row, stride_x_col, stride_val_row, stride_pos_row, stride_out_row,
                              HAS_BIAS, N, M, BITS, BLOCK_ROWS, BLOCK_OUT, NM_KEPT_ONLY_ROWS)
    else:
        _add_bias_and_store(acc, bias_ptr, out_ptr, offs_rows, offs_out, row_mask, out_mask, stride_out_row, HAS_BIAS)



def plan_nm_forward(x: Tensor, out: Tensor, values: Tensor, positions: Tensor, n: int, m: int,
                    bias: Optional[Tensor]) -> Callable[..., None]:
    """Every host decision of a forward on these operands, taken once (configuration, grid, kernel
    arguments; at most 16 rows, ``nm_forward_small_m``'s plan). ``out`` is a fresh
    ``[rows, out_features]`` tensor, the weight operands are contiguous. Returns
    ``launch_forward(x, out, values, positions, bias)`` for operands with the same shapes, strides,
    dtype and device, ``bias`` present or not as here."""
    from . import nm_forward_small_m as small_m

    out_features, kept = values.shape
    in_features = kept // n * m
    rows = x.shape[0]
    # Decode-sized batches: the kernel that reads only the compressed weight (no tl.dot). A symbolic
    # row count (dynamic-shape tracing) stays here rather than specialising the graph on it.
    if type(rows) is int and rows <= small_m.SMALL_M_MAX_ROWS:
        return small_m.plan_nm_forward_small_m(x, out, values, positions, n, m, bias)
    stride_x_row, stride_x_col = x.stride()
    strides = (stride_x_row, stride_x_col, values.stride(0), positions.stride(0), out.stride(0))
    dot = dot_mode(_nm_forward_kernel, x.dtype)

    def launch_with(config: Config):
        grid = (cdiv(rows, config.block_rows), cdiv(out_features, config.tile))
        constants = dict(HAS_BIAS=bias is not None, N=n, M=m, BITS=NM_BITS_PER_POSITION[m],
                         BLOCK_ROWS=config.block_rows, BLOCK_OUT=config.tile, BLOCK_IN=NM_BLOCK_IN, DOT=dot,
                         num_warps=config.num_warps, num_stages=config.num_stages)

        def launch_forward(x, out, values, positions, bias) -> None:
            launch(_nm_forward_kernel, grid, x, values, positions, out if bias is None else bias, out,
                   rows, out_features, in_features, *strides, **constants)

        return launch_forward

    block_rows = rows_block(rows)

    def heuristic() -> Config:
        return Config(block_rows, nm_out_block(out_features, cdiv(rows, block_rows), x.device), 4, 3)

    config = tuned_config(
        (rows, out_features, in_features),
        lambda: ("nm_forward", m_bucket(rows), out_features, in_features, f"{n}:{m}", round(n / m, 4), str(x.dtype)),
        x.device, (x, values), heuristic, lambda: nm_candidates(rows, out_features),
        lambda config: launch_with(config)(x, out, values, positions, bias))
    return launch_with(config)


def nm_forward(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    """``x @ W.T (+ bias)`` for 2-D ``x[rows, in_features]``; returns ``[rows, out_features]``.

    At most 16 rows go to ``nm_forward_small_m`` (reads only the compressed weight, no ``tl.dot``)."""
    out = x.new_empty((x.shape[0], values.shape[0]))
    if out.numel() == 0:
        return out
    values, positions = values.contiguous(), positions.contiguous()
    bias = None if bias is None else bias.contiguous()
    plan_nm_forward(x, out, values, positions, n, m, bias)(x, out, values, positions, bias)
    return out
