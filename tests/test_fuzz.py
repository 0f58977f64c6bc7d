"""Property-based fuzzing (hypothesis) of every op against the dense reference.

For random layouts (every block size with densities from 0 to 1, forced empty block rows and
columns; every N:M pattern), shapes (1, primes, non-multiples of the kernels' tiles), dtypes,
leading dims (none, M = 0, several), input memory layouts (contiguous, strided, transposed,
broadcast) and with or without bias, the forward, the input gradient, the kept-value gradient and
the bias gradient must match dense float32 PyTorch on the masked weight, within the dtype's
tolerance (tests/cases.py). A second property feeds the raw C++ ops random garbage index tensors:
they must raise ValueError or, when the index happens to be valid, compute the right thing.

Runs on every backend available in this build (``cpu`` and ``reference`` here; ``triton`` and
``cuda`` on CUDA tensors where built, marked ``gpu``). Without a GPU the Triton kernels are fuzzed
under the Triton interpreter by properties of their own, on smaller batches, against
sparsekernels.reference (the end of this module).

Profiles (registered in tests/conftest.py): the default ``short`` one is derandomized; the
``SPARSEKERNELS_FUZZ_PROFILE=long`` one runs 10x as many random examples and keeps failures in the
hypothesis database for replay. Timings on two cores: docs/reliability.md.
"""

from __future__ import annotations

import math
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekernels as sk
from cases import assert_close, sparse_linear, triton_device
from sparsekernels import BlockSparseMatrix, NMMatrix, reference
from sparsekernels.backend import backend_available
from sparsekernels.formats import validate_bsr_index, validate_transposed_index

# "cuda" on a GPU; else "cpu", and TRITON_INTERPRET is set before any kernel module is imported, so
# the Triton kernels can run on CPU tensors under the interpreter (the properties at the end).
TRITON_DEVICE = triton_device()
from test_triton import narrowest_tiles  # noqa: E402  (imported after TRITON_INTERPRET is decided)

PROFILE = "sparsekernels-" + os.environ.get("SPARSEKERNELS_FUZZ_PROFILE", "short")


def fuzz_settings(share: float) -> settings:
    """The active profile, with ``share`` of its example budget for this test."""
    profile = settings.get_profile(PROFILE)
    return settings(
        profile,
        max_examples=max(1, round(profile.max_examples * share)),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _backends():
    params = []
    for name in ("cpu", "reference", "triton", "cuda"):
        if not backend_available(name) or (name == "triton" and TRITON_DEVICE != "cuda"):
            continue  # the interpreted Triton kernels have properties of their own (below)
        device = "cpu" if name in ("cpu", "reference") else "cuda"
        marks = [pytest.mark.gpu] if device == "cuda" else []
        params.append(pytest.param((name, device), id=name, marks=marks))
    return params


BACKENDS = _backends()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Sizes that stress tiling: 1, primes, and non-multiples of 8, 12, 16.
ODD_SIZES = (1, 2, 3, 5, 7, 13, 17, 31)
LEADING = st.lists(st.sampled_from((0, 1, 2, 3, 5, 7, 13, 29)), min_size=0, max_size=2)
INPUT_LAYOUTS = ("contiguous", "strided", "transposed", "broadcast")
# What the two linear properties draw besides the weight.
OPERANDS = dict(
    dtype=st.sampled_from(DTYPES),
    leading=LEADING,
    layout=st.sampled_from(INPUT_LAYOUTS),
    with_bias=st.booleans(),
)


@st.composite
def block_sparse_cases(draw):
    """(matrix, dense masked float32 weight, block mask) with b in {16, 32, 64, 128}."""
    block_size = draw(st.sampled_from((16, 32, 64, 128)))
    most = {16: 7, 32: 5, 64: 3, 128: 2}[block_size]
    rows, cols = draw(st.integers(1, most)), draw(st.integers(1, most))
    density = draw(st.sampled_from((0.0, 1.0)) | st.floats(0.0, 1.0))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    block_mask = torch.rand(rows, cols, generator=generator) < density
    if draw(st.booleans()):
        block_mask[draw(st.integers(0, rows - 1))] = False  # an empty block row
    if draw(st.booleans()):
        block_mask[:, draw(st.integers(0, cols - 1))] = False  # an empty block column
    return block_size, block_mask, generator


@st.composite
def nm_cases(draw):
    m = draw(st.sampled_from((2, 4, 8, 16)))
    n = draw(st.integers(1, m - 1))
    out_features = draw(st.sampled_from(ODD_SIZES + (24, 40)))
    groups = draw(st.integers(1, max(2, 96 // m)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.rand(out_features, groups, m, generator=generator)
    keep = scores.argsort(dim=-1)[..., :n]
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, keep, True).reshape(out_features, groups * m)
    return n, m, mask, generator


def make_operand(shape, layout, dtype, device, generator):
    """A random ``[*leading, features]`` tensor laid out in memory as ``layout`` says."""
    *leading, features = shape
    if layout == "strided":  # every other element of a wider last dim
        tensor = torch.randn(*leading, 2 * features, generator=generator)[..., ::2]
    elif layout == "transposed" and leading:  # features first in memory
        tensor = torch.randn(features, *leading, generator=generator).movedim(0, -1)
    elif layout == "broadcast" and leading:  # stride 0 along the first leading dim
        tensor = torch.randn(1, *leading[1:], features, generator=generator).expand(*leading, features)
    else:
        tensor = torch.randn(*leading, features, generator=generator)
    return tensor.to(dtype=dtype, device=device)


def check_op_against_dense(matrix, dense_masked, rebuild, backend, dtype, leading, layout, with_bias, generator,
                           op=sparse_linear):
    """Forward and backward of ``op(matrix, x, values, bias)`` (the layout's front end by default)
    against F.linear on the masked weight.

    ``rebuild(dense)`` picks the kept entries of a dense [out, in] tensor in values' layout.
    """
    name, device = backend
    sk.set_backend(name)
    out_features, in_features = dense_masked.shape
    matrix = matrix.to(device)
    x = make_operand((*leading, in_features), layout, dtype, device, generator).requires_grad_()
    values = matrix.values.detach().clone().requires_grad_()
    bias = torch.randn(out_features, generator=generator).to(dtype=dtype, device=device) if with_bias else None
    if bias is not None:
        bias.requires_grad_()
    output = op(matrix, x, values, bias)

    x_ref = x.detach().float().requires_grad_()
    weight_ref = dense_masked.to(device).float().requires_grad_()
    bias_ref = bias.detach().float().requires_grad_() if with_bias else None
    output_ref = F.linear(x_ref, weight_ref, bias_ref)
    assert output.shape == output_ref.shape and output.dtype == dtype
    assert_close(output, output_ref, dtype, f"{name} forward")

    grad_output = make_operand(output_ref.shape, layout, dtype, device, generator)
    output.backward(grad_output)
    output_ref.backward(grad_output.float())
    assert_close(x.grad, x_ref.grad, dtype, f"{name} grad_input")
    assert_close(values.grad, rebuild(weight_ref.grad), dtype, f"{name} grad_values")
    if with_bias:
        assert_close(bias.grad, bias_ref.grad, dtype, f"{name} grad_bias")


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(1.0)
@given(case=block_sparse_cases(), **OPERANDS)
def test_block_sparse_matches_dense(backend, case, dtype, leading, layout, with_bias):
    block_size, block_mask, generator = case
    rows, cols = block_mask.shape
    dense = torch.randn(rows * block_size, cols * block_size, generator=generator).to(dtype)
    matrix = BlockSparseMatrix.from_dense(dense, block_size, mask=block_mask)
    assert matrix.nnz_blocks == int(block_mask.sum())

    def rebuild(dense_grad):
        return BlockSparseMatrix.from_dense(dense_grad.cpu(), block_size, mask=block_mask).values.to(dense_grad.device)

    check_op_against_dense(matrix, matrix.to_dense(), rebuild, backend, dtype, leading, layout, with_bias, generator)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(1.5)
@given(case=nm_cases(), **OPERANDS)
def test_nm_matches_dense(backend, case, dtype, leading, layout, with_bias):
    n, m, mask, generator = case
    dense = torch.randn(mask.shape, generator=generator).to(dtype)
    matrix = NMMatrix.from_dense(dense, n, m, mask=mask)
    assert torch.equal(matrix.mask(), mask)

    def rebuild(dense_grad):
        return NMMatrix.from_dense(dense_grad.cpu(), n, m, mask=mask).values.to(dense_grad.device)

    check_op_against_dense(matrix, matrix.to_dense(), rebuild, backend, dtype, leading, layout, with_bias, generator)


@st.composite
def garbage_bsr_index(draw):
    """Five index tensors of consistent lengths: a valid pattern, one with a single corrupted
    entry, or arbitrary contents."""
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from((torch.int32, torch.int64)))
    mode = draw(st.sampled_from(("valid", "corrupted", "random")))
    if mode == "random":
        nnz = draw(st.integers(0, rows * cols))
        entries = st.integers(-3, max(rows, cols, nnz) + 3)
        lengths = (rows + 1, nnz, cols + 1, nnz, nnz)
        index = [torch.tensor(draw(st.lists(entries, min_size=k, max_size=k)), dtype=dtype) for k in lengths]
        return rows, cols, nnz, index
    block_mask = torch.tensor(draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols)))
    matrix = BlockSparseMatrix.from_dense(torch.zeros(rows * 16, cols * 16), 16, mask=block_mask.reshape(rows, cols))
    index = [tensor.to(dtype) for tensor in matrix.index_tensors()]
    if mode == "corrupted":
        which = draw(st.sampled_from([i for i, tensor in enumerate(index) if tensor.numel() > 0]))
        position = draw(st.integers(0, index[which].numel() - 1))
        index[which][position] = draw(st.integers(-2, max(rows, cols, matrix.nnz_blocks) + 2))
    return rows, cols, matrix.nnz_blocks, index


@fuzz_settings(1.0)
@given(index_case=garbage_bsr_index(), batch=st.sampled_from((0, 1, 5, 20)))
def test_raw_ops_on_garbage_indexes_raise_or_compute_correctly(index_case, batch):
    """Memory safety of the per-call C++ checks: never a crash, only ValueError or a right answer."""
    rows, cols, nnz, index = index_case
    b = 16
    values = torch.randn(nnz, b, b)
    x, dy = torch.randn(batch, cols * b), torch.randn(batch, rows * b)
    ops = torch.ops.sparsekernels
    results = {}
    for op_name, call in (
        ("forward", lambda: ops.bsr_linear(x, values, *index, None)),
        ("grad_input", lambda: ops.bsr_linear_grad_input(dy, values, *index)),
        ("grad_values", lambda: ops.bsr_linear_grad_values(dy, x, *index, b)),
    ):
        try:
            results[op_name] = call()
        except ValueError as error:
            assert "block_" in str(error)  # names the offending index tensor
    try:
        validate_bsr_index(index[0], index[1], rows, cols, nnz)
        validate_transposed_index(*index, cols)
    except ValueError:
        return  # an invalid pattern: raising or not (memory-safe either way), nothing more to check
    # A valid pattern: every op ran and matches the dense reference.
    assert set(results) == {"forward", "grad_input", "grad_values"}
    matrix = BlockSparseMatrix(values, index[0], index[1], (rows * b, cols * b))
    weight = matrix.to_dense()
    torch.testing.assert_close(results["forward"], x @ weight.T, rtol=2e-5, atol=2e-5 * max(1.0, b * cols))
    torch.testing.assert_close(results["grad_input"], dy @ weight, rtol=2e-5, atol=2e-5 * max(1.0, b * rows))
    expected_values = BlockSparseMatrix.from_dense(dy.T @ x, b, mask=matrix.block_mask()).values
    torch.testing.assert_close(results["grad_values"], expected_values, rtol=2e-5, atol=2e-5 * max(1.0, batch))


# ------------------------------------------------------------ the Triton kernels under the interpreter
# Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter (numpy on the host,
# slow), so BACKENDS leaves them out and they are fuzzed here: the same random block and N:M layouts
# (1, primes, non-multiples of the tiles; empty and full block rows and columns), dtypes, input
# memory layouts and bias as above, at most INTERPRETED_MAX_ROWS flattened rows (both N:M forward
# kernels, one or two row tiles), on a small share of the profile's budget (INTERPRETED_SHARE), with
# the tiles the launchers pick here or the narrowest ones (a GPU's choice for small batches: sliced
# block rows, split-K in the small-M kernel). Forward and every gradient against float32 autograd
# through sparsekernels.reference, within the dtype's tolerance.
INTERPRETED_SHARE = 0.1  # of the profile's examples, per property
INTERPRETED_MAX_ROWS = 96
INTERPRETED_OPERANDS = dict(
    OPERANDS,
    leading=st.lists(st.sampled_from((0, 1, 2, 3, 5, 7, 13, 17, 31, 67)), max_size=2).filter(
        lambda dims: math.prod(dims) <= INTERPRETED_MAX_ROWS),
    narrow=st.booleans(),
)
interpreted_triton = pytest.mark.skipif(
    TRITON_DEVICE != "cpu" or not backend_available("triton"),
    reason="fuzzes the Triton interpreter on CPU (on a GPU the compiled kernels are in BACKENDS)")


def check_triton_against_reference(matrix, reference_linear, dtype, leading, layout, with_bias, narrow, generator):
    """Forward and backward of ``matrix``'s linear op on the interpreted Triton backend against
    ``reference_linear(x, values, bias)`` (sparsekernels.reference) on float32 copies, by autograd."""
    out_features, in_features = matrix.shape
    x = make_operand((*leading, in_features), layout, dtype, "cpu", generator).requires_grad_()
    values = matrix.values.detach().clone().requires_grad_()
    bias = torch.randn(out_features, generator=generator).to(dtype).requires_grad_() if with_bias else None
    # The kernels themselves: no dense fallback, no tuning.
    environment = {"SPARSEKERNELS_DENSE_FALLBACK": "0", "SPARSEKERNELS_AUTOTUNE": "0"}
    sk.set_backend("triton")
    with mock.patch.dict(os.environ, environment), narrowest_tiles(narrow):
        output = sparse_linear(matrix, x, values, bias)
        grad_output = make_operand(output.shape, layout, dtype, "cpu", generator)
        output.backward(grad_output)

    x_ref = x.detach().float().requires_grad_()
    values_ref = values.detach().float().requires_grad_()
    bias_ref = bias.detach().float().requires_grad_() if with_bias else None
    output_ref = reference_linear(x_ref, values_ref, bias_ref)
    output_ref.backward(grad_output.float())
    assert output.shape == output_ref.shape and output.dtype == dtype
    assert_close(output, output_ref, dtype, "triton forward")
    assert_close(x.grad, x_ref.grad, dtype, "triton grad_input")
    assert_close(values.grad, values_ref.grad, dtype, "triton grad_values")
    if with_bias:
        assert_close(bias.grad, bias_ref.grad, dtype, "triton grad_bias")


@interpreted_triton
@fuzz_settings(INTERPRETED_SHARE)
@given(case=block_sparse_cases(), **INTERPRETED_OPERANDS)
def test_block_sparse_triton_interpreted_matches_reference(case, dtype, leading, layout, with_bias, narrow):
    block_size, block_mask, generator = case
    rows, cols = block_mask.shape
    dense = torch.randn(rows * block_size, cols * block_size, generator=generator).to(dtype)
    matrix = BlockSparseMatrix.from_dense(dense, block_size, mask=block_mask)
    index = matrix.index_tensors()
    check_triton_against_reference(matrix, lambda x, values, bias: reference.bsr_linear(x, values, *index, bias),
                                   dtype, leading, layout, with_bias, narrow, generator)


@interpreted_triton
@fuzz_settings(INTERPRETED_SHARE)
@given(case=nm_cases(), **INTERPRETED_OPERANDS)
def test_nm_triton_interpreted_matches_reference(case, dtype, leading, layout, with_bias, narrow):
    n, m, mask, generator = case
    dense = torch.randn(mask.shape, generator=generator).to(dtype)
    matrix = NMMatrix.from_dense(dense, n, m, mask=mask)
    check_triton_against_reference(
        matrix, lambda x, values, bias: reference.nm_linear(x, values, matrix.positions, n, m, bias),
        dtype, leading, layout, with_bias, narrow, generator)
