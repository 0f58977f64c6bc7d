"""Program order of the block-sparse forward and input-gradient kernels: long lines first, grouped.

Both kernels give each program one (row tile, block line) pair, where a *line* is a block row of W
(forward, walking the BSR index) or a block column (input gradient, walking the CSC index), and a
program's work is proportional to the number of kept blocks on its line. Real patterns are uneven
(pruning keeps whole rows of important blocks and empties others), so two choices are made here:

* **Long lines first.** Lines are visited in descending order of kept-block count (ties keep their
  natural order): the GPU schedules programs roughly in launch order, so the longest programs start
  in the first wave and the short ones, down to empty lines, fill the tail instead of one long line
  starting last and running alone. The order is ``argsort`` of the line lengths, an int32 tensor on
  the index's device, computed without a host sync and cached per offsets tensor (weakly, like the
  dense-weight cache of dispatch.py): it is computed once per pattern, not per call. The cache
  entry is stamped with the offsets tensor's ``_version``, ``data_ptr()`` and length, so an in-place
  pattern change (``SparseLinear.set_pattern`` overwrites the index buffers with ``copy_``) computes
  it again. A stale order would still be a permutation of the lines (results stay right); only the
  balance would suffer.
* **Grouped tiles.** The launch is one-dimensional and the program id is mapped onto
  (row tile, sorted line, part) by :func:`grouped_block_tile`: ``GROUP`` consecutive row tiles are
  swept together over every line before the next group starts (the ``GROUP_M`` swizzle of Triton's
  matmul tutorial, with lines in the place of output-column tiles). Programs in flight then share a
  few x (or grad_out) row tiles, ``GROUP * BLOCK_ROWS`` rows that stay in L2, and each line's weight
  blocks are read by ``GROUP`` programs close together in time, rather than sweeping every row tile
  of the batch (all of x through L2) for each line. Inside every group the lines come longest
  first, so the last group ends with the shortest programs too.

A one-dimensional grid also lifts the 65535 limit of grid axis 1 on the number of lines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

from ._common import cdiv

__all__ = ["LINE_GROUP", "line_order", "clear_order_cache", "grouped_block_tile", "block_grid"]

# Row tiles per group of the grouped order (GROUP of the kernels). 8 is the value of Triton's matmul
# tutorial: 8 row tiles of 64 rows keep 512 rows of x in flight, a small part of L2.
LINE_GROUP = 8

# Largest one-dimensional grid (CUDA limit of grid axis 0).
MAX_GRID_X = 2**31 - 1

_order_cache = WeakIdKeyDictionary()  # offsets tensor -> (stamp, order)


def _long_first_order(offsets: Tensor) -> Tensor:
    """Line numbers, int32, by descending kept-block count (stable): on device, no host sync."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)


def _stamp(offsets: Tensor):
    try:
        return offsets._version, offsets.data_ptr(), offsets.shape[0]
    except RuntimeError:  # inference tensors have no version counter; fake tensors no data
        return None


def line_order(offsets: Tensor) -> Tensor:
    """The long-lines-first order of the lines of ``offsets`` (``block_row_offsets`` or
    ``block_col_offsets``): int32 ``[lines]`` on the same device.

    Cached per ``offsets`` tensor while its stamp is unchanged. Not cached (computed afresh, as
    traceable torch ops) for meta and fake tensors (shape inference, torch.compile tracing: nothing
    runs, or the graph records the computation), for inference tensors (no version counter) and
    during CUDA graph capture (a tensor computed there holds its values only once the graph is
    replayed, so an eager call must not find it in the cache).
    """
    # The hit comes first: it is the per-launch cost. Only real tensors outside capture are ever
    # stored, so a hit is always a computed order (using one during capture is fine).
    entry = _order_cache.get(offsets)
    stamp = _stamp(offsets) if entry is not None else None
    if stamp is not None and entry[0] == stamp:
        return entry[1]
    if offsets.device.type == "meta" or is_fake(offsets) or torch.compiler.is_compiling():
        return _long_first_order(offsets)
    if offsets.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _long_first_order(offsets)
    stamp = _stamp(offsets)
    if stamp is None:
        return _long_first_order(offsets)
    order = _long_first_order(offsets)
    _order_cache[offsets] = (stamp, order)
    return order


def clear_order_cache() -> None:
    """Drop every cached order (writes the version counter cannot see, through ``.data`` aliases or
    DLPack, are not detected: call this after them)."""
    _order_cache.clear()


def block_grid(rows: int, block_rows: int, n_lines: int, parts: int) -> tuple:
    """The one-dimensional grid of :func:`grouped_block_tile`: every (row tile, line, part)."""
    programs = cdiv(rows, block_rows) * n_lines * parts
    # The kernels compute program numbers in int32: the grid and one group's span must fit.
    if max(programs, LINE_GROUP * n_lines * parts) > MAX_GRID_X:
        raise ValueError(
            f"{programs} programs ({rows} rows in tiles of {block_rows}, {n_lines} block lines in {parts} "
            f"parts) exceed the grid limit {MAX_GRID_X}; split the batch"
        )
    return (programs,)


@triton.jit
def grouped_block_tile(pid, rows, line_order_ptr, n_lines,
                       B: tl.constexpr, TILE: tl.constexpr, BLOCK_ROWS: tl.constexpr, GROUP: tl.constexpr):
    """``(row_tile, line, part)`` of program ``pid`` in the grouped, long-lines-first order.

    Slots are (sorted line, part) pairs, ``B // TILE`` parts per line (a part is a ``TILE``-wide
    slice of the line's outputs). Programs come in groups of ``GROUP`` row tiles times every slot;
    inside a group the row tile varies fastest, then the part, then the sorted line. The last group
    may have fewer row tiles (``group_rows``), which keeps the mapping a bijection onto
    ``cdiv(rows, BLOCK_ROWS) * n_lines * (B // TILE)`` programs.
    """
    PARTS: tl.constexpr = B // TILE
    n_row_tiles = tl.cdiv(rows, BLOCK_ROWS)
    programs_per_group = GROUP * n_lines * PARTS
    first_row_tile = (pid // programs_per_group) * GROUP
    group_rows = tl.minimum(n_row_tiles - first_row_tile, GROUP)
    in_group = pid % programs_per_group
    row_tile = first_row_tile + in_group % group_rows
    slot = in_group // group_rows
    line = tl.load(line_order_ptr + slot // PARTS)
    return row_tile, line, slot % PARTS
