"""Triton kernels of the N:M family: forward, input gradient and kept-value gradient.

The weight keeps ``n`` of every ``m`` consecutive input features in each row: ``values[out, kept]``
(``kept = in_features * n / m``) and the packed in-group offsets ``positions[out, ...]`` (uint8,
``BITS`` bits per offset, low bits first; see sparsekernels/formats/nm.py).

The kernels never store a dense weight. A ``[BLOCK_OUT, BLOCK_IN]`` tile of it is rebuilt in
registers when needed (:func:`_dense_weight_tile`): viewed as ``[BLOCK_OUT, groups, m]``, each of the
``n`` kept values of a group is placed at its offset with a compare-and-select, and the tile goes to
``tl.dot`` like a dense one. The kept-value gradient goes the other way (:func:`_kept_from_dense`):
a dense ``grad_out.T @ x`` tile is computed with ``tl.dot`` and the kept offsets are picked from it.

* forward      one program per (row tile, output tile): ``out = x @ W.T (+ bias)`` over in_features.
* grad input   one program per (row tile, input tile): ``grad_x = grad_out @ W`` over out_features.
* grad values  one program per (output tile, input tile): the sampled product, over all rows.

``BLOCK_IN`` is 64, a multiple of every m (2, 4, 8, 16), so groups never straddle tiles; in_features
need not be a multiple of it (the tail is masked).
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ..reference import NM_BITS_PER_POSITION
from ._common import dot_accumulate, dot_mode, launch, rows_block, target_programs

__all__ = ["nm_forward", "nm_grad_input", "nm_grad_values"]

BLOCK_IN = 64


@triton.jit
def _kept_offsets(positions_ptr, offs_out, kept_index, mask, stride_pos_row,
                  BITS: tl.constexpr):
    """In-group offsets ``[BLOCK_OUT, groups]`` of the kept values at ``kept_index`` (per group)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    byte_ptrs = positions_ptr + offs_out[:, None] * stride_pos_row + (kept_index // PER_BYTE)[None, :]
    packed = tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)
    return (packed >> ((kept_index % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _dense_weight_tile(values_ptr, positions_ptr, offs_out, out_mask, in_start, n_groups,
                       stride_val_row, stride_pos_row,
                       N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
                       BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """Dense weight ``W[offs_out, in_start : in_start + BLOCK_IN]`` (float32, zeros where pruned)."""
    GROUPS: tl.constexpr = BLOCK_IN // M
    groups = in_start // M + tl.arange(0, GROUPS)
    mask = out_mask[:, None] & (groups < n_groups)[None, :]
    in_group = tl.arange(0, M)
    tile = tl.zeros([BLOCK_OUT, GROUPS, M], dtype=tl.float32)
    for slot in tl.static_range(N):
        kept_index = groups * N + slot
        kept = tl.load(values_ptr + offs_out[:, None] * stride_val_row + kept_index[None, :], mask=mask, other=0.0)
        offset = _kept_offsets(positions_ptr, offs_out, kept_index, mask, stride_pos_row, BITS)
        # Offsets of one group are distinct, so each dense element receives at most one kept value.
        tile += tl.where(offset[:, :, None] == in_group[None, None, :], kept.to(tl.float32)[:, :, None], 0.0)
    return tl.reshape(tile, [BLOCK_OUT, BLOCK_IN])


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
        w = _dense_weight_tile(values_ptr, positions_ptr, offs_out64, out_mask, in_start, n_groups,
                               stride_val_row, stride_pos_row, N, M, BITS, BLOCK_OUT, BLOCK_IN)
        acc = dot_accumulate(x_tile, tl.trans(w.to(x_tile.dtype)), acc, DOT)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_out, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_rows.to(tl.int64)[:, None] * stride_out_row + offs_out[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])


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
        w = _dense_weight_tile(values_ptr, positions_ptr, offs_out.to(tl.int64), out_mask, in_start, n_groups,
                               stride_val_row, stride_pos_row, N, M, BITS, BLOCK_OUT, BLOCK_IN)
        acc = dot_accumulate(g_tile, w.to(g_tile.dtype), acc, DOT)

    out_ptrs = grad_x_ptr + offs_rows.to(tl.int64)[:, None] * stride_gx_row + offs_in[None, :]
    tl.store(out_ptrs, acc.to(grad_x_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_in < in_features)[None, :])


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
    g_cols = grad_out_ptr + offs_out[:, None] * stride_g_col
    x_cols = x_ptr + offs_in[None, :] * stride_x_col

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
        offset = _kept_offsets(positions_ptr, offs_out64, kept_index, mask, stride_pos_row, BITS)
        picked = tl.sum(tl.where(offset[:, :, None] == in_group[None, None, :], dense_by_group, 0.0), axis=2)
        out_ptrs = grad_values_ptr + offs_out64[:, None] * stride_gv_row + kept_index[None, :]
        tl.store(out_ptrs, picked.to(grad_values_ptr.dtype.element_ty), mask=mask)


def _out_block(out_features: int, other_tiles: int, device) -> int:
    """Output-feature tile: 64 wide, narrower for small out_features or when the grid (output tiles
    times ``other_tiles`` along the other axis) would be too small to fill the GPU (decode batches)."""
    block, wanted = 64, target_programs(device)
    while block > 16 and (block >= 2 * out_features or other_tiles * triton.cdiv(out_features, block) < wanted):
        block //= 2
    return block


def nm_forward(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    """``x @ W.T (+ bias)`` for 2-D ``x[rows, in_features]``; returns ``[rows, out_features]``."""
    out_features, kept = values.shape
    in_features = kept // n * m
    rows = x.shape[0]
    out = x.new_empty((rows, out_features))
    if out.numel() == 0:
        return out
    values, positions = values.contiguous(), positions.contiguous()
    block_rows = rows_block(rows)
    row_tiles = triton.cdiv(rows, block_rows)
    block_out = _out_block(out_features, row_tiles, x.device)
    grid = (row_tiles, triton.cdiv(out_features, block_out))
    launch(_nm_forward_kernel, grid,
        x, values, positions, out if bias is None else bias.contiguous(), out,
        rows, out_features, in_features,
        x.stride(0), x.stride(1), values.stride(0), positions.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, N=n, M=m, BITS=NM_BITS_PER_POSITION[m],
        BLOCK_ROWS=block_rows, BLOCK_OUT=block_out, BLOCK_IN=BLOCK_IN, DOT=dot_mode(_nm_forward_kernel, x.dtype),
    )
    return out


def nm_grad_input(grad_out: Tensor, values: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    """``grad_out @ W`` for 2-D ``grad_out[rows, out_features]``; returns ``[rows, in_features]``."""
    out_features, kept = values.shape
    in_features = kept // n * m
    rows = grad_out.shape[0]
    grad_x = grad_out.new_empty((rows, in_features))
    if grad_x.numel() == 0:
        return grad_x
    values, positions = values.contiguous(), positions.contiguous()
    block_rows = rows_block(rows)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(in_features, BLOCK_IN))
    launch(_nm_grad_input_kernel, grid,
        grad_out, values, positions, grad_x,
        rows, out_features, in_features,
        grad_out.stride(0), grad_out.stride(1), values.stride(0), positions.stride(0), grad_x.stride(0),
        N=n, M=m, BITS=NM_BITS_PER_POSITION[m], BLOCK_ROWS=block_rows, BLOCK_OUT=32, BLOCK_IN=BLOCK_IN,
        DOT=dot_mode(_nm_grad_input_kernel, grad_out.dtype),
    )
    return grad_x


def nm_grad_values(grad_out: Tensor, x: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    """Gradient of the kept values, ``[out_features, in_features * n / m]``, from 2-D operands."""
    out_features, in_features = grad_out.shape[1], x.shape[1]
    grad_values = x.new_empty((out_features, in_features // m * n))
    if grad_values.numel() == 0:
        return grad_values
    positions = positions.contiguous()
    block_out = _out_block(out_features, triton.cdiv(in_features, BLOCK_IN), x.device)
    grid = (triton.cdiv(out_features, block_out), triton.cdiv(in_features, BLOCK_IN))
    launch(_nm_grad_values_kernel, grid,
        grad_out, x, positions, grad_values,
        x.shape[0], out_features, in_features,
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), positions.stride(0),
        grad_values.stride(0),
        N=n, M=m, BITS=NM_BITS_PER_POSITION[m], BLOCK_ROWS=32, BLOCK_OUT=block_out, BLOCK_IN=BLOCK_IN,
        DOT=dot_mode(_nm_grad_values_kernel, x.dtype),
    )
    return grad_values
