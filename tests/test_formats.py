"""Sparse formats: pruning, masks, dense round trips, the transposed index, packing, validation."""

from __future__ import annotations

import pytest
import torch

from cases import layout_id, random_mask
from sparsekernels import NM, BlockSparse, BlockSparseMatrix, NMMatrix
from sparsekernels.formats import build_transposed_index, pack_positions, unpack_positions


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("density", [0.05, 0.25, 0.5, 1.0])
def test_block_magnitude_pruning_keeps_largest_blocks(block_size, density):
    weight = torch.randn(4 * block_size, 6 * block_size)
    matrix = BlockSparseMatrix.from_dense(weight, block_size, density)
    norms = weight.reshape(4, block_size, 6, block_size).square().sum(dim=(1, 3))
    expected_nnz = max(1, round(density * 24))
    assert matrix.nnz_blocks == expected_nnz
    assert matrix.density == pytest.approx(expected_nnz / 24)
    kept = matrix.block_mask()
    assert kept.sum() == expected_nnz
    if expected_nnz < 24:
        assert norms[kept].min() >= norms[~kept].max()
    torch.testing.assert_close(matrix.to_dense(), weight * matrix.mask(), rtol=0, atol=0)


def test_block_from_mask_block_and_element_level():
    weight = torch.randn(64, 96)
    block_mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    from_block = BlockSparseMatrix.from_dense(weight, 32, mask=block_mask)
    element_mask = block_mask.repeat_interleave(32, 0).repeat_interleave(32, 1)
    from_element = BlockSparseMatrix.from_dense(weight, 32, mask=element_mask)
    for matrix in (from_block, from_element):
        assert matrix.nnz_blocks == 2
        assert torch.equal(matrix.block_mask(), block_mask)
        assert torch.equal(matrix.mask(), element_mask)
        torch.testing.assert_close(matrix.to_dense(), weight * element_mask, rtol=0, atol=0)
    assert from_block.block_row_offsets.tolist() == [0, 2, 2]  # second block row is empty
    assert from_block.block_col_indices.tolist() == [0, 2]


def test_kept_zero_weight_stays_kept():
    weight = torch.zeros(32, 32)
    matrix = BlockSparseMatrix.from_dense(weight, 16, mask=torch.tensor([[True, False], [False, True]]))
    assert matrix.nnz_blocks == 2 and matrix.mask().sum() == 2 * 16 * 16


def test_transposed_index_walks_columns():
    block_mask = torch.rand(7, 5) < 0.4
    block_mask[:, 2] = False  # an empty block column
    matrix = BlockSparseMatrix.from_dense(torch.randn(7 * 16, 5 * 16), 16, mask=block_mask)
    seen = torch.zeros(7, 5, dtype=torch.bool)
    offsets = matrix.block_col_offsets.tolist()
    for col in range(5):
        rows = matrix.block_row_indices[offsets[col] : offsets[col + 1]].tolist()
        assert rows == sorted(rows)
        for row, slot in zip(rows, matrix.block_value_indices[offsets[col] : offsets[col + 1]].tolist()):
            seen[row, col] = True
            # the value slot really is block (row, col)
            start, end = matrix.block_row_offsets[row].item(), matrix.block_row_offsets[row + 1].item()
            assert start <= slot < end and matrix.block_col_indices[slot].item() == col
    assert torch.equal(seen, block_mask)
    assert offsets[2] == offsets[3]


def test_transposed_index_rebuild_matches():
    matrix = BlockSparseMatrix.from_dense(torch.randn(128, 64), 16, 0.3)
    rebuilt = build_transposed_index(matrix.block_row_offsets, matrix.block_col_indices, matrix.n_block_cols)
    for built, stored in zip(rebuilt, matrix.index_tensors()[2:]):
        assert torch.equal(built, stored) and built.dtype == stored.dtype


def test_index_dtype_is_int32_when_it_fits():
    matrix = BlockSparseMatrix.from_dense(torch.randn(64, 64), 16, 0.5)
    assert all(tensor.dtype == torch.int32 for tensor in matrix.index_tensors())


@pytest.mark.parametrize("layout", [NM(1, 2), NM(2, 4), NM(1, 4), NM(2, 8), NM(4, 8), NM(3, 16)], ids=layout_id)
def test_nm_magnitude_pruning(layout):
    n, m = layout.n, layout.m
    weight = torch.randn(12, 5 * m)
    matrix = NMMatrix.from_dense(weight, n, m)
    assert matrix.values.shape == (12, 5 * n) and matrix.density == n / m
    mask = matrix.mask()
    groups = mask.reshape(12, 5, m)
    assert bool((groups.sum(-1) == n).all())
    magnitudes = weight.abs().reshape(12, 5, m)
    kept_min = magnitudes.masked_fill(~groups, float("inf")).amin(-1)
    dropped_max = magnitudes.masked_fill(groups, -1.0).amax(-1)
    assert bool((kept_min >= dropped_max).all())
    torch.testing.assert_close(matrix.to_dense(), weight * mask, rtol=0, atol=0)


@pytest.mark.parametrize("m", [2, 4, 8, 16])
@pytest.mark.parametrize("kept", [1, 3, 7, 8, 33])
def test_position_packing_round_trip(m, kept):
    offsets = torch.randint(0, m, (5, kept))
    packed = pack_positions(offsets, m)
    per_byte = {2: 8, 4: 4, 8: 2, 16: 2}[m]
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-kept // per_byte))
    assert torch.equal(unpack_positions(packed, m, kept), offsets)


def test_nm_from_mask_and_column_indices():
    weight = torch.randn(4, 8)
    mask = random_mask(NM(2, 4), 4, 8)
    matrix = NMMatrix.from_dense(weight, 2, 4, mask=mask)
    assert torch.equal(matrix.mask(), mask)
    columns = matrix.column_indices()
    assert torch.equal(matrix.values, weight.gather(1, columns))


@pytest.mark.parametrize(
    "make",
    [
        lambda: BlockSparseMatrix.from_dense(torch.randn(64, 32), 16, 0.5),
        lambda: NMMatrix.from_dense(torch.randn(8, 16), 2, 4),
    ],
    ids=["block", "nm"],
)
def test_to_dtype_keeps_indexes(make):
    matrix = make()
    half = matrix.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device == matrix.device
    torch.testing.assert_close(half.to_dense(), matrix.to_dense().to(torch.bfloat16))
    if isinstance(matrix, BlockSparseMatrix):
        assert all(t.dtype == torch.int32 for t in half.index_tensors())
    else:
        assert half.positions.dtype == torch.uint8


def test_random_patterns_have_requested_density():
    block = BlockSparseMatrix.random((256, 512), 32, 0.25)
    assert block.nnz_blocks == round(0.25 * 8 * 16) and block.shape == (256, 512)
    nm = NMMatrix.random((16, 64), 1, 4)
    assert bool((nm.mask().reshape(16, 16, 4).sum(-1) == 1).all())


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: BlockSparseMatrix.from_dense(torch.randn(64, 48), 32, 0.5), ValueError, "multiple of block_size=32"),
        (lambda: BlockSparseMatrix.from_dense(torch.randn(64, 64), 24, 0.5), ValueError, "block_size must be one of"),
        (lambda: BlockSparseMatrix.from_dense(torch.randn(64, 64), 32, 0.0), ValueError, "density must be in (0, 1]"),
        (lambda: BlockSparseMatrix.from_dense(torch.randn(64, 64), 32, 1.5), ValueError, "density must be in (0, 1]"),
        (lambda: BlockSparseMatrix.from_dense(torch.randn(64, 64), 32), ValueError, "exactly one of density"),
        (lambda: BlockSparseMatrix.from_dense(torch.randn(64), 32, 0.5), ValueError, "must be 2-D"),
        (lambda: BlockSparseMatrix.from_dense(torch.randn(64, 64).long(), 32, 0.5), TypeError, "float32"),
        (
            lambda: BlockSparseMatrix.from_dense(torch.randn(64, 64), 32, mask=torch.ones(3, 2, dtype=torch.bool)),
            ValueError,
            "mask must have shape",
        ),
        (
            lambda: BlockSparseMatrix.from_dense(torch.randn(64, 64), 32, mask=torch.eye(64, dtype=torch.bool)),
            ValueError,
            "constant inside each",
        ),
        (lambda: NMMatrix.from_dense(torch.randn(8, 10), 2, 4), ValueError, "multiple of m=4"),
        (lambda: NMMatrix.from_dense(torch.randn(8, 16), 4, 4), ValueError, "1 <= n < m"),
        (lambda: NMMatrix.from_dense(torch.randn(8, 16), 2, 3), ValueError, "m must be one of"),
        (
            lambda: NMMatrix.from_dense(torch.randn(8, 16), 2, 4, mask=torch.ones(8, 16, dtype=torch.bool)),
            ValueError,
            "exactly n=2",
        ),
        (lambda: BlockSparse(block_size=48), ValueError, "block_size must be one of"),
        (lambda: BlockSparse(density=0), ValueError, "density must be in (0, 1]"),
        (lambda: BlockSparse(block_size=64.0), TypeError, "block_size must be an int"),
        (lambda: NM(2, 2), ValueError, "1 <= n < m"),
        (lambda: NM(1, 3), ValueError, "m must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=__import__("re").escape(message)):
        call()


def test_corrupted_bsr_index_is_rejected():
    matrix = BlockSparseMatrix.from_dense(torch.randn(64, 64), 16, 0.5)
    bad_cols = matrix.block_col_indices.clone()
    bad_cols[0] = 99
    with pytest.raises(ValueError, match="block_col_indices must be in"):
        BlockSparseMatrix(matrix.values, matrix.block_row_offsets, bad_cols, (64, 64))
    bad_offsets = matrix.block_row_offsets.clone()
    bad_offsets[-1] += 1
    with pytest.raises(ValueError, match="end at nnz"):
        BlockSparseMatrix(matrix.values, bad_offsets, matrix.block_col_indices, (64, 64))
    full = BlockSparseMatrix.from_dense(torch.randn(64, 64), 16, 1.0)
    unsorted = full.block_col_indices.clone()
    unsorted[0], unsorted[1] = 1, 0
    with pytest.raises(ValueError, match="strictly increasing"):
        BlockSparseMatrix(full.values, full.block_row_offsets, unsorted, (64, 64))


def test_corrupted_positions_are_rejected():
    matrix = NMMatrix.from_dense(torch.randn(4, 16), 2, 4)
    duplicated = pack_positions(torch.zeros(4, 8, dtype=torch.long), 4)  # offset 0 twice per group
    with pytest.raises(ValueError, match="strictly increasing"):
        NMMatrix(matrix.values, duplicated, 2, 4)
    with pytest.raises(ValueError, match="positions must have shape"):
        NMMatrix(matrix.values, matrix.positions[:, :1], 2, 4)
