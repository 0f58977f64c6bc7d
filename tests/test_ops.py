"""Every op against dense PyTorch on the masked weight: forward, input/value/bias gradients, opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekernels as sk
from cases import (
    BATCH_SIZES,
    DTYPES,
    LAYOUTS,
    assert_close,
    check_op_against_dense,
    layout_id,
    make_case,
    opcheck_samples,
    sparse_linear,
)
from sparsekernels import NM, BlockSparse, BlockSparseMatrix


def check_against_dense(layout, dtype, leading_shape, with_bias, device="cpu", noncontiguous=False):
    case = make_case(layout, dtype, device)
    check_op_against_dense(
        case, lambda input, values, bias: sparse_linear(case.matrix, input, values, bias), dtype, leading_shape,
        with_bias, device, noncontiguous,
    )


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_matches_dense_reference(layout, dtype, batch, with_bias):
    check_against_dense(layout, dtype, (batch,), with_bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_3d_noncontiguous_input(layout, dtype):
    check_against_dense(layout, dtype, (2, 5), with_bias=True, noncontiguous=True)


@pytest.mark.parametrize("layout", [BlockSparse(16, 0.5), NM(2, 4)], ids=layout_id)
def test_4d_input_and_index_dtype_int64(layout):
    case = make_case(layout)
    matrix = case.matrix
    input = torch.randn(2, 3, 4, case.dense.shape[1])
    if isinstance(matrix, BlockSparseMatrix):
        assert matrix.block_row_offsets.dtype == torch.int32  # small patterns use int32 indexes
        index64 = [tensor.long() for tensor in matrix.index_tensors()]
        output = sk.ops.bsr_linear(input, matrix.values, *index64)
    else:
        output = sk.ops.nm_linear(input, matrix.values, matrix.positions, matrix.n, matrix.m)
    assert_close(output, F.linear(input, case.masked), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_matches_dense_reference_cuda(layout, dtype):
    for batch in (1, 7, 300):
        check_against_dense(layout, dtype, (batch,), with_bias=True, device="cuda")


# ---------------------------------------------------------------------- opcheck
def test_opcheck_covers_every_op():
    assert {name for name, _ in opcheck_samples()} == set(sk.ops.OP_NAMES)


@pytest.mark.parametrize("index", range(len(opcheck_samples())))
def test_opcheck(index):
    name, args = opcheck_samples()[index]
    torch.library.opcheck(getattr(torch.ops.sparsekernels, name), args)
