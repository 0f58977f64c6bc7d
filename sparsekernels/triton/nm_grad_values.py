"""Triton N:M kept-value gradient: the sampled product ``(grad_out.T @ x)`` at the kept positions.

One program per (output tile, input tile): a dense ``grad_out.T @ x`` tile over all rows by ``tl.dot``,
then the kept offsets are picked from it slot by slot (``_common.nm_kept_offsets``).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..reference import NM_BITS_PER_POSITION
from ._common import (
    NM_BLOCK_IN, Config, cdiv, dot_accumulate, dot_mode, launch, m_bucket, nm_kept_offsets, nm_out_block,
    tuned_config,
)

__all__ = ["nm_grad_values"]


@triton.jit
def _nm_grad_values_kernel(
    grad_out_ptr, x_ptr, positions_ptr, grad_values_ptr,
    rows, out_features, in_features,
    stride_g_row, stride_g_col, stride_x_row, stride_x_col, stride_pos_row, stride_gv_row,
    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, DOT: tl.constexpr,
):
    offs_out = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    in_start = tl.program_id(1) * BLOCK_IN
    offs_in = in_start + tl.arange(0, BLOCK_IN)
    out_mask = offs_out < out_features
    in_mask = offs_in < in_features
    # Column offsets in 64 bits, as the row offsets below: a column index times a large column
    # stride (a transposed operand) passes 2^31 elements.
    g_cols = grad_out_ptr + offs_out.to(tl.int64)[:, None] * stride_g_col
    x_cols = x_ptr + offs_in.to(tl.int64)[None, :] * stride_x_col

    # Dense grad_out.T @ x over every row, for this [BLOCK_OUT, BLOCK_IN] tile of the weight.
    dense = tl.zeros([BLOCK_OUT, BLOCK_IN], dtype=tl.float32)
    for row_start in range(0, rows, BLOCK_ROWS):
        offs_rows = row_start + tl.arange(0, BLOCK_ROWS)
        row_mask = offs_rows < rows
        g_t = tl.load(g_cols + offs_rows.to(tl.int64)[None, :] * stride_g_row,
                      mask=out_mask[:, None] & row_mask[None, :], other=0.0)
        x_tile = tl.load(x_cols + offs_rows.to(tl.int64)[:, None] * stride_x_row,
                         mask=row_mask[:, None] & in_mask[None, :], other=0.0)
        dense = dot_accumulate(g_t, x_tile, dense, DOT)

    # Pick the kept offsets out of it, slot by slot.
    GROUPS: tl.constexpr = BLOCK_IN // M
    groups = in_start // M + tl.arange(0, GROUPS)
    mask = out_mask[:, None] & (groups < in_features // M)[None, :]
    dense_by_group = tl.reshape(dense, [BLOCK_OUT, GROUPS, M])
    in_group = tl.arange(0, M)
    offs_out64 = offs_out.to(tl.int64)
    for slot in tl.static_range(N):
        kept_index = groups * N + slot
        offset = nm_kept_offsets(positions_ptr, offs_out64, kept_index, mask, stride_pos_row, BITS)
        picked = tl.sum(tl.where(offset[:, :, None] == in_group[None, None, :], dense_by_group, 0.0), axis=2)
        out_ptrs = grad_values_ptr + offs_out64[:, None] * stride_gv_row + kept_index[None, :]
        tl.store(out_ptrs, picked.to(grad_values_ptr.dtype.element_ty), mask=mask)



def nm_grad_values(grad_out: Tensor, x: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    """Gradient of the kept values, ``[out_features, in_features * n / m]``, from 2-D operands."""
    out_features, in_features = grad_out.shape[1], x.shape[1]
    rows = x.shape[0]
    grad_values = x.new_empty((out_features, in_features // m * n))
    if grad_values.numel() == 0:
        return grad_values
    positions = positions.contiguous()
    dot = dot_mode(_nm_grad_values_kernel, x.dtype)
    in_tiles = cdiv(in_features, NM_BLOCK_IN)

    def run(config: Config) -> None:
        # block_rows: the reduction chunk over the input rows; tile: BLOCK_OUT.
        launch(_nm_grad_values_kernel, (cdiv(out_features, config.tile), in_tiles),
               grad_out, x, positions, grad_values,
               rows, out_features, in_features,
               grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), positions.stride(0),
               grad_values.stride(0),
               N=n, M=m, BITS=NM_BITS_PER_POSITION[m], BLOCK_ROWS=config.block_rows, BLOCK_OUT=config.tile,
               BLOCK_IN=NM_BLOCK_IN, DOT=dot, num_warps=config.num_warps, num_stages=config.num_stages)

    heuristic = Config(32, nm_out_block(out_features, in_tiles, x.device), 4, 3)

    def candidates() -> list:
        tiles = sorted({heuristic.tile, 64} if out_features > 32 else {heuristic.tile})
        return [Config(block_rows, tile, warps, 3) for block_rows in (32, 64) for tile in tiles for warps in (4, 8)]

    run(tuned_config(
        (rows, out_features, in_features),
        lambda: ("nm_grad_values", m_bucket(rows), out_features, in_features, f"{n}:{m}", round(n / m, 4),
                 str(x.dtype)),
        x.device, (x, grad_out), heuristic, candidates, run))
    return grad_values
