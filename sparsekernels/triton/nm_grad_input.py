"""Triton N:M input gradient: ``grad_x = grad_out @ W``, one program per (row tile, input tile).

The same register rebuild of dense weight tiles as the forward (``_common.nm_dense_weight_tile``),
walking the output features.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..reference import NM_BITS_PER_POSITION
from ._common import (
    cdiv,
    NM_BLOCK_IN, Config, dot_accumulate, dot_mode, launch, m_bucket, nm_dense_weight_tile, rows_block, tuned_config,
)

__all__ = ["nm_grad_input"]


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
        g_tile = tl.load(g_rows + offs_out[None, :] * stride_g_col, mask=row_mask[:, None] & out_mask[None, :],
                         other=0.0)
        w = nm_dense_weight_tile(values_ptr, positions_ptr, offs_out.to(tl.int64), out_mask, in_start, n_groups,
                               stride_val_row, stride_pos_row, N, M, BITS, BLOCK_OUT, BLOCK_IN)
        acc = dot_accumulate(g_tile, w.to(g_tile.dtype), acc, DOT)

    out_ptrs = grad_x_ptr + offs_rows.to(tl.int64)[:, None] * stride_gx_row + offs_in[None, :]
    tl.store(out_ptrs, acc.to(grad_x_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_in < in_features)[None, :])



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
