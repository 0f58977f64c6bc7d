"""Bad input at every public entry point raises a clear error naming the argument.

Entry points: the formats (constructors, ``from_dense``, ``mask=``), the op front ends, the fake
kernels (FakeTensorMode), the raw ``torch.ops.sparsekernels.*`` ops with hand-built garbage index
tensors (they must raise before a kernel reads out of bounds, whatever the batch size),
``SparseLinear`` construction, ``from_matrix``, ``sparsify_``, ``set_pattern`` and
``load_state_dict`` with corrupted tensors (a failed update leaves the layer exactly as it was),
the pruning and training entry points, and construction on the meta device.
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


# ------------------------------------------------------------------ failed loads leave the layer as it was
def _snapshot(layer):
    """Everything a failed update must leave unchanged: the state dict (by value), the layout,
    the values Parameter (by identity) and the transposed-pattern buffers."""
    extra = {name: getattr(layer, name).clone() for name in ("transpose_index", "positions_t") if hasattr(layer, name)}
    return (
        {name: tensor.clone() for name, tensor in layer.state_dict().items()},
        layer.layout,
        layer.values,
        extra,
    )


def assert_unchanged(layer, snapshot, x):
    state, layout, values, extra = snapshot
    now = layer.state_dict()
    assert now.keys() == state.keys()
    for name, tensor in state.items():
        assert now[name].dtype == tensor.dtype and torch.equal(now[name], tensor), name
    assert layer.layout == layout
    assert layer.values is values  # optimizers keep a valid reference
    for name, tensor in extra.items():
        assert torch.equal(getattr(layer, name), tensor), name
    layer._validate_pattern()
    expected = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def _empty_block_matrix():
    return BlockSparseMatrix(
        torch.randn(0, 16, 16), torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), (32, 64)
    )


def _unchecked_block_matrix(cols, shape=(32, 64)):
    """Two blocks in block row 0 at ``cols`` (may be invalid), built without validation."""
    return BlockSparseMatrix(
        torch.randn(2, 16, 16), torch.tensor([0, 2, 2], dtype=torch.int32), torch.tensor(cols, dtype=torch.int32),
        shape, validate=False,
    )


def _random_block():
    return BlockSparseMatrix.random((32, 64), 16, 0.5)


def _full_block_mask():
    return torch.ones(2, 4, dtype=torch.bool)


def _nm_with_duplicate_offsets():
    matrix = NMMatrix.from_dense(torch.randn(32, 64), 2, 4)
    return NMMatrix(matrix.values, torch.zeros_like(matrix.positions), 2, 4, validate=False)


def _changed_in_place():
    matrix = NMMatrix.from_dense(torch.randn(32, 64), 2, 4)
    matrix.positions[0, 0] = 0  # offsets 0, 0: a duplicate
    return matrix


class TestSetPatternFailureLeavesLayerUnchanged:
    """set_pattern validates everything before it writes anything: whatever the failure, the layer
    keeps its state dict, layout, Parameter identity and forward."""

    @pytest.mark.parametrize(
        "pattern, kwargs, error, words",
        [
            (_empty_block_matrix, {}, ValueError, ("pattern", "at least one block")),
            (lambda: torch.zeros(2, 4, dtype=torch.bool), {}, ValueError, ("pattern", "at least one block")),
            (lambda: _unchecked_block_matrix([1, 7]), {}, ValueError, ("pattern", "block_col_indices", "n_block_cols")),
            (lambda: _unchecked_block_matrix([1, 1]), {}, ValueError, ("pattern", "no duplicates")),
            (lambda: _random_block().to(torch.float64), {}, TypeError, ("pattern", "float32")),
            (lambda: BlockSparseMatrix.random((64, 64), 16, 0.5), {}, ValueError, ("pattern", "[32, 64]")),
            (lambda: BlockSparseMatrix.random((32, 64), 32, 0.5), {}, ValueError, ("pattern", "block_size=16")),
            (lambda: NMMatrix.random((32, 64), 2, 4), {}, TypeError, ("pattern", "NMMatrix")),
            (_random_block, {"values": torch.randn(32, 64)}, ValueError, ("values=",)),
            (lambda: torch.ones(3, 4, dtype=torch.bool), {}, ValueError, ("mask", "[2, 4]")),
            (_full_block_mask, {"values": torch.randn(64, 32)}, ValueError, ("values", "[32, 64]")),
            (_full_block_mask, {"values": [[0.0] * 64] * 32}, TypeError, ("values", "torch.Tensor")),
        ],
    )
    def test_block_sparse(self, pattern, kwargs, error, words):
        torch.manual_seed(0)
        layer = SparseLinear(64, 32, BlockSparse(16, 0.5))
        layer.values.grad = torch.randn_like(layer.values)
        grad = layer.values.grad.clone()
        snapshot, x = _snapshot(layer), torch.randn(3, 64)
        with raises(error, *words):
            layer.set_pattern(pattern(), **kwargs)
        assert_unchanged(layer, snapshot, x)
        assert torch.equal(layer.values.grad, grad)

    @pytest.mark.parametrize(
        "layout, pattern, error, words",
        [
            (NM(2, 4), _nm_with_duplicate_offsets, ValueError, ("pattern", "strictly increasing")),
            (NM(2, 4), _changed_in_place, ValueError, ("pattern", "strictly increasing")),
            (NM(2, 4), lambda: NMMatrix.random((32, 64), 2, 4).to(torch.float64), TypeError, ("pattern", "float32")),
            (NM(2, 4), lambda: torch.ones(32, 64, dtype=torch.bool), ValueError, ("mask", "n=2")),
            (NM(2, 4), lambda: NMMatrix.random((32, 64), 1, 4), ValueError, ("pattern", "2:4")),
            (NM(2, 4), _random_block, TypeError, ("pattern", "BlockSparseMatrix")),
            (NM(2, 4, transposable=True), lambda: NMMatrix.random((32, 64), 2, 4), ValueError,
             ("does not fit", "transposable")),
        ],
    )
    def test_nm(self, layout, pattern, error, words):
        torch.manual_seed(0)
        layer = SparseLinear(64, 32, layout)
        snapshot, x = _snapshot(layer), torch.randn(3, 64)
        with raises(error, *words):
            layer.set_pattern(pattern())
        assert_unchanged(layer, snapshot, x)


class TestFailedLoadLeavesLayerUnchanged:
    """Whatever makes a load fail (torch's own size checks included, strict or not), the layer keeps
    its pattern, values (by identity and contents), bias and layout."""

    @pytest.mark.parametrize("strict", [True, False])
    @pytest.mark.parametrize(
        "layout, corrupt, words",
        [
            (BlockSparse(16, 0.5), lambda s: s.update(values=s["values"].reshape(-1)), ("size mismatch", "values")),
            (NM(2, 4), lambda s: s.update(values=s["values"].reshape(-1)), ("size mismatch", "values")),
            (NM(2, 4, transposable=True), lambda s: s.update(values=s["values"].reshape(-1)), ("values",)),
            (BlockSparse(16, 0.5), lambda s: s.update(bias=torch.randn(33)), ("size mismatch", "bias")),
            # another block count (values and the index are resized first), then a bad bias
            (BlockSparse(16, 0.5), lambda s: s.update(
                {k: v for k, v in SparseLinear(64, 32, BlockSparse(16, 0.25)).state_dict().items() if k != "bias"},
                bias=torch.randn(33)), ("bias",)),
            (BlockSparse(16, 0.5), lambda s: s.update(
                {k: v for k, v in SparseLinear(64, 32, BlockSparse(16, 0.25)).state_dict().items()},
                block_col_indices=torch.tensor([0, 0], dtype=torch.int32)), ("invalid sparse pattern",)),
        ],
    )
    def test_failed_load(self, layout, corrupt, words, strict):
        torch.manual_seed(0)
        source = SparseLinear(64, 32, layout).state_dict()
        corrupt(source)
        layer = SparseLinear(64, 32, layout)
        snapshot, x = _snapshot(layer), torch.randn(3, 64)
        with raises(RuntimeError, *words):
            layer.load_state_dict(source, strict=strict)
        assert_unchanged(layer, snapshot, x)

    def test_strict_load_missing_values_keeps_the_old_pattern(self):
        torch.manual_seed(0)
        source = SparseLinear(64, 32, BlockSparse(16, 0.5)).state_dict()
        del source["values"]
        layer = SparseLinear(64, 32, BlockSparse(16, 0.5))
        snapshot, x = _snapshot(layer), torch.randn(3, 64)
        with raises(RuntimeError, "Missing key", "values"):
            layer.load_state_dict(source)
        assert_unchanged(layer, snapshot, x)

    def test_assign_failure_puts_the_old_tensors_back(self):
        source = SparseLinear(64, 32, BlockSparse(16, 0.5)).state_dict()
        source["block_col_indices"] = source["block_col_indices"] + 100
        layer = SparseLinear(64, 32, BlockSparse(16, 0.5))
        snapshot, x = _snapshot(layer), torch.randn(3, 64)
        with raises(RuntimeError, "block_col_indices"):
            layer.load_state_dict(source, assign=True)
        assert_unchanged(layer, snapshot, x)

    def test_layout_density_follows_a_load_that_changes_the_block_count(self):
        source = SparseLinear(64, 32, BlockSparse(16, 0.25))
        layer = SparseLinear(64, 32, BlockSparse(16, 0.5))
        layer.load_state_dict(source.state_dict())
        assert layer.layout == BlockSparse(16, 0.25) and layer.density == 0.25
        assert "layout=BlockSparse(block_size=16, density=0.25)" in repr(layer)
        x = torch.randn(3, 64)
        torch.testing.assert_close(layer(x), source(x))


class TestAdoptedMatricesAreValidated:
    """from_matrix and set_pattern(matrix) check a matrix like a new one: it may have been built with
    validate=False, converted with .to(), or changed in place (each used to give a silently wrong
    layer, or one failing only at forward)."""

    @pytest.mark.parametrize(
        "matrix, error, words",
        [
            (_nm_with_duplicate_offsets, ValueError, ("matrix", "NMMatrix", "strictly increasing")),
            (_changed_in_place, ValueError, ("matrix", "strictly increasing")),
            (lambda: _unchecked_block_matrix([1, 1]), ValueError, ("matrix", "BlockSparseMatrix", "no duplicates")),
            (lambda: _unchecked_block_matrix([0, 9]), ValueError, ("matrix", "block_col_indices")),
            (lambda: NMMatrix.random((32, 64), 2, 4).to(torch.float64), TypeError, ("matrix", "float32")),
            (lambda: BlockSparseMatrix.random((32, 64), 16, 0.5).to(torch.int32), TypeError, ("matrix", "float32")),
            (_empty_block_matrix, ValueError, ("matrix", "at least one block")),
        ],
    )
    def test_from_matrix(self, matrix, error, words):
        with raises(error, *words):
            SparseLinear.from_matrix(matrix())

    def test_valid_matrices_are_still_adopted_without_copies(self):
        matrix = BlockSparseMatrix.random((32, 64), 16, 0.5)
        layer = SparseLinear.from_matrix(matrix)
        assert layer.values.data_ptr() == matrix.values.data_ptr()
        nm = NMMatrix.random((32, 64), 2, 4).to(torch.bfloat16)
        assert SparseLinear.from_matrix(nm).values.dtype == torch.bfloat16


class TestEmptyPatterns:
    """One rule everywhere: a SparseLinear keeps at least one block (its density is in (0, 1], as
    BlockSparse requires); the formats themselves may be empty."""

    def test_format_may_be_empty(self):
        assert _empty_block_matrix().nnz_blocks == 0
        no_blocks = torch.zeros(2, 4, dtype=torch.bool)
        assert BlockSparseMatrix.from_dense(torch.randn(32, 64), 16, mask=no_blocks).nnz_blocks == 0

    def test_layer_refuses_it_everywhere(self):
        empty = _empty_block_matrix()
        with raises(ValueError, "matrix", "at least one block"):
            SparseLinear.from_matrix(empty)
        layer = SparseLinear(64, 32, BlockSparse(16, 0.5))
        with raises(ValueError, "pattern", "at least one block"):
            layer.set_pattern(empty)
        with raises(ValueError, "pattern", "at least one block"):
            layer.set_pattern(torch.zeros(2, 4, dtype=torch.bool))
        state = dict(layer.state_dict(), values=empty.values, **dict(zip(
            ("block_row_offsets", "block_col_indices", "block_col_offsets", "block_row_indices",
             "block_value_indices"), empty.index_tensors())))
        snapshot, x = _snapshot(layer), torch.randn(3, 64)
        with raises(RuntimeError, "invalid sparse pattern", "at least one block"):
            layer.load_state_dict(state)
        assert_unchanged(layer, snapshot, x)


# ------------------------------------------------------------------ entry points: types and values
class TestEntryPointArguments:
    @pytest.mark.parametrize(
        "call, error, words",
        [
            (lambda: BlockSparseMatrix.from_dense(torch.randn(32, 32), 16.0, 0.5), TypeError,
             ("block_size", "int", "16.0")),
            (lambda: BlockSparseMatrix.from_dense(torch.randn(32, 32), True, 0.5), TypeError, ("block_size", "int")),
            (lambda: BlockSparseMatrix.from_dense(torch.randn(32, 32), 16, float("nan")), ValueError,
             ("density", "(0, 1]")),
            (lambda: BlockSparseMatrix.random((32.0, 32), 16, 0.5), TypeError, ("shape", "two ints")),
            (lambda: BlockSparseMatrix.random((32, 32), 16.0, 0.5), TypeError, ("block_size", "int")),
            (lambda: BlockSparseMatrix.random((32, 32), 16, 0.5, dtype=torch.int32), TypeError, ("dtype", "float32")),
            (lambda: NMMatrix.random((4.0, 16), 2, 4), TypeError, ("shape", "two ints", "4.0")),
            (lambda: NMMatrix.random((4, 16, 1), 2, 4), TypeError, ("shape", "two ints")),
            (lambda: NMMatrix.random((4, 16), 2, 4, dtype=torch.float64), TypeError, ("dtype", "float32")),
            (lambda: SparseLinear.from_matrix(NMMatrix.random((32, 64), 2, 4), [0.0] * 32), TypeError,
             ("bias", "torch.Tensor", "list")),
            (lambda: sk.pruning.block_scores(torch.randn(32, 32), 16.0), TypeError, ("block_size", "int")),
        ],
    )
    def test_formats_and_layers(self, call, error, words):
        with raises(error, *words):
            call()

    def test_sparsify_names_the_layer_of_a_dtype_error(self):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64).double())
        with raises(TypeError, "cannot sparsify 1", "linear.weight", "float32", "torch.float64"):
            sk.sparsify_(model, NM(2, 4))
        assert all(type(layer) is nn.Linear for layer in model)  # nothing swapped on failure

    @pytest.mark.parametrize(
        "initial_density, error",
        [(float("nan"), ValueError), (5.0, ValueError), (0.0, ValueError), ("0.9", TypeError), (True, TypeError)],
    )
    def test_gradual_pruner_initial_density(self, initial_density, error):
        from sparsekernels.training import GradualPruner

        model = nn.Sequential(SparseLinear(64, 64, BlockSparse(16, 1.0)))
        with raises(error, "initial_density", "(0, 1]"):
            GradualPruner(model, 0.5, 0, 10, 1, initial_density=initial_density)

    def test_training_and_pruning_helpers(self):
        from sparsekernels.training import SRSTELinear, remap_optimizer_state

        with raises(TypeError, "transposable", "bool", "'no'"):
            SRSTELinear(64, 32, transposable="no")
        with raises(ValueError, "allowed", "bool block mask", "[2, 2]"):
            sk.pruning.block_mask(torch.randn(32, 32), 16, 0.5, allowed=[[True, True], [True, False]])
        layer = SparseLinear(64, 32, NM(2, 4))
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        with raises(TypeError, "source", "int64"):
            remap_optimizer_state(optimizer, layer.values, layer.values, list(range(layer.values.numel())))

    @pytest.mark.parametrize("decay", [float("nan"), float("inf"), -1.0, "0.1", True])
    def test_srste_decay(self, decay):
        from sparsekernels.training import SRSTELinear

        with raises(ValueError, "decay", ">= 0"):
            SRSTELinear(64, 32, decay=decay)


# ------------------------------------------------------------------ the meta device
class TestMetaDevice:
    """Construction on the meta device builds the shapes (nothing is drawn, any size is free); a
    meta layer is materialised by loading a state dict with assign=True."""

    LAYOUTS = [BlockSparse(16, 0.5), NM(2, 4), NM(2, 4, transposable=True)]

    @pytest.mark.parametrize("layout", LAYOUTS, ids=str)
    def test_construct_and_load_with_assign(self, layout):
        torch.manual_seed(0)
        source = SparseLinear(64, 32, layout)
        for layer in (SparseLinear(64, 32, layout, device="meta"), _under_meta_context(layout)):
            assert layer.values.is_meta and all(buffer.is_meta for buffer in layer.buffers())
            assert layer.values.shape == source.values.shape
            for name, buffer in source.named_buffers():
                assert getattr(layer, name).shape == buffer.shape and getattr(layer, name).dtype == buffer.dtype
            layer.load_state_dict(source.state_dict(), assign=True)
            assert not any(tensor.is_meta for tensor in (*layer.parameters(), *layer.buffers()))
            x = torch.randn(3, 64, requires_grad=True)
            torch.testing.assert_close(layer(x), source(x))
            layer(x).sum().backward()
            grad = x.grad.clone()
            x.grad = None
            source(x).sum().backward()
            torch.testing.assert_close(grad, x.grad)

    @pytest.mark.parametrize("transposable", [False, True], ids=["nm", "transposable"])
    def test_random_nm_on_the_cpu_under_a_meta_default_device(self, transposable):
        """The pattern is drawn on the CPU whatever the default device, so a CPU matrix built
        inside ``with torch.device("meta")`` is a real one."""
        with torch.device("meta"):
            matrix = NMMatrix.random((64, 64), 2, 4, device="cpu", transposable=transposable)
        assert matrix.values.device.type == "cpu" and matrix.positions.device.type == "cpu"
        matrix.validate()

    @pytest.mark.parametrize("layout", LAYOUTS, ids=str)
    def test_load_without_assign_stays_meta(self, layout):
        """As for torch's own modules: copying into a meta tensor is a no-op (torch warns), not an error."""
        layer = SparseLinear(64, 32, layout, device="meta")
        with pytest.warns(UserWarning, match="meta"):
            layer.load_state_dict(SparseLinear(64, 32, layout).state_dict())
        assert layer.values.is_meta

    @pytest.mark.parametrize("layout", LAYOUTS, ids=str)
    def test_from_dense_of_a_meta_linear(self, layout):
        layer = SparseLinear.from_dense(nn.Linear(64, 32, device="meta"), layout)
        assert layer.values.is_meta and layer.layout == layout
        assert layer.values.shape == SparseLinear(64, 32, layout).values.shape
        model = sk.sparsify_(nn.Sequential(nn.Linear(64, 32, device="meta")), layout)
        assert isinstance(model[0], SparseLinear) and model[0].values.is_meta

    @pytest.mark.parametrize("layout", [BlockSparse(128, 0.1), NM(2, 4)], ids=str)
    def test_huge_layer_on_meta_allocates_nothing(self, layout):
        layer = SparseLinear(2**16, 2**16, layout, device="meta")  # the NM scores alone would be 16 GiB
        assert layer.values.is_meta and layer.density == pytest.approx(layout.density, abs=1e-4)

    @pytest.mark.parametrize("layout", LAYOUTS, ids=str)
    def test_set_pattern_on_meta_says_to_materialise(self, layout):
        layer = SparseLinear(64, 32, layout, device="meta")
        with raises(ValueError, "set_pattern", "meta", "assign=True"):
            layer.set_pattern(SparseLinear(64, 32, layout).dense_mask())

    def test_nm_random_draws_in_row_chunks(self, monkeypatch):
        """The dense score tensor is drawn a block of rows at a time; the pattern does not depend
        on the chunking."""
        from sparsekernels.formats import nm as nm_module

        whole = NMMatrix.random((40, 64), 2, 8, generator=torch.Generator().manual_seed(5))
        monkeypatch.setattr(nm_module, "_RANDOM_SCORES_PER_CHUNK", 3 * 64)
        chunked = NMMatrix.random((40, 64), 2, 8, generator=torch.Generator().manual_seed(5))
        chunked.validate()
        assert torch.equal(whole.positions, chunked.positions)

    def test_block_sparse_from_dense_of_a_meta_weight(self):
        weight = torch.empty(32, 64, device="meta")
        by_density = BlockSparseMatrix.from_dense(weight, 16, 0.25)
        assert by_density.values.is_meta and by_density.nnz_blocks == 2 and by_density.block_col_offsets.shape == (5,)
        mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
        by_mask = BlockSparseMatrix.from_dense(weight, 16, mask=mask)  # the mask has data: its pattern, meta values
        assert by_mask.nnz_blocks == 4 and all(tensor.is_meta for tensor in by_mask.index_tensors())
        with raises(ValueError, "block_mask", "meta"):
            BlockSparseMatrix.from_dense(torch.randn(32, 64), 16, mask=mask.to("meta"))

    def test_meta_matrices_check_their_metadata(self):
        values = torch.empty(4, 16, 16, device="meta")
        offsets = torch.empty(3, dtype=torch.int32, device="meta")
        cols = torch.empty(4, dtype=torch.int32, device="meta")
        BlockSparseMatrix(values, offsets, cols, (32, 64)).validate()  # no data: shapes only
        with raises(ValueError, "block_row_offsets", "3 entries"):
            BlockSparseMatrix(values, offsets[:2], cols, (32, 64))
        with raises(ValueError, "block_row_offsets", "device of values"):
            BlockSparseMatrix(torch.empty(4, 16, 16), offsets, cols, (32, 64))


def _under_meta_context(layout):
    with torch.device("meta"):
        return SparseLinear(64, 32, layout)
