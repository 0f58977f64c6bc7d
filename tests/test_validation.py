"""Bad input at every public entry point raises a clear error naming the argument.

Entry points: the formats (constructors, ``from_dense``, ``mask=``), the op front ends, the fake
kernels (FakeTensorMode), the raw ``torch.ops.sparsekernels.*`` ops with hand-built garbage index
tensors (they must raise before a kernel reads out of bounds, whatever the batch size),
``SparseLinear`` construction, ``sparsify_`` and ``load_state_dict`` with corrupted tensors.
Each case asserts the error type and that the message names the offending argument.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsekernels as sk
from sparsekernels import NM, BlockSparse, BlockSparseMatrix, NMMatrix, SparseLinear
from sparsekernels.formats import pack_positions

ops = torch.ops.sparsekernels


def raises(error, *words):
    """pytest.raises(error) whose message must contain every one of ``words`` (literally)."""
    return pytest.raises(error, match="(?s)" + "".join(f"(?=.*{re.escape(word)})" for word in words))


def bsr_matrix(index_dtype=torch.int32, density=0.5, shape=(64, 96)):
    torch.manual_seed(1)
    matrix = BlockSparseMatrix.from_dense(torch.randn(*shape), 16, density)
    if index_dtype != matrix.block_row_offsets.dtype:
        matrix = BlockSparseMatrix(
            matrix.values,
            matrix.block_row_offsets.to(index_dtype),
            matrix.block_col_indices.to(index_dtype),
            shape,
        )
    return matrix


def index_with(matrix, name, tensor):
    """The five index tensors of ``matrix`` with ``name`` replaced by ``tensor``."""
    names = ("block_row_offsets", "block_col_indices", "block_col_offsets", "block_row_indices", "block_value_indices")
    return tuple(tensor if n == name else t for n, t in zip(names, matrix.index_tensors()))


# ---------------------------------------------------------------------------------------- formats
class TestBlockSparseFormat:
    def test_values_must_be_a_float_tensor_of_square_blocks(self):
        m = bsr_matrix()
        with raises(TypeError, "values", "Tensor"):
            BlockSparseMatrix(m.values.tolist(), m.block_row_offsets, m.block_col_indices, (64, 96))
        with raises(TypeError, "values", "float32"):
            BlockSparseMatrix(m.values.int(), m.block_row_offsets, m.block_col_indices, (64, 96))
        with raises(ValueError, "values", "block_size"):
            BlockSparseMatrix(m.values[:, :, :8], m.block_row_offsets, m.block_col_indices, (64, 96))
        with raises(ValueError, "block_size", "(16, 32, 64, 128)"):
            BlockSparseMatrix(torch.zeros(1, 8, 8), torch.tensor([0, 1]), torch.tensor([0]), (8, 8))
        with raises(TypeError, "shape"):
            BlockSparseMatrix(m.values, m.block_row_offsets, m.block_col_indices, (64.0, 96))

    def test_features_must_be_multiples_of_the_block(self):
        m = bsr_matrix()
        with raises(ValueError, "in_features=100", "block_size=16"):
            BlockSparseMatrix(m.values, m.block_row_offsets, m.block_col_indices, (64, 100))

    @pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
    def test_corrupted_bsr_index(self, index_dtype):
        m = bsr_matrix(index_dtype)
        offsets, cols = m.block_row_offsets, m.block_col_indices
        nnz = m.nnz_blocks

        def build(offsets=offsets, cols=cols, values=m.values):
            return BlockSparseMatrix(values, offsets, cols, (64, 96))

        with raises(TypeError, "block_row_offsets", "int32 or int64"):
            build(offsets=offsets.float())
        with raises(TypeError, "block_col_indices", "int32 or int64"):
            build(cols=cols.to(torch.int16))
        with raises(TypeError, "block_col_indices", "dtype of block_row_offsets"):
            build(cols=cols.to(torch.int64 if index_dtype == torch.int32 else torch.int32))
        with raises(ValueError, "block_row_offsets", "n_block_rows + 1 = 5"):
            build(offsets=offsets[:-1])
        with raises(ValueError, "block_row_offsets", "1-D"):
            build(offsets=offsets[None])
        with raises(ValueError, "block_col_indices", f"nnz = {nnz}"):
            build(cols=cols[:-1])
        shifted = offsets.clone()
        shifted[0] = 1
        with raises(ValueError, "block_row_offsets", "start at 0"):
            build(offsets=shifted)
        decreasing = offsets.clone()
        decreasing[1], decreasing[2] = decreasing[2] + 1, decreasing[1]
        with raises(ValueError, "block_row_offsets", "non-decreasing"):
            build(offsets=decreasing)
        for bad in (6, -1):
            out_of_range = cols.clone()
            out_of_range[-1] = bad
            with raises(ValueError, "block_col_indices", "n_block_cols = 6"):
                build(cols=out_of_range)

    def test_duplicate_block_is_rejected(self):
        m = bsr_matrix(density=1.0)
        duplicated = m.block_col_indices.clone()
        duplicated[1] = duplicated[0]
        with raises(ValueError, "block_col_indices", "strictly increasing"):
            BlockSparseMatrix(m.values, m.block_row_offsets, duplicated, (64, 96))

    @pytest.mark.parametrize("name", ["block_col_offsets", "block_row_indices", "block_value_indices"])
    def test_explicit_csc_index_must_match_the_bsr_index(self, name):
        m = bsr_matrix()
        csc = {n: getattr(m, n) for n in ("block_col_offsets", "block_row_indices", "block_value_indices")}
        corrupted = dict(csc)
        tensor = csc[name].clone()
        tensor[1], tensor[2] = tensor[2], tensor[1]
        if torch.equal(tensor, csc[name]):
            tensor[1] += 1
        corrupted[name] = tensor
        with raises(ValueError, name, "inconsistent"):
            BlockSparseMatrix(m.values, m.block_row_offsets, m.block_col_indices, (64, 96), **corrupted)
        corrupted[name] = csc[name].long()
        with raises(TypeError, name, "dtype of block_row_offsets"):
            BlockSparseMatrix(m.values, m.block_row_offsets, m.block_col_indices, (64, 96), **corrupted)
        partial = dict(csc)
        del partial[name]
        with raises(ValueError, "all three"):
            BlockSparseMatrix(m.values, m.block_row_offsets, m.block_col_indices, (64, 96), **partial)
        # The correct explicit index is accepted as it is (no copy).
        ok = BlockSparseMatrix(m.values, m.block_row_offsets, m.block_col_indices, (64, 96), **csc)
        assert ok.block_row_indices is m.block_row_indices

    def test_from_dense_arguments(self):
        weight = torch.randn(64, 96)
        with raises(TypeError, "weight", "Tensor"):
            BlockSparseMatrix.from_dense(weight.numpy(), 16, 0.5)
        with raises(ValueError, "weight", "2-D"):
            BlockSparseMatrix.from_dense(weight[0], 16, 0.5)
        with raises(TypeError, "weight", "float32"):
            BlockSparseMatrix.from_dense(weight.int(), 16, 0.5)
        with raises(ValueError, "block_size", "(16, 32, 64, 128)"):
            BlockSparseMatrix.from_dense(weight, 24, 0.5)
        with raises(ValueError, "in_features=96", "block_size=64"):
            BlockSparseMatrix.from_dense(weight, 64, 0.5)
        for density in (0.0, 1.5, -0.1, float("nan")):
            with raises(ValueError, "density", "(0, 1]"):
                BlockSparseMatrix.from_dense(weight, 16, density)
        for density in ("0.5", True):
            with raises(TypeError, "density"):
                BlockSparseMatrix.from_dense(weight, 16, density)
        with raises(ValueError, "density=", "mask=", "exactly one"):
            BlockSparseMatrix.from_dense(weight, 16)
        with raises(ValueError, "density=", "mask=", "exactly one"):
            BlockSparseMatrix.from_dense(weight, 16, 0.5, mask=torch.ones(4, 6, dtype=torch.bool))

    def test_from_dense_mask_arguments(self):
        weight = torch.randn(64, 96)
        with raises(ValueError, "mask", "[4, 6]", "[64, 96]"):
            BlockSparseMatrix.from_dense(weight, 16, mask=torch.ones(4, 5, dtype=torch.bool))
        with raises(TypeError, "mask", "bool"):
            BlockSparseMatrix.from_dense(weight, 16, mask=torch.ones(4, 6))
        with raises(TypeError, "mask", "Tensor"):
            BlockSparseMatrix.from_dense(weight, 16, mask=[[True] * 6] * 4)
        ragged = torch.ones(64, 96, dtype=torch.bool)
        ragged[0, 0] = False
        with raises(ValueError, "element mask", "constant inside each 16x16 block"):
            BlockSparseMatrix.from_dense(weight, 16, mask=ragged)
        # An all-False mask is a valid (empty) pattern, and integer 0/1 masks are accepted.
        empty = BlockSparseMatrix.from_dense(weight, 16, mask=torch.zeros(4, 6, dtype=torch.int64))
        assert empty.nnz_blocks == 0 and not empty.to_dense().any()


    def test_random_and_from_block_mask_arguments(self):
        with raises(ValueError, "out_features=50", "block_size=16"):
            BlockSparseMatrix.random((50, 64), 16, 0.5)
        with raises(ValueError, "block_size", "(16, 32, 64, 128)"):
            BlockSparseMatrix.random((64, 64), 8, 0.5)
        with raises(ValueError, "density", "(0, 1]"):
            BlockSparseMatrix.random((64, 64), 16, 0.0)
        weight = torch.randn(64, 96)
        with raises(ValueError, "block_mask", "[64, 96]"):
            BlockSparseMatrix.from_block_mask(weight, torch.ones(4, 5, dtype=torch.bool))
        with raises(ValueError, "block_mask", "[64, 96]"):
            BlockSparseMatrix.from_block_mask(weight, torch.ones(8, 12, dtype=torch.bool))  # 8x8 blocks
        with raises(TypeError, "mask", "bool"):
            BlockSparseMatrix.from_block_mask(weight, torch.ones(4, 6))
        with raises(ValueError, "block_mask", "2-D"):
            BlockSparseMatrix.from_block_mask(weight, torch.ones(24, dtype=torch.bool))


class TestNMFormat:
    def test_constructor(self):
        m = NMMatrix.from_dense(torch.randn(8, 32), 2, 8)
        with raises(TypeError, "values", "Tensor"):
            NMMatrix(m.values.tolist(), m.positions, 2, 8)
        with raises(TypeError, "values", "float32"):
            NMMatrix(m.values.long(), m.positions, 2, 8)
        with raises(ValueError, "values", "2-D"):
            NMMatrix(m.values[None], m.positions, 2, 8)
        with raises(ValueError, "values.shape[1]=7", "n=2"):
            NMMatrix(m.values[:, :7], m.positions, 2, 8)
        with raises(TypeError, "positions", "uint8"):
            NMMatrix(m.values, m.positions.int(), 2, 8)
        with raises(TypeError, "positions", "Tensor"):
            NMMatrix(m.values, m.positions.tolist(), 2, 8)
        with raises(ValueError, "positions", "shape"):
            NMMatrix(m.values, m.positions[:-1], 2, 8)
        with raises(ValueError, "m must be one of"):
            NMMatrix(m.values, m.positions, 2, 6)
        with raises(ValueError, "n must satisfy"):
            NMMatrix(m.values, m.positions, 0, 8)
        with raises(TypeError, "n must be an int"):
            NMMatrix(m.values, m.positions, 2.0, 8)

    @pytest.mark.parametrize("m", [8, 16])
    def test_codes_beyond_the_group_are_rejected(self, m):
        values = torch.randn(4, 2 * 32 // m)
        offsets = torch.tensor([0, m - 1]).repeat(4, 32 // m)
        NMMatrix(values, pack_positions(offsets, m), 2, m)  # valid
        if m == 8:  # 4-bit codes: 8..15 are not offsets of a group of 8
            offsets = offsets.clone()
            offsets[0, 1] = 9
            with raises(ValueError, "positions", "[0, 8)"):
                NMMatrix(values, pack_positions(offsets, m), 2, m)

    def test_duplicate_offsets_and_padding_bits(self):
        values = torch.randn(4, 6)  # 3 groups of 2:4 (kept 6 -> 2 bytes, the last half padding)
        duplicated = pack_positions(torch.tensor([[1, 1, 0, 1, 0, 1]] * 4), 4)
        with raises(ValueError, "positions", "strictly increasing"):
            NMMatrix(values, duplicated, 2, 4)
        padded = pack_positions(torch.tensor([[0, 1, 0, 1, 0, 1]] * 4), 4)
        NMMatrix(values, padded, 2, 4)  # valid
        padded[0, 1] |= 0b1100_0000  # a bit after the last kept value
        with raises(ValueError, "positions", "padding"):
            NMMatrix(values, padded, 2, 4)

    def test_from_dense_arguments(self):
        weight = torch.randn(8, 32)
        with raises(ValueError, "in_features=30", "m=4"):
            NMMatrix.from_dense(torch.randn(8, 30), 2, 4)
        with raises(TypeError, "weight", "float32"):
            NMMatrix.from_dense(weight.double(), 2, 4)
        with raises(ValueError, "mask", "exactly n=2"):
            NMMatrix.from_dense(weight, 2, 4, mask=torch.ones(8, 32, dtype=torch.bool))
        with raises(ValueError, "mask", "[8, 32]"):
            NMMatrix.from_dense(weight, 2, 4, mask=torch.ones(8, 16, dtype=torch.bool))
        with raises(TypeError, "mask", "bool"):
            NMMatrix.from_dense(weight, 2, 4, mask=torch.ones(8, 32))


# ---------------------------------------------------------------------------------- op front ends
class TestFrontEnds:
    def test_bsr_index_metadata(self):
        m = bsr_matrix()
        x = torch.randn(3, 96)
        with raises(TypeError, "block_col_indices", "dtype of block_row_offsets"):
            sk.ops.bsr_linear(x, m.values, *index_with(m, "block_col_indices", m.block_col_indices.long()))
        with raises(TypeError, "block_row_offsets", "int32 or int64"):
            sk.ops.bsr_linear(x, m.values, *index_with(m, "block_row_offsets", m.block_row_offsets.float()))
        with raises(ValueError, "block_value_indices", f"nnz={m.nnz_blocks}"):
            sk.ops.bsr_linear(x, m.values, *index_with(m, "block_value_indices", m.block_value_indices[1:]))
        with raises(ValueError, "block_row_indices", "1-D"):
            sk.ops.bsr_linear(x, m.values, *index_with(m, "block_row_indices", m.block_row_indices[None]))
        with raises(ValueError, "block_col_offsets", "device"):
            sk.ops.bsr_linear(x, m.values, *index_with(m, "block_col_offsets", m.block_col_offsets.to("meta")))
        with raises(TypeError, "block_col_offsets", "Tensor"):
            sk.ops.bsr_linear(x, m.values, *index_with(m, "block_col_offsets", [0, 1]))
        with raises(ValueError, "block_row_offsets", ">= 2"):
            sk.ops.bsr_linear(x, m.values, *index_with(m, "block_row_offsets", m.block_row_offsets[:1]))
        with raises(ValueError, "values", "[nnz_blocks, block_size, block_size]"):
            sk.ops.bsr_linear(x, m.values[:, :, :4], *m.index_tensors())
        with raises(ValueError, "block_size", "(16, 32, 64, 128)"):
            sk.ops.bsr_linear(torch.randn(3, 48), m.values[:, :8, :8], *m.index_tensors())

    def test_nm_metadata(self):
        m = NMMatrix.from_dense(torch.randn(8, 32), 2, 4)
        x = torch.randn(3, 32)
        with raises(TypeError, "positions", "uint8"):
            sk.ops.nm_linear(x, m.values, m.positions.int(), 2, 4)
        with raises(ValueError, "positions", "shape"):
            sk.ops.nm_linear(x, m.values, m.positions[:, :-1], 2, 4)
        with raises(ValueError, "positions", "device"):
            sk.ops.nm_linear(x, m.values, m.positions.to("meta"), 2, 4)
        with raises(TypeError, "n must be an int"):
            sk.ops.nm_linear(x, m.values, m.positions, 2.0, 4)
        with raises(ValueError, "m must be one of"):
            sk.ops.nm_linear(x, m.values, m.positions, 2, 5)
        with raises(ValueError, "values.shape[1]=15", "n=2"):
            sk.ops.nm_linear(torch.randn(3, 30), m.values[:, :15], m.positions, 2, 4)

    def test_operands(self):
        m = NMMatrix.from_dense(torch.randn(8, 32), 2, 4)
        with raises(TypeError, "input", "Tensor"):
            sk.ops.nm_linear([1.0] * 32, m.values, m.positions, 2, 4)
        with raises(TypeError, "input", "values", "same dtype"):
            sk.ops.nm_linear(torch.randn(3, 32, dtype=torch.float64), m.values, m.positions, 2, 4)
        with raises(ValueError, "input.shape[-1]", "in_features=32"):
            sk.ops.nm_linear(torch.randn(3, 33), m.values, m.positions, 2, 4)
        with raises(ValueError, "bias.shape[-1]", "out_features=8"):
            sk.ops.nm_linear(torch.randn(3, 32), m.values, m.positions, 2, 4, torch.randn(2, 4))
        with raises(ValueError, "bias", "[out_features=8]"):
            sk.ops.nm_linear(torch.randn(3, 32), m.values, m.positions, 2, 4, torch.randn(2, 8))
        with raises(TypeError, "bias", "same dtype"):
            sk.ops.nm_linear(torch.randn(3, 32), m.values, m.positions, 2, 4, torch.randn(8).half())
        with raises(ValueError, "values", "[out_features, in_features * n / m]"):
            sk.ops.nm_linear(torch.randn(3, 32), m.values[None], m.positions, 2, 4)


# ------------------------------------------------------------------------------------ fake kernels
class TestFakeKernels:
    """The fake kernels (shape inference for torch.compile/export) check the same metadata."""

    def test_bsr(self):
        m = bsr_matrix()
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            x = mode.from_tensor(torch.randn(3, 96))
            values = mode.from_tensor(m.values)
            index = [mode.from_tensor(t) for t in m.index_tensors()]
            assert ops.bsr_linear(x, values, *index, None).shape == (3, 64)
            with raises(ValueError, "block_col_indices", "nnz="):
                ops.bsr_linear(x, values, index[0], index[1][1:], *index[2:], None)
            with raises(TypeError, "block_value_indices", "dtype of block_row_offsets"):
                ops.bsr_linear_grad_input(
                    mode.from_tensor(torch.randn(3, 64)), values, *index[:4], index[4].long()
                )
            dy = mode.from_tensor(torch.randn(3, 64))
            assert ops.bsr_linear_grad_values(dy, x, *index, 16).shape == m.values.shape
            with raises(ValueError, "block_size", "(16, 32, 64, 128)"):
                ops.bsr_linear_grad_values(dy, x, *index, 12)
            with raises(ValueError, "leading dims"):
                ops.bsr_linear_grad_values(mode.from_tensor(torch.randn(4, 64)), x, *index, 16)

    def test_nm(self):
        m = NMMatrix.from_dense(torch.randn(8, 32), 2, 4)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            x = mode.from_tensor(torch.randn(3, 32))
            values, positions = mode.from_tensor(m.values), mode.from_tensor(m.positions)
            dy = mode.from_tensor(torch.randn(3, 8))
            assert ops.nm_linear(x, values, positions, 2, 4, None).shape == (3, 8)
            assert ops.nm_linear_grad_values(dy, x, positions, 2, 4).shape == m.values.shape
            with raises(ValueError, "positions", "shape"):
                ops.nm_linear(x, values, positions[:, :1], 2, 4, None)
            with raises(ValueError, "positions", "shape"):
                ops.nm_linear_grad_values(dy, x, positions[:4], 2, 4)
            with raises(ValueError, "n must satisfy"):
                ops.nm_linear_grad_input(dy, values, positions, 4, 4)
            with raises(TypeError, "grad_output", "float32"):
                ops.linear_bias_grad(mode.from_tensor(torch.ones(3, 8, dtype=torch.int32)))


# ------------------------------------------------------------- raw ops with garbage index contents
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch", [0, 2])
class TestRawOpsRejectGarbageIndexes:
    """The C++ CPU ops check what keeps a kernel in bounds on every call (docs/reliability.md):
    offsets start at 0, end at nnz and never decrease; indices are in range."""

    def test_forward_and_grad_values_walk_the_bsr_index(self, index_dtype, batch):
        m = bsr_matrix(index_dtype)
        x, dy = torch.randn(batch, 96), torch.randn(batch, 64)
        nnz = m.nnz_blocks
        cases = []
        offsets = m.block_row_offsets.clone()
        offsets[0] = 1
        cases.append(("block_row_offsets", offsets, "start at 0"))
        offsets = m.block_row_offsets.clone()
        offsets[-1] = nnz + 5
        cases.append(("block_row_offsets", offsets, f"end at nnz={nnz}"))
        offsets = m.block_row_offsets.clone()
        offsets[2] = nnz + 100  # in between: the next row would start past the end
        cases.append(("block_row_offsets", offsets, "non-decreasing"))
        offsets = m.block_row_offsets.clone()
        offsets[1] = -5
        cases.append(("block_row_offsets", offsets, "non-decreasing"))
        for bad in (6, -1, 2**31 - 1):
            cols = m.block_col_indices.clone()
            cols[nnz // 2] = bad
            cases.append(("block_col_indices", cols, "n_block_cols=6"))
        for name, tensor, message in cases:
            index = index_with(m, name, tensor)
            with raises(ValueError, name, message):
                ops.bsr_linear(x, m.values, *index, None)
            with raises(ValueError, name, message):
                ops.bsr_linear_grad_values(dy, x, *index, 16)

    def test_grad_input_walks_the_csc_index(self, index_dtype, batch):
        m = bsr_matrix(index_dtype)
        dy = torch.randn(batch, 64)
        nnz = m.nnz_blocks
        cases = []
        offsets = m.block_col_offsets.clone()
        offsets[-1] = nnz - 1
        cases.append(("block_col_offsets", offsets, f"end at nnz={nnz}"))
        offsets = m.block_col_offsets.clone()
        offsets[3] = offsets[4] + 1
        cases.append(("block_col_offsets", offsets, "non-decreasing"))
        rows = m.block_row_indices.clone()
        rows[0] = 4
        cases.append(("block_row_indices", rows, "n_block_rows=4"))
        for bad in (nnz, -3):
            value_indices = m.block_value_indices.clone()
            value_indices[-1] = bad
            cases.append(("block_value_indices", value_indices, f"nnz={nnz}"))
        for name, tensor, message in cases:
            with raises(ValueError, name, message):
                ops.bsr_linear_grad_input(dy, m.values, *index_with(m, name, tensor))

    def test_int32_index_cannot_claim_more_blocks_than_it_holds(self, index_dtype, batch):
        # values with more blocks than the offsets reach: the last offset must be nnz.
        m = bsr_matrix(index_dtype)
        values = torch.cat([m.values, m.values[:1]])
        index = list(m.index_tensors())
        for position in (1, 3, 4):
            index[position] = torch.cat([index[position], index[position][:1]])
        with raises(ValueError, "block_row_offsets", f"end at nnz={values.shape[0]}"):
            ops.bsr_linear(torch.randn(batch, 96), values, *index, None)


@pytest.mark.parametrize("batch", [0, 3, 20])
def test_raw_nm_ops_reject_codes_past_the_group(batch):
    # m = 8 uses 4-bit codes; 8..15 would address past the group (and the row, in the last group).
    matrix = NMMatrix.from_dense(torch.randn(8, 64), 2, 8)
    bad = matrix.positions.clone()
    bad[-1, -1] |= 0x80  # the last kept value of the last row: code >= 8
    x, dy = torch.randn(batch, 64), torch.randn(batch, 8)
    with raises(ValueError, "positions", "[0, m=8)"):
        ops.nm_linear(x, matrix.values, bad, 2, 8, None)
    with raises(ValueError, "positions", "[0, m=8)"):
        ops.nm_linear_grad_input(dy, matrix.values, bad, 2, 8)
    with raises(ValueError, "positions", "[0, m=8)"):
        ops.nm_linear_grad_values(dy, x, bad, 2, 8)


def test_raw_ops_reject_metadata_in_cpp():
    """The C++ checks stand on their own (the raw ops skip the Python front ends)."""
    m = bsr_matrix()
    x = torch.randn(2, 96)
    with raises(ValueError, "block_row_indices", "nnz="):
        ops.bsr_linear(x, m.values, *index_with(m, "block_row_indices", m.block_row_indices[:-1]), None)
    with raises(TypeError, "block_row_offsets", "int32 or int64"):
        ops.bsr_linear(x, m.values, *index_with(m, "block_row_offsets", m.block_row_offsets.float()), None)
    with raises(ValueError, "block_size", "16, 32, 64, 128"):
        ops.bsr_linear_grad_values(torch.randn(2, 64), x, *m.index_tensors(), 8)
    with raises(ValueError, "leading dims"):
        ops.bsr_linear_grad_values(torch.randn(3, 64), x, *m.index_tensors(), 16)
    nm = NMMatrix.from_dense(torch.randn(8, 32), 2, 4)
    with raises(TypeError, "positions", "uint8"):
        ops.nm_linear_grad_input(torch.randn(2, 8), nm.values, nm.positions.char(), 2, 4)
    with raises(ValueError, "m must be one of"):
        ops.nm_linear_grad_values(torch.randn(2, 8), torch.randn(2, 32), nm.positions, 2, 3)
    with raises(TypeError, "grad_output", "float32"):
        ops.linear_bias_grad(torch.ones(2, 3, dtype=torch.int64))


# --------------------------------------------------------------------------------- SparseLinear
class TestSparseLinear:
    @pytest.mark.parametrize(
        "kwargs, error, words",
        [
            ({"dtype": torch.int32}, TypeError, ("dtype", "float32")),
            ({"dtype": torch.float64}, TypeError, ("dtype", "float32")),
            ({"bias": "yes"}, TypeError, ("bias", "bool")),
            ({"layout": BlockSparse(16, 0.5), "in_features": 40}, ValueError, ("in_features=40", "block_size=16")),
            ({"layout": NM(2, 4), "out_features": 0}, ValueError, ("out_features=0",)),
            ({"layout": None}, TypeError, ("layout",)),
            ({"in_features": 64.0}, TypeError, ("in_features", "int")),
        ],
    )
    def test_construction(self, kwargs, error, words):
        arguments = {"in_features": 64, "out_features": 32, "layout": NM(2, 4), **kwargs}
        with raises(error, *words):
            SparseLinear(**arguments)

    def test_from_dense_and_from_matrix(self):
        with raises(TypeError, "linear", "nn.Linear"):
            SparseLinear.from_dense(nn.Conv1d(4, 4, 1), NM(2, 4))
        with raises(ValueError, "in_features=30"):
            SparseLinear.from_dense(nn.Linear(30, 8), NM(2, 4))
        with raises(TypeError, "matrix"):
            SparseLinear.from_matrix(torch.randn(8, 8))
        with raises(ValueError, "bias", "[8]"):
            SparseLinear.from_matrix(NMMatrix.from_dense(torch.randn(8, 32), 2, 4), torch.randn(9))

    def test_sparsify(self):
        with raises(TypeError, "model", "nn.Module"):
            sk.sparsify_([nn.Linear(64, 64)], NM(2, 4))
        with raises(TypeError, "layout"):
            sk.sparsify_(nn.Sequential(nn.Linear(64, 64)), "2:4")
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 30), nn.Linear(30, 64))
        with raises(ValueError, "cannot sparsify 2", "in_features=30"):
            sk.sparsify_(model, NM(2, 4))
        assert all(type(layer) is nn.Linear for layer in model)  # nothing swapped on failure
        with raises(TypeError, "layout"):
            sk.sparsify_(model, lambda linear, fqn: "2:4")


# ------------------------------------------------------------------------------ load_state_dict
def _layer(layout):
    torch.manual_seed(3)
    return SparseLinear(64, 32, layout)


class TestLoadStateDict:
    """A corrupted state dict raises (RuntimeError from load_state_dict, naming the tensor) and
    leaves the layer with its previous, working pattern."""

    def check_rejected(self, layout, state, *words):
        layer = _layer(layout)
        x = torch.randn(5, 64)
        values_before = layer.values.detach().clone()
        with raises(RuntimeError, *words):
            layer.load_state_dict(state)
        layer._validate_pattern()  # the previous pattern is back
        if state["values"].shape != values_before.shape:
            torch.testing.assert_close(layer.values.detach(), values_before, rtol=0, atol=0)
        # Whatever was loaded in place (values of the same shape, bias), the layer still computes
        # the dense math of its (restored) pattern.
        expected = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize(
        "name, corrupt, words",
        [
            ("block_col_indices", lambda t: t + 100, ("block_col_indices", "n_block_cols")),
            ("block_row_offsets", lambda t: t.flip(0), ("block_row_offsets",)),
            ("block_row_indices", lambda t: (t + 1) % 2, ("block_row_indices", "inconsistent")),
            ("block_value_indices", lambda t: t.flip(0), ("block_value_indices", "inconsistent")),
            ("block_col_offsets", lambda t: torch.zeros_like(t), ("block_col_offsets",)),
            ("block_col_indices", lambda t: t.float(), ("block_col_indices", "torch.float32")),
            ("block_row_indices", lambda t: t.long(), ("block_row_indices", "dtype of block_row_offsets")),
        ],
    )
    def test_block_sparse(self, name, corrupt, words):
        layout = BlockSparse(16, 0.5)
        state = {k: v.clone() for k, v in _layer(layout).state_dict().items()}
        state[name] = corrupt(state[name])
        self.check_rejected(layout, state, "invalid sparse pattern", *words)

    def test_block_sparse_different_block_size(self):
        other = SparseLinear(64, 32, BlockSparse(32, 0.5)).state_dict()
        self.check_rejected(BlockSparse(16, 0.5), dict(other), "values", "[nnz, 16, 16]")

    @pytest.mark.parametrize(
        "corrupt, words",
        [
            (lambda t: t | 0x88, ("positions", "[0, 8)")),
            (lambda t: t.int(), ("positions", "torch.uint8")),
            (lambda t: t[:, :-1].contiguous(), ("positions", "shape")),
        ],
    )
    def test_nm(self, corrupt, words):
        layout = NM(2, 8)
        state = {k: v.clone() for k, v in _layer(layout).state_dict().items()}
        state["positions"] = corrupt(state["positions"])
        self.check_rejected(layout, state, "invalid sparse pattern", *words)

    def test_nm_values_from_a_different_layer(self):
        other = SparseLinear(128, 32, NM(2, 8)).state_dict()
        self.check_rejected(NM(2, 8), dict(other), "values", "[32, 16]")


@pytest.mark.parametrize("which", range(5))
def test_validate_transposed_index_names_a_non_tensor_argument(which):
    """Every index argument gets the TypeError naming it, the offsets included (they give the
    dtype and device the others are checked against)."""
    from sparsekernels.formats import validate_transposed_index

    matrix = BlockSparseMatrix.random((32, 48), 16, 0.5)
    names = ("block_row_offsets", "block_col_indices", "block_col_offsets", "block_row_indices",
             "block_value_indices")
    index = [getattr(matrix, name) for name in names]
    index[which] = index[which].tolist()
    with pytest.raises(TypeError, match=f"{names[which]} must be a torch.Tensor"):
        validate_transposed_index(*index, 3)
