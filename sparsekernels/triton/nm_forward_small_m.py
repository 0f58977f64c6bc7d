"""Triton N:M forward for decode-sized batches (at most 16 rows): reads only the compressed weight.

``out = x @ W.T (+ bias)`` for ``x[rows, in_features]`` with ``rows <= SMALL_M_MAX_ROWS``. With so few
rows the product is bound by the bytes of the weight, not by arithmetic: every weight element is used
``rows`` times only, too few to feed tensor cores (a ``tl.dot`` needs at least 16 rows and would pad
the rest with zeros). So, unlike ``nm_forward.py``, this kernel never rebuilds a dense weight tile
(which is ``m / n`` times larger than what is stored) and never calls ``tl.dot``: it streams
``values[out, kept]`` and the packed ``positions`` once, with contiguous loads along the kept
dimension, and for each kept value gathers ``x[:, group * m + offset]`` (x is tiny: it stays in
L1/L2) and accumulates ``value * x`` in float32 with elementwise multiply-adds.

Only kept products are ever formed, so a NaN or Inf in an input column whose weights are all dropped
never reaches the output (a dropped weight is absent, not ``0 * NaN``; docs/reliability.md), and a
non-finite kept input or weight propagates as in a dense product over the kept weights.

Grid: ``(output tiles, kept splits)``. When the output tiles alone are fewer programs than the GPU
wants (``_common.target_programs``), the kept dimension is split (split-K): each split writes a
float32 partial ``[rows, BLOCK_OUT]`` to its own plane of a ``[splits, rows, out]`` buffer, and a
second small kernel sums the planes in a fixed order, adds the bias and rounds once, so the result is
deterministic (no atomics). Without a split the bias is added in the main kernel's epilogue.

Not measured on a GPU yet: the tile sizes below are reasoned, and the tuner picks among candidates
on the first GPU run.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import NM_BITS_PER_POSITION
from . import _common
from ._common import Config, cdiv, launch, m_bucket, nm_out_block, tuned_config

__all__ = ["SMALL_M_MAX_ROWS", "nm_forward_small_m", "plan_nm_forward_small_m"]

# nm_forward.nm_forward sends batches of at most this many (flattened) rows here.
SMALL_M_MAX_ROWS = 16

# float32 products one thread holds in the [ROWS, BLOCK_OUT, BLOCK_KEPT] register tile; BLOCK_KEPT
# follows from it (see kept_block).
PRODUCTS_PER_THREAD = 16
# BLOCK_KEPT bounds: at least 8 so that a chunk is a whole number of packed position bytes for every
# m (8 offsets per byte for m=2), at most 128 (a 256-byte run of float16 values per weight row).
MIN_BLOCK_KEPT, MAX_BLOCK_KEPT = 8, 128
# Split-K: each split walks at least this many BLOCK_KEPT chunks (a split of one chunk would spend
# more on its partial than on its weights), and there are at most MAX_SPLITS of them.
MIN_CHUNKS_PER_SPLIT = 2
MAX_SPLITS = 64
# Elements of the partial buffer summed per program by the reduction kernel.
SUM_BLOCK = 256


@triton.jit
def _kept_offsets(positions_ptr, offs_out, out_mask, kept_start, n_position_bytes, stride_pos_row,
                  BITS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_KEPT: tl.constexpr):
    """In-group offsets ``[BLOCK_OUT, BLOCK_KEPT]`` of kept values ``kept_start ..`` (int32).

    Each packed byte is loaded once (``[BLOCK_OUT, BLOCK_KEPT / PER_BYTE]``, contiguous along the row)
    and split into its ``PER_BYTE`` offsets, low bits first: kept value ``j`` is in byte
    ``j // PER_BYTE`` at bit ``(j % PER_BYTE) * BITS`` (formats/nm.py). ``kept_start`` is a multiple of
    ``BLOCK_KEPT``, itself a multiple of ``PER_BYTE``, so a chunk starts on a byte boundary.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES: tl.constexpr = BLOCK_KEPT // PER_BYTE
    byte_index = kept_start // PER_BYTE + tl.arange(0, BYTES)
    packed = tl.load(positions_ptr + offs_out[:, None] * stride_pos_row + byte_index[None, :],
                     mask=out_mask[:, None] & (byte_index < n_position_bytes)[None, :], other=0).to(tl.int32)
    shifts = tl.arange(0, PER_BYTE) * BITS
    offsets = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    # Row-major reshape: element (byte b, slot s) becomes kept value b * PER_BYTE + s.
    return tl.reshape(offsets, [BLOCK_OUT, BLOCK_KEPT])


@triton.jit
def _nm_forward_small_m_kernel(
    x_ptr, values_ptr, positions_ptr, bias_ptr, out_ptr,
    rows, out_features, kept, kept_per_split, n_position_bytes,
    stride_x_row, stride_x_col, stride_val_row, stride_pos_row, stride_out_split, stride_out_row,
    HAS_BIAS: tl.constexpr, N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_KEPT: tl.constexpr,
):
    """One program: output features ``[BLOCK_OUT]`` of every row, over kept values of split
    ``program_id(1)``. ``out_ptr`` is the output (one split: bias added, rounded to its dtype) or the
    float32 partial buffer (several: no bias; ``_sum_splits_kernel`` finishes)."""
    offs_out = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_mask = offs_out < out_features
    offs_out64 = offs_out.to(tl.int64)
    offs_rows = tl.arange(0, ROWS)  # ROWS: rows rounded up to a power of two, padding rows masked
    row_mask = offs_rows < rows
    x_rows = x_ptr + offs_rows.to(tl.int64)[:, None, None] * stride_x_row
    value_rows = values_ptr + offs_out64[:, None] * stride_val_row
    kept_begin = tl.program_id(1) * kept_per_split
    kept_end = tl.minimum(kept_begin + kept_per_split, kept)

    # Products accumulate elementwise in a [ROWS, BLOCK_OUT, BLOCK_KEPT] float32 tile and are summed
    # over the kept axis once, after the loop: the loop body is loads and multiply-adds only, no
    # cross-thread reduction per chunk. (A loop over the rows would need a row-select to update one
    # row of a [ROWS, BLOCK_OUT] accumulator, ROWS times the work.)
    acc = tl.zeros([ROWS, BLOCK_OUT, BLOCK_KEPT], dtype=tl.float32)
    for kept_start in range(kept_begin, kept_end, BLOCK_KEPT):
        kept_index = kept_start + tl.arange(0, BLOCK_KEPT)
        kept_mask = out_mask[:, None] & (kept_index < kept_end)[None, :]
        # The weight stream: BLOCK_KEPT contiguous values per row (the only large read).
        weight = tl.load(value_rows + kept_index[None, :], mask=kept_mask, other=0.0).to(tl.float32)
        offset = _kept_offsets(positions_ptr, offs_out64, out_mask, kept_start, n_position_bytes,
                               stride_pos_row, BITS, BLOCK_OUT, BLOCK_KEPT)
        # Input feature of each kept value. A valid offset is < M; m = 8 stores 4-bit codes, so a
        # corrupted code is clamped to the group (wrong numbers, never a read past the row).
        column = (kept_index // N * M)[None, :] + tl.minimum(offset, M - 1)
        # Gather x at the kept columns only (masked lanes load nothing): dropped inputs are never read.
        x_kept = tl.load(x_rows + column.to(tl.int64)[None, :, :] * stride_x_col,
                         mask=row_mask[:, None, None] & kept_mask[None, :, :], other=0.0)
        acc += x_kept.to(tl.float32) * weight[None, :, :]

    result = tl.sum(acc, axis=2)
    if HAS_BIAS:
        result += tl.load(bias_ptr + offs_out, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = (out_ptr + tl.program_id(1).to(tl.int64) * stride_out_split
                + offs_rows.to(tl.int64)[:, None] * stride_out_row + offs_out64[None, :])
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, numel, out_features, splits,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``out = sum(partial[0..splits-1]) + bias`` over the flat ``[rows * out_features]`` output,
    in float32, split 0 first (a fixed order: deterministic), rounded once. Flat int32 offsets are
    enough: there are splits only while the output tiles are fewer than ``target_programs``, so
    ``numel`` is at most 16 rows times a few thousand tiles of 128 outputs."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.zeros([BLOCK], dtype=tl.float32)
    plane = partial_ptr + offs
    for _ in range(0, splits):
        total += tl.load(plane, mask=mask, other=0.0)
        plane += numel  # next split's plane (pointer arithmetic: no int32 product to overflow)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs % out_features, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def kept_block(rows_padded: int, block_out: int, num_warps: int) -> int:
    """BLOCK_KEPT for a program of ``num_warps`` warps over ``rows_padded x block_out`` outputs: the
    product tile holds ``PRODUCTS_PER_THREAD`` floats per thread, between 8 and 128 kept values (all
    factors are powers of two). One row at 64 outputs and 4 warps streams 32 values per weight row
    per step; 16 rows at 32 outputs, 8."""
    products = PRODUCTS_PER_THREAD * 32 * num_warps
    return max(MIN_BLOCK_KEPT, min(MAX_BLOCK_KEPT, products // (rows_padded * block_out)))


def split_count(out_tiles: int, kept: int, block_kept: int, device) -> int:
    """How many kept-dimension splits: 1 when the output tiles fill the device, else enough to reach
    ``target_programs`` if the kept dimension has at least MIN_CHUNKS_PER_SPLIT chunks per split."""
    wanted = _common.target_programs(device)
    if out_tiles >= wanted:
        return 1
    chunks = cdiv(kept, block_kept)
    return max(1, min(cdiv(wanted, out_tiles), chunks // MIN_CHUNKS_PER_SPLIT, MAX_SPLITS))


def fits_registers(rows_padded: int, block_out: int, num_warps: int) -> bool:
    """Whether the product tile holds at most twice PRODUCTS_PER_THREAD per thread (it can hold more
    only where BLOCK_KEPT is held at its minimum of 8: wide tiles at 16 rows). Compiled for sm_90,
    float16, 2:4, the tiles within this bound used at most 158 registers per thread and no stack; a
    64-wide tile at 16 rows with 4 warps (4x the budget) used 254."""
    products = rows_padded * block_out * kept_block(rows_padded, block_out, num_warps)
    return products <= 2 * PRODUCTS_PER_THREAD * 32 * num_warps


def heuristic_config(rows_padded: int, out_features: int, device) -> Config:
    """The N:M forward's output tile (64, narrowed down to 16 to fill the grid; split-K makes up the
    rest) with 4 warps, or 8 where 4 would not fit the registers."""
    tile = nm_out_block(out_features, 1, device)
    return Config(rows_padded, tile, 4 if fits_registers(rows_padded, tile, 4) else 8, 3)


def small_m_candidates(rows_padded: int, out_features: int) -> list:
    """Tuning candidates (at most 6): output tiles 32/64/128 (16/32 for tiny weights) and 4 or 8 warps
    (which also set BLOCK_KEPT, see kept_block; the split count follows from the tile), except those
    that do not fit the registers (fits_registers)."""
    tiles = [16, 32] if out_features <= 32 else [32, 64, 128]
    return [Config(rows_padded, tile, warps, 3) for tile in tiles for warps in (4, 8)
            if fits_registers(rows_padded, tile, warps)]


def plan_nm_forward_small_m(x: Tensor, out: Tensor, values: Tensor, positions: Tensor, n: int, m: int,
                            bias: Optional[Tensor]) -> Callable[..., None]:
    """Every host decision of a forward on these operands, taken once (configuration, splits, grids,
    kernel arguments). ``out`` is a fresh ``[rows, out_features]`` tensor, the weight operands are
    contiguous. Returns ``launch_forward(x, out, values, positions, bias)`` for operands with the same
    shapes, strides, dtype and device, ``bias`` present or not as here. With a split, each launch
    allocates its float32 partial buffer (from torch's caching allocator: no device sync)."""
    out_features, kept = values.shape
    in_features = kept // n * m
    rows = x.shape[0]
    if rows > SMALL_M_MAX_ROWS:
        raise ValueError(f"nm_forward_small_m takes at most {SMALL_M_MAX_ROWS} rows, got {rows}")
    has_bias = bias is not None
    rows_padded = m_bucket(rows)
    strides = (*x.stride(), values.stride(0), positions.stride(0))

    def launch_with(config: Config):
        block_kept = kept_block(rows_padded, config.tile, config.num_warps)
        out_tiles = cdiv(out_features, config.tile)
        splits = split_count(out_tiles, kept, block_kept, x.device)
        # Whole chunks per split, so every split starts on a chunk (and position byte) boundary.
        kept_per_split = max(1, cdiv(cdiv(kept, block_kept), splits)) * block_kept
        splits = max(1, cdiv(kept, kept_per_split))
        numel = rows * out_features
        constants = dict(HAS_BIAS=has_bias and splits == 1, N=n, M=m, BITS=NM_BITS_PER_POSITION[m],
                         ROWS=rows_padded, BLOCK_OUT=config.tile, BLOCK_KEPT=block_kept,
                         num_warps=config.num_warps, num_stages=config.num_stages)
        sizes = (rows, out_features, kept, kept_per_split, positions.shape[1], *strides,
                 numel if splits > 1 else 0, out_features)

        def launch_forward(x, out, values, positions, bias) -> None:
            bias_or_out = out if bias is None else bias
            if splits == 1:
                launch(_nm_forward_small_m_kernel, (out_tiles, 1), x, values, positions, bias_or_out, out,
                       *sizes, **constants)
                return
            partial = torch.empty((splits, rows, out_features), dtype=torch.float32, device=x.device)
            launch(_nm_forward_small_m_kernel, (out_tiles, splits), x, values, positions, bias_or_out, partial,
                   *sizes, **constants)
            launch(_sum_splits_kernel, (cdiv(numel, SUM_BLOCK),), partial, bias_or_out, out, numel, out_features,
                   splits, HAS_BIAS=has_bias, BLOCK=SUM_BLOCK, num_warps=4)

        return launch_forward

    config = tuned_config(
        (rows, out_features, in_features),
        lambda: ("nm_forward_small_m", rows_padded, out_features, in_features, f"{n}:{m}", round(n / m, 4),
                 str(x.dtype)),
        x.device, (x, values), lambda: heuristic_config(rows_padded, out_features, x.device),
        lambda: small_m_candidates(rows_padded, out_features),
        lambda config: launch_with(config)(x, out, values, positions, bias))
    return launch_with(config)


def nm_forward_small_m(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int,
                       bias: Optional[Tensor]) -> Tensor:
    """``x @ W.T (+ bias)`` for 2-D ``x[rows, in_features]`` with ``rows <= SMALL_M_MAX_ROWS`` (any
    strides); returns a contiguous ``[rows, out_features]`` tensor of x's dtype. The same as
    ``nm_forward`` on these rows (which plans them here), with the row limit enforced."""
    from .nm_forward import nm_forward

    if x.shape[0] > SMALL_M_MAX_ROWS:
        raise ValueError(f"nm_forward_small_m takes at most {SMALL_M_MAX_ROWS} rows, got {x.shape[0]}")
    return nm_forward(x, values, positions, n, m, bias)
