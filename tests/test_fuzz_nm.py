"""Property-based fuzzing (hypothesis) of the N:M paths that tests/test_fuzz.py leaves out.

* ``nm_linear_transposable``: random transposable masks of every n:m (out_features a multiple of
  m), with the shapes, dtypes, leading dims, input layouts and bias of test_fuzz's properties; the
  forward and all three gradients must match dense float32 PyTorch on the masked weight (its input
  gradient runs the N:M forward on W.T, a path of its own).
* The raw N:M ops on random ``positions`` bytes, like test_fuzz's garbage BSR indexes: a valid
  pattern, one corrupted byte, or arbitrary bytes. On the cpu backend (``torch.ops.sparsekernels``)
  a kept m = 8 code past the group (8..15) must raise ValueError naming ``positions``, and a
  pattern that passes ``validate_positions`` must give the dense result; on the reference backend
  (through ``sk.ops.nm_linear``) a valid pattern must give the dense result, anything else may
  raise or compute, but never crash.

The strategies, operand builders and profiles are test_fuzz's (imported); the default ``short``
profile keeps this file to about 20 s on two cores.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsekernels as sk
from sparsekernels import NMMatrix
from sparsekernels.backend import backend_available
from sparsekernels.formats import validate_positions
from sparsekernels.formats.nm import random_transposable_mask
from sparsekernels.reference import unpack_positions
from test_fuzz import BACKENDS, OPERANDS, check_op_against_dense, fuzz_settings


@st.composite
def transposable_nm_cases(draw):
    """(n, m, mask, generator): a random bool mask keeping n of every m along both dimensions."""
    m = draw(st.sampled_from((2, 4, 8, 16)))
    n = draw(st.integers(1, m - 1))
    out_groups = draw(st.integers(1, max(1, 48 // m)))
    in_groups = draw(st.integers(1, max(2, 64 // m)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = random_transposable_mask(out_groups * m, in_groups * m, n, m, generator)
    return n, m, mask, generator


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(0.3)
@given(case=transposable_nm_cases(), **OPERANDS)
def test_nm_transposable_matches_dense(backend, case, dtype, leading, layout, with_bias):
    n, m, mask, generator = case
    device = backend[1]
    matrix = NMMatrix.from_dense(torch.randn(mask.shape, generator=generator).to(dtype), n, m, mask=mask)
    transpose_index, positions_t = (tensor.to(device) for tensor in matrix.transposed_pattern())

    def transposable(matrix, x, values, bias):
        return sk.ops.nm_linear_transposable(x, values, matrix.positions, transpose_index, positions_t, n, m, bias)

    def kept(dense):
        return NMMatrix.from_dense(dense.cpu(), n, m, mask=mask).values.to(dense.device)

    check_op_against_dense(matrix, matrix.to_dense(), kept, backend, dtype, leading, layout, with_bias, generator,
                           op=transposable)


@st.composite
def random_positions(draw):
    """(n, m, out_features, kept_per_row, positions): a valid packed pattern, one with a single
    byte replaced, or arbitrary bytes, all of the right shape."""
    m = draw(st.sampled_from((2, 4, 8, 16)))
    n = draw(st.integers(1, m - 1))
    out_features, groups = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    kept_per_row = groups * n
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    positions = NMMatrix.random((out_features, groups * m), n, m, generator=generator).positions
    mode = draw(st.sampled_from(("valid", "corrupted", "random")))
    if mode == "corrupted":
        row, column = draw(st.integers(0, out_features - 1)), draw(st.integers(0, positions.shape[1] - 1))
        positions[row, column] = draw(st.integers(0, 255))
    elif mode == "random":
        positions = torch.randint(0, 256, positions.shape, dtype=torch.uint8, generator=generator)
    return n, m, out_features, kept_per_row, positions


def _is_valid(positions, out_features, kept_per_row, n, m) -> bool:
    try:
        validate_positions(positions, out_features, kept_per_row, n, m)
    except ValueError:
        return False
    return True


def _check_valid_results(results, values, positions, n, m, x, dy) -> None:
    """A valid pattern: every op ran and matches dense math on the masked weight."""
    assert set(results) == {"forward", "grad_input", "grad_values"}
    weight = NMMatrix(values, positions, n, m).to_dense()
    tolerance = dict(rtol=2e-5, atol=2e-5 * max(1.0, x.shape[-1], dy.shape[-1], x.shape[0]))
    torch.testing.assert_close(results["forward"], x @ weight.T, **tolerance)
    torch.testing.assert_close(results["grad_input"], dy @ weight, **tolerance)
    mask = NMMatrix(torch.ones_like(values), positions, n, m).to_dense().bool()
    expected_values = NMMatrix.from_dense(dy.T @ x, n, m, mask=mask).values
    torch.testing.assert_close(results["grad_values"], expected_values, **tolerance)


@fuzz_settings(0.5)
@given(case=random_positions(), batch=st.sampled_from((0, 1, 5, 20)))
def test_raw_nm_ops_on_random_positions_raise_or_compute_correctly(case, batch):
    """Memory safety of the C++ ops' per-call checks: a ValueError naming positions where a kept
    code points past its group, never a crash, and the dense result for a valid pattern."""
    n, m, out_features, kept_per_row, positions = case
    in_features = kept_per_row // n * m
    values = torch.randn(out_features, kept_per_row)
    x, dy = torch.randn(batch, in_features), torch.randn(batch, out_features)
    ops = torch.ops.sparsekernels
    results = {}
    for op_name, call in (
        ("forward", lambda: ops.nm_linear(x, values, positions, n, m, None)),
        ("grad_input", lambda: ops.nm_linear_grad_input(dy, values, positions, n, m)),
        ("grad_values", lambda: ops.nm_linear_grad_values(dy, x, positions, n, m)),
    ):
        try:
            results[op_name] = call()
        except ValueError as error:
            assert "positions" in str(error)
    past_the_group = bool((unpack_positions(positions, m, kept_per_row) >= m).any())
    if past_the_group:  # only possible for m = 8 (4-bit codes); the docs promise a refusal
        assert m == 8 and not results, f"ran {sorted(results)} with a kept code past the group"
    if _is_valid(positions, out_features, kept_per_row, n, m):
        _check_valid_results(results, values, positions, n, m, x, dy)


@pytest.mark.skipif(not backend_available("reference"), reason="no reference backend")
@fuzz_settings(0.25)
@given(case=random_positions(), batch=st.sampled_from((0, 1, 5)))
def test_reference_nm_on_random_positions_raises_or_computes_correctly(case, batch):
    """The reference backend through the op front end: the dense result (forward and both
    gradients, by autograd) for a valid pattern; for any other, an error or a result, no crash."""
    n, m, out_features, kept_per_row, positions = case
    in_features = kept_per_row // n * m
    sk.set_backend("reference")
    values = torch.randn(out_features, kept_per_row, requires_grad=True)
    x = torch.randn(batch, in_features, requires_grad=True)
    dy = torch.randn(batch, out_features)
    try:
        output = sk.ops.nm_linear(x, values, positions, n, m)
        output.backward(dy)
    except (ValueError, RuntimeError, IndexError):
        assert not _is_valid(positions, out_features, kept_per_row, n, m)
        return
    assert output.shape == (batch, out_features)
    if _is_valid(positions, out_features, kept_per_row, n, m):
        results = {"forward": output.detach(), "grad_input": x.grad, "grad_values": values.grad}
        _check_valid_results(results, values.detach(), positions, n, m, x.detach(), dy)

