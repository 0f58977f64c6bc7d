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
    kept_values_of,
    layout_id,
    make_case,
    opcheck_samples,
)
from sparsekernels import NM, BlockSparse, BlockSparseMatrix


def sparse_linear(matrix, input, values, bias):
    """Call the layout's front-end op with ``values`` standing in for the matrix's own."""
    if isinstance(matrix, BlockSparseMatrix):
        return sk.ops.bsr_linear(input, values, *matrix.index_tensors(), bias)
    return sk.ops.nm_linear(input, values, matrix.positions, matrix.n, matrix.m, bias)


def check_against_dense(layout, dtype, leading_shape, with_bias, device="cpu", noncontiguous=False):
    case = make_case(layout, dtype, device)
    out_features, in_features = case.dense.shape
    if noncontiguous:  # every other column of a wider tensor: strided last dim
        input = torch.randn(*leading_shape, 2 * in_features, device=device).to(dtype)[..., ::2]
        assert not input.is_contiguous()
    else:
        input = torch.randn(*leading_shape, in_features, device=device).to(dtype)
    input.requires_grad_()
    values = case.matrix.values.detach().clone().requires_grad_()
    bias = torch.randn(out_features, device=device).to(dtype).requires_grad_() if with_bias else None

    output = sparse_linear(case.matrix, input, values, bias)

    input_ref = input.detach().float().requires_grad_()
    weight_ref = case.masked.float().requires_grad_()
    bias_ref = bias.detach().float().requires_grad_() if with_bias else None
    output_ref = F.linear(input_ref, weight_ref, bias_ref)
    assert output.shape == output_ref.shape
    assert output.dtype == dtype and output.device == input.device
    assert_close(output, output_ref, dtype, "output")

    grad_output = torch.randn(output_ref.shape, device=device).to(dtype)
    output.backward(grad_output)
    output_ref.backward(grad_output.float())
    assert input.grad.dtype == dtype and values.grad.dtype == dtype
    assert_close(input.grad, input_ref.grad, dtype, "grad input")
    assert_close(values.grad, kept_values_of(case, weight_ref.grad), dtype, "grad values")
    if with_bias:
        assert_close(bias.grad, bias_ref.grad, dtype, "grad bias")


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
