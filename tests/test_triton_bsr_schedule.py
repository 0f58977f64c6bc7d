"""Load balance of the block-sparse Triton kernels: the long-lines-first, grouped program order of
the forward and input-gradient kernels (bsr_schedule.py), its per-pattern cache, and the split
reduction over rows of the weight gradient (bsr_grad_values.py, ``_common.row_split``).

Like tests/test_triton.py (the same setup: TRITON_INTERPRET without a GPU, the forced Triton
backend), on CPU tensors under the interpreter, or compiled on a GPU. The interpreter
asks for one program (``target_programs``), so the split tests pretend a GPU that wants many and
lower ``MIN_ROWS_PER_SPLIT``.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import sparsekernels as sk
from cases import DTYPES, SparseCase, assert_close, kept_values_of, skip_without_triton, triton_device
from sparsekernels import BlockSparseMatrix
from test_triton import narrowest_tiles

DEVICE = triton_device()
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
# After triton_device() (TRITON_INTERPRET is settled): triton.jit decides when a kernel is defined.
from sparsekernels.triton import bsr_schedule  # noqa: E402
from sparsekernels.triton.bsr_schedule import grouped_block_tile  # noqa: E402

pytestmark = [skip_without_triton(), pytest.mark.usefixtures("triton_backend")]


def lengths_to_offsets(lengths, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=DEVICE)


def long_first(lengths) -> list:
    """The documented order, by Python's stable sort: descending length, ties in line order."""
    return sorted(range(len(lengths)), key=lambda line: -lengths[line])


# ---------------------------------------------------------------------- the order and the mapping
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_line_order_is_longest_first_and_stable(index_dtype):
    lengths = [2, 0, 5, 2, 5, 1, 0, 7]
    order = bsr_schedule.line_order(lengths_to_offsets(lengths, index_dtype))
    assert order.dtype == torch.int32 and order.device.type == torch.device(DEVICE).type
    assert order.tolist() == long_first(lengths) == [7, 2, 4, 0, 3, 5, 1, 6]


@triton.jit
def _schedule_probe(order_ptr, out_ptr, rows, n_lines,
                    B: tl.constexpr, TILE: tl.constexpr, BLOCK_ROWS: tl.constexpr, GROUP: tl.constexpr):
    """Writes, for each program, the (row tile, line, part) that the block kernels' mapping gives it."""
    pid = tl.program_id(0)
    row_tile, line, part = grouped_block_tile(pid, rows, order_ptr, n_lines, B, TILE, BLOCK_ROWS, GROUP)
    tl.store(out_ptr + pid * 3, row_tile)
    tl.store(out_ptr + pid * 3 + 1, line)
    tl.store(out_ptr + pid * 3 + 2, part)


@pytest.mark.parametrize("rows, group, tile", [(5 * 16 + 3, 4, 16), (16, 4, 32), (3 * 16, 1, 16), (7 * 16, 8, 32)],
                         ids=["6-tiles-groups-4+2", "1-tile", "group-1", "7-tiles-one-partial-group"])
def test_grouped_mapping_follows_the_documented_order(rows, group, tile):
    """Program ids map one-to-one onto (row tile, line, part), in groups of ``group`` row tiles
    (the last one partial), lines longest first inside a group, row tile fastest, then part."""
    lengths = [1, 4, 0, 4, 2]
    block_size, block_rows = 32, 16
    parts, row_tiles = block_size // tile, triton.cdiv(rows, block_rows)
    order = bsr_schedule.line_order(lengths_to_offsets(lengths))
    programs = bsr_schedule.block_grid(rows, block_rows, len(lengths), parts)[0]
    assert programs == row_tiles * len(lengths) * parts
    out = torch.full((programs, 3), -1, dtype=torch.int32, device=DEVICE)
    _schedule_probe[(programs,)](order, out, rows, len(lengths), B=block_size, TILE=tile, BLOCK_ROWS=block_rows,
                                  GROUP=group)
    expected = [(row_tile, line, part)
                for first in range(0, row_tiles, group)
                for line in long_first(lengths)
                for part in range(parts)
                for row_tile in range(first, min(first + group, row_tiles))]
    assert [tuple(program) for program in out.tolist()] == expected


def test_block_grid_is_one_dimensional_and_bounded():
    # More lines than grid axis 1 could hold (65535): fine on the one-dimensional grid.
    assert bsr_schedule.block_grid(1, 16, 70000, 2) == (140000,)
    with pytest.raises(ValueError, match="exceed the grid limit"):
        bsr_schedule.block_grid(2**20 * 64, 64, 2**12, 1)


# ---------------------------------------------------------------------- uneven patterns, end to end
def _grid(rows: int, cols: int, kept) -> torch.Tensor:
    grid = torch.zeros(rows, cols, dtype=torch.bool)
    for row, col in kept:
        grid[row, col] = True
    return grid


UNEVEN_PATTERNS = {
    # 7 x 5 blocks: block row 3 full, rows 0, 2 and 5 empty, the others one block each.
    "full-row-empty-rows": _grid(7, 5, [(3, c) for c in range(5)] + [(1, 4), (4, 0), (6, 2)]),
    # 6 x 7 blocks: block column 4 full, one other block, every other column empty.
    "one-long-column": _grid(6, 7, [(r, 4) for r in range(6)] + [(2, 0)]),
    # 5 x 6 blocks: a staircase (row i keeps i + 1 blocks), so every line has a different length.
    "staircase": _grid(5, 6, [(r, c) for r in range(5) for c in range(r + 1)]),
}


def check_block_pattern(block_grid: torch.Tensor, block_size: int, dtype, rows: int, seed: int = 0) -> None:
    """Forward and both gradients of a block pattern against dense float32 on the masked weight."""
    torch.manual_seed(seed)
    dense = torch.randn(block_grid.shape[0] * block_size, block_grid.shape[1] * block_size).to(dtype)
    mask = block_grid.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    case = SparseCase(BlockSparseMatrix.from_block_mask(dense, block_grid).to(DEVICE), dense.to(DEVICE),
                      mask.to(DEVICE))
    input = torch.randn(rows, dense.shape[1], device=DEVICE).to(dtype).requires_grad_()
    values = case.matrix.values.detach().clone().requires_grad_()
    bias = torch.randn(dense.shape[0], device=DEVICE).to(dtype)
    output = sk.ops.bsr_linear(input, values, *case.matrix.index_tensors(), bias)
    weight = case.masked.float().requires_grad_()
    expected = F.linear(input.detach().float(), weight, bias.float())
    assert_close(output, expected, dtype, "output")
    grad_output = torch.randn_like(expected).to(dtype)
    output.backward(grad_output)
    expected.backward(grad_output.float())
    assert_close(input.grad, grad_output.float() @ case.masked.float(), dtype, "grad input")
    assert_close(values.grad, kept_values_of(case, weight.grad), dtype, "grad values")


@pytest.mark.parametrize("rows, group, narrow", [(1, 8, True), (37, 8, False), (150, 2, False), (150, 2, True)],
                         ids=["1-row-narrow", "37-rows", "150-rows-groups-of-2", "150-rows-groups-of-2-narrow"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", list(UNEVEN_PATTERNS), ids=str)
def test_uneven_patterns_match_dense(pattern, dtype, rows, group, narrow, monkeypatch):
    """Very uneven rows and columns, with groups smaller than the row tiles (several groups, the last
    partial; 150 rows are 3 tiles of 64) and with the narrow tiles of small batches (parts)."""
    from sparsekernels.triton import bsr_forward, bsr_grad_input

    monkeypatch.setattr(bsr_forward, "LINE_GROUP", group)
    monkeypatch.setattr(bsr_grad_input, "LINE_GROUP", group)
    with narrowest_tiles(narrow):
        check_block_pattern(UNEVEN_PATTERNS[pattern], 16, dtype, rows)


def test_uneven_pattern_with_large_blocks():
    """128-blocks (one part per line by default, four 32-wide parts when narrow) on the full-row pattern."""
    check_block_pattern(_grid(3, 2, [(1, 0), (1, 1)]), 128, torch.float32, 20)
    with narrowest_tiles():
        check_block_pattern(_grid(2, 3, [(0, 1), (1, 1)]), 128, torch.bfloat16, 3)


# ---------------------------------------------------------------------- the order cache
@pytest.fixture
def order_computations(monkeypatch):
    """Counts the orders computed (cache misses)."""
    computed = []
    real = bsr_schedule._long_first_order

    def counting(offsets):
        computed.append(offsets)
        return real(offsets)

    monkeypatch.setattr(bsr_schedule, "_long_first_order", counting)
    return computed


def _matrix(block_grid: torch.Tensor, block_size: int = 16) -> BlockSparseMatrix:
    dense = torch.randn(block_grid.shape[0] * block_size, block_grid.shape[1] * block_size)
    return BlockSparseMatrix.from_block_mask(dense, block_grid).to(DEVICE)


def test_order_is_computed_once_per_pattern(order_computations):
    matrix = _matrix(UNEVEN_PATTERNS["staircase"])
    values = matrix.values.clone().requires_grad_()
    input = torch.randn(5, matrix.shape[1], device=DEVICE, requires_grad=True)
    for _ in range(3):
        sk.ops.bsr_linear(input, values, *matrix.index_tensors()).sum().backward()
    # One order for the block rows (forward), one for the block columns (input gradient).
    assert len(order_computations) == 2
    assert order_computations[0] is matrix.block_row_offsets and order_computations[1] is matrix.block_col_offsets
    assert bsr_schedule.line_order(matrix.block_row_offsets) is bsr_schedule.line_order(matrix.block_row_offsets)
    assert len(order_computations) == 2


def test_in_place_pattern_change_recomputes_the_order(order_computations):
    """copy_ of another pattern with the same nnz into the index tensors (what SparseLinear.set_pattern
    does) bumps their version: the next call computes the new order, and the results follow the new
    pattern."""
    old_grid = UNEVEN_PATTERNS["staircase"]  # row lengths 1..5, columns 5..0
    new_grid = old_grid.flip(0)  # same nnz, row lengths 5..1
    old, new = _matrix(old_grid), _matrix(new_grid)
    input = torch.randn(4, old.shape[1], device=DEVICE)
    sk.ops.bsr_linear(input, old.values, *old.index_tensors())
    old_order = bsr_schedule.line_order(old.block_row_offsets).tolist()
    assert old_order == [4, 3, 2, 1, 0]

    for target, source in zip(old.index_tensors(), new.index_tensors()):
        target.copy_(source)
    old.values.copy_(new.values)
    assert bsr_schedule.line_order(old.block_row_offsets).tolist() == [0, 1, 2, 3, 4]
    output = sk.ops.bsr_linear(input, old.values, *old.index_tensors())
    assert_close(output, F.linear(input, new.to_dense()), torch.float32, "output after copy_")
    assert len(order_computations) == 2  # the first order, then the one after copy_


def test_meta_and_inference_tensors_are_not_cached():
    before = len(bsr_schedule._order_cache)
    meta = torch.tensor([0, 1, 3], dtype=torch.int32, device="meta")
    assert bsr_schedule.line_order(meta).shape == (2,)
    with torch.inference_mode():
        offsets = lengths_to_offsets([1, 3, 2])
        assert bsr_schedule.line_order(offsets).tolist() == [1, 2, 0]
    assert len(bsr_schedule._order_cache) == before


# ---------------------------------------------------------------------- split reduction over rows
@contextlib.contextmanager
def split_over_rows(min_rows: int):
    """Pretend a GPU that wants many programs (the interpreter asks for one) and allow slices of
    ``min_rows`` rows, so that the weight gradient splits its rows; records its launch grids."""
    from sparsekernels.triton import _common, bsr_grad_values

    grids = []
    real_launch = bsr_grad_values.launch

    def recording_launch(kernel, grid, *args, **kwargs):
        grids.append(grid)
        real_launch(kernel, grid, *args, **kwargs)

    with narrowest_tiles(), mock.patch.object(_common, "MIN_ROWS_PER_SPLIT", min_rows), \
            mock.patch.object(bsr_grad_values, "launch", recording_launch):
        yield grids


def grad_values_case(dtype, rows: int, seed: int = 0):
    """A few kept 16-blocks (5 x 3 grid, uneven), grad_out and x of ``rows`` rows, the dense
    expectation."""
    torch.manual_seed(seed)
    block_grid = _grid(5, 3, [(0, 1), (2, 0), (2, 1), (2, 2), (4, 2)])
    matrix = _matrix(block_grid).to(dtype=dtype)
    mask = block_grid.repeat_interleave(16, 0).repeat_interleave(16, 1).to(DEVICE)
    case = SparseCase(matrix, matrix.to_dense(), mask)
    grad_output = torch.randn(rows, matrix.shape[0], device=DEVICE).to(dtype)
    input = torch.randn(rows, matrix.shape[1], device=DEVICE).to(dtype)
    expected = kept_values_of(case, grad_output.float().T @ input.float())
    return matrix, grad_output, input, expected


def grad_values(matrix, grad_output, input):
    return torch.ops.sparsekernels_triton.bsr_linear_grad_values(grad_output, input, *matrix.index_tensors(), 16)


@pytest.mark.parametrize("rows, min_rows, splits", [(100, 32, 2), (300, 16, 10), (1, 1, 1), (2500, None, 2)],
                         ids=["100-rows-slices-64+36", "300-rows-10-slices", "1-row-no-split", "2500-rows-real-minimum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_weight_grad_matches_dense_and_unsplit(dtype, rows, min_rows, splits):
    from sparsekernels.triton import _common

    matrix, grad_output, input, expected = grad_values_case(dtype, rows)
    with mock.patch.object(_common, "MIN_ROWS_PER_SPLIT", 10**9):  # no split, on a GPU too
        unsplit = grad_values(matrix, grad_output, input)
    with split_over_rows(min_rows or _common.MIN_ROWS_PER_SPLIT) as grids:
        split = grad_values(matrix, grad_output, input)
    # 5 kept blocks, one 16 x 16 sub-tile each, times the slices of rows.
    assert grids == [(5, 1, splits)]
    assert split.dtype == dtype and split.shape == (5, 16, 16)
    assert_close(split, expected, dtype, "split grad values")
    assert_close(split, unsplit, dtype, "split against unsplit")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_weight_grad_is_bitwise_repeatable(dtype):
    matrix, grad_output, input, _ = grad_values_case(dtype, 300, seed=1)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with split_over_rows(16) as grids:
            results = [grad_values(matrix, grad_output, input) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert all(grid[2] > 1 for grid in grids)
    assert all(torch.equal(result, results[0]) for result in results[1:])


def test_split_weight_grad_through_autograd():
    """The split path under SparseLinear's backward (3-D input, bias), against the CPU kernels."""
    layer = sk.SparseLinear(48, 64, sk.BlockSparse(16, 0.3))
    input = torch.randn(3, 70, 48)
    sk.set_backend("cpu")
    layer(input).square().sum().backward()
    expected = layer.values.grad.clone()
    sk.set_backend("triton")
    layer = layer.to(DEVICE)
    layer.zero_grad()
    with split_over_rows(32) as grids:
        layer(input.to(DEVICE)).square().sum().backward()
    assert grids and grids[0][2] == 4  # 210 rows: slices of 64, 64, 64 and 18
    assert_close(layer.values.grad.cpu(), expected, torch.float32, "values grad")


def test_row_split_rule(monkeypatch):
    """Split only when the blocks leave the GPU short of programs and every slice keeps at least
    MIN_ROWS_PER_SPLIT rows; slices are whole reduction chunks, none empty."""
    from sparsekernels.triton import _common

    monkeypatch.setattr(_common, "target_programs", lambda device: 264)
    cpu = torch.device("cpu")
    assert _common.MIN_ROWS_PER_SPLIT == 1024
    assert _common.row_split(8192, 8, 32, cpu) == (8, 1024)  # 8 slices: limited by the rows
    assert _common.row_split(10**6, 8, 32, cpu) == (33, 30304)  # 33 x 8 programs >= 264: limited by the GPU
    assert _common.row_split(8192, 264, 32, cpu) == (1, 8192)  # enough blocks already
    assert _common.row_split(2047, 8, 32, cpu) == (1, 2047)  # two slices would be too short
    for rows in range(2048, 40000, 997):
        for programs in (1, 7, 100):
            splits, rows_per_split = _common.row_split(rows, programs, 64, cpu)
            assert splits > 1 and rows_per_split % 64 == 0 and rows_per_split >= 1024
            assert (splits - 1) * rows_per_split < rows <= splits * rows_per_split  # no empty slice
