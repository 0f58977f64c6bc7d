"""The 2:4 sparse-tensor-core metadata reference (sparsekernels/formats/nm24_metadata.py), on CPU.

Round trips (compress -> expand gives the masked dense weight back, for every layout), agreement
with the project's own positions, and each hardware permutation checked against an independent
derivation: sm80 against torch's own CUTLASS conversion, sm90 against a direct evaluation of the
CuTe layout it is defined by.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsekernels.formats import NMMatrix
from sparsekernels.formats import nm24_metadata as meta

DTYPES = (torch.bfloat16, torch.float16)
# (rows, cols) per layout: sm80 needs multiples of 32; sm90 pads rows to 64 and cols to 32.
SHAPES = {
    "natural": [(1, 16), (3, 48), (32, 64), (7, 160)],
    "sm80": [(32, 32), (64, 96), (96, 64)],
    "sm90": [(1, 16), (40, 48), (64, 128), (130, 288)],
    "sm90_k64": [(3, 32), (64, 64), (130, 96)],
    "sm90_k32": [(1, 16), (40, 48), (64, 32), (130, 96)],
}
CASES = [(layout, shape) for layout, shapes in SHAPES.items() for shape in shapes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,shape", CASES)
def test_compress_expand_round_trip(layout, shape, dtype):
    weight = torch.randn(shape, dtype=dtype)
    values, metadata = meta.compress_24(weight, layout=layout)
    expected = NMMatrix.from_dense(weight, 2, 4)
    assert torch.equal(values, expected.values)
    assert metadata.dtype == torch.int16
    assert metadata.numel() == meta.metadata_size(*shape, layout)
    assert torch.equal(meta.expand_24(values, metadata, layout=layout), expected.to_dense())


@pytest.mark.parametrize("layout", meta.LAYOUTS)
def test_masked_compress_keeps_zero_weights_and_the_mask(layout):
    rows, cols = 64, 64
    weight = torch.randn(rows, cols, dtype=torch.bfloat16)
    mask = NMMatrix.random((rows, cols), 2, 4).mask()
    weight[mask & (torch.rand(rows, cols) < 0.3)] = 0  # kept weights that are exactly zero
    values, metadata = meta.compress_24(weight, mask=mask, layout=layout)
    natural = metadata if layout == "natural" else meta.natural_metadata_from_layout(metadata, rows, cols, layout)
    ones = torch.ones_like(values)
    assert torch.equal(meta.expand_24(ones, natural) != 0, mask)
    assert torch.equal(meta.expand_24(values, metadata, layout=layout), weight * mask)


def test_natural_metadata_is_positions_read_as_words():
    rows, cols = 5, 64
    matrix = NMMatrix.from_dense(torch.randn(rows, cols, dtype=torch.float16), 2, 4)
    natural = meta.natural_metadata_from_positions(matrix.positions, rows, cols)
    # Independent construction from the column indices: group g's nibble at bits 4 * (g % 4).
    columns = matrix.column_indices().reshape(rows, cols // 4, 2) % 4
    nibbles = columns[..., 0] | (columns[..., 1] << 2)
    for r, w in itertools.product(range(rows), range(cols // 16)):
        word = sum(int(nibbles[r, 4 * w + j]) << (4 * j) for j in range(4))
        assert int(natural[r, w]) & 0xFFFF == word
    assert torch.equal(meta.positions_from_natural_metadata(natural), matrix.positions)
    # Little-endian reading of the bytes, as the CUDA kernels do.
    assert torch.equal(natural, matrix.positions.contiguous().view(torch.int16))


def test_every_nibble_is_one_of_the_six_valid_ones():
    assert meta.VALID_NIBBLES == (0x4, 0x8, 0x9, 0xC, 0xD, 0xE)
    natural = meta.compress_24(torch.randn(16, 256, dtype=torch.bfloat16))[1]
    words = natural.to(torch.int64) & 0xFFFF
    nibbles = torch.stack([(words >> (4 * j)) & 0xF for j in range(4)])
    assert set(nibbles.unique().tolist()) <= set(meta.VALID_NIBBLES)


@pytest.mark.parametrize("layout,shape", CASES)
def test_reordering_is_a_bijection_onto_the_buffer(layout, shape):
    rows, cols = shape
    natural = (torch.arange(rows * cols // 16, dtype=torch.int32) % 30000).to(torch.int16).reshape(rows, -1)
    buffer = meta.reorder_metadata(natural, layout)
    assert buffer.numel() == meta.metadata_size(rows, cols, layout)
    assert torch.equal(meta.natural_metadata_from_layout(buffer, rows, cols, layout), natural)
    offsets = meta._destination_offsets(rows, cols // 16, layout).reshape(-1)
    assert offsets.unique().numel() == offsets.numel()
    assert int(offsets.min()) >= 0 and int(offsets.max()) < buffer.numel()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES["sm80"] + [(128, 256)])
def test_sm80_layout_matches_torch_cutlass_conversion(shape, dtype):
    """torch's SparseSemiStructuredTensorCUTLASS conversion is an independent implementation."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    # torch derives the pattern from the non-zeros: every kept weight non-zero, every other zero.
    mask = NMMatrix.random(shape, 2, 4).mask()
    weight = (mask * (torch.rand(shape) + 0.5)).to(dtype)
    assert int((weight != 0).sum()) == weight.numel() // 2
    torch_values, torch_meta = sparse_semi_structured_from_dense_cutlass(weight)
    values, metadata = meta.compress_24(weight, mask=weight != 0, layout="sm80")
    assert torch.equal(values, torch_values)
    assert torch.equal(metadata, torch_meta.reshape(-1))


def _cute_ordered_layout_offset(shape, order, coord):
    """CuTe ``make_ordered_layout(shape, order)`` evaluated at a flat coordinate (independent check).

    Strides grow compactly in increasing ``order``; modes are flat lists here.
    """
    stride = [0] * len(shape)
    running = 1
    for mode in sorted(range(len(shape)), key=lambda i: order[i]):
        stride[mode] = running
        running *= shape[mode]
    return sum(c * s for c, s in zip(coord, stride))


@pytest.mark.parametrize("layout", ["sm90", "sm90_k64", "sm90_k32"])
@pytest.mark.parametrize("shape", [(64, 32), (130, 96), (40, 48), (70, 272)])
def test_sm90_layouts_match_the_cute_atom(shape, layout):
    rows, cols = shape
    num_k = meta.SM90_NUM_K[layout]
    atom_cols = 32 * num_k
    padded_rows, padded_cols = -(-rows // 64) * 64, -(-cols // atom_cols) * atom_cols
    atom_shape = [8, 2, 4, 16, 2, num_k]  # ((8, 2, 4), (16, 2, NumK)) flattened
    atom_order = [3, 1, 5, 0, 4, 2]
    natural = (torch.arange(rows * cols // 16, dtype=torch.int32) % 30000).to(torch.int16).reshape(rows, -1)
    buffer = meta.reorder_metadata(natural, layout)
    assert buffer.numel() == padded_rows * padded_cols // 16
    for r in range(rows):
        for c in range(0, cols, 16):  # one word per 16 logical columns
            m_in, k_in = r % 64, c % atom_cols
            coord = [m_in % 8, (m_in // 8) % 2, m_in // 16, k_in % 16, (k_in // 16) % 2, k_in // 32]
            logical = (
                _cute_ordered_layout_offset(atom_shape, atom_order, coord)
                + 2048 * num_k * (r // 64)  # atoms along M: cosize(atom) = 2048 * NumK logical elements
                + padded_rows * atom_cols * (c // atom_cols)  # then along K
            )
            assert logical % 16 == 0
            assert int(buffer[logical // 16]) == int(natural[r, c // 16])


def test_sm90_padding_holds_valid_nibbles():
    weight = torch.randn(3, 16, dtype=torch.float16)
    values, metadata = meta.compress_24(weight, layout="sm90")
    words = metadata.to(torch.int64) & 0xFFFF
    nibbles = torch.stack([(words >> (4 * j)) & 0xF for j in range(4)])
    assert set(nibbles.unique().tolist()) <= set(meta.VALID_NIBBLES)
    assert torch.equal(meta.expand_24(values, metadata, layout="sm90"), NMMatrix.from_dense(weight, 2, 4).to_dense())


def test_hardware_metadata_caches_per_layout_and_pattern():
    matrix = NMMatrix.from_dense(torch.randn(64, 64, dtype=torch.bfloat16), 2, 4)
    first = meta.hardware_metadata(matrix, "sm80")
    assert meta.hardware_metadata(matrix, "sm80") is first
    sm90 = meta.hardware_metadata(matrix, "sm90")
    assert torch.equal(meta.expand_24(matrix.values, sm90, layout="sm90"), matrix.to_dense())
    matrix.positions.copy_(NMMatrix.random((64, 64), 2, 4).positions)  # pattern changed in place
    rebuilt = meta.hardware_metadata(matrix, "sm80")
    assert torch.equal(meta.expand_24(matrix.values, rebuilt, layout="sm80"), matrix.to_dense())


def test_errors_name_the_argument_and_expectation():
    with pytest.raises(TypeError, match="bfloat16/float16"):
        meta.compress_24(torch.randn(32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        meta.compress_24(torch.randn(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out_features % 32"):
        meta.compress_24(torch.randn(16, 32, dtype=torch.bfloat16), layout="sm80")
    with pytest.raises(ValueError, match="layout must be one of"):
        meta.compress_24(torch.randn(32, 32, dtype=torch.bfloat16), layout="sm100")
    with pytest.raises(ValueError, match="exactly n=2"):
        meta.compress_24(torch.randn(4, 16, dtype=torch.bfloat16), mask=torch.ones(4, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="invalid nibble"):
        meta.expand_24(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.int16))
    with pytest.raises(ValueError, match="words"):
        meta.expand_24(torch.zeros(32, 16, dtype=torch.bfloat16), torch.zeros(5, dtype=torch.int16), layout="sm80")
    with pytest.raises(ValueError, match="2:4 only"):
        meta.hardware_metadata(NMMatrix.random((4, 16), 1, 4), "sm80")
