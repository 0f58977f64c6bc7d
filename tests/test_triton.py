"""The Triton kernels (sparsekernels/triton) against dense PyTorch on the masked weight.

On a machine with a CUDA GPU they run compiled, on CUDA tensors. Without one they run under the
Triton interpreter on CPU tensors: ``triton_device()`` (tests/cases.py) sets TRITON_INTERPRET here,
before the kernel modules are first imported (they are imported lazily, on the first call), so the
same tests cover the same kernel code.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekernels as sk
from cases import (
    DTYPES,
    LAYOUTS,
    TOLERANCE,
    HeuristicOnly,
    assert_close,
    check_op_against_dense,
    layout_id,
    make_case,
    opcheck_samples,
    skip_without_triton,
    sparse_linear,
    triton_device,
)
from sparsekernels import NM, BlockSparse, BlockSparseMatrix, NMMatrix, SparseLinear
from test_ops import check_against_dense

DEVICE = triton_device()
# m=16 (4-bit offsets, two per byte, groups of 16 inside the 64-wide input tiles) on top of the sweep.
TRITON_LAYOUTS = LAYOUTS + [NM(5, 16)]

pytestmark = [skip_without_triton(), pytest.mark.usefixtures("triton_backend")]


def triton_ops():
    from sparsekernels.triton import ops

    return ops


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("batch", [0, 1, 7, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", TRITON_LAYOUTS, ids=layout_id)
def test_matches_dense_reference(layout, dtype, batch, with_bias):
    check_against_dense(layout, dtype, (batch,), with_bias, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", TRITON_LAYOUTS, ids=layout_id)
def test_3d_noncontiguous_input(layout, dtype):
    check_against_dense(layout, dtype, (2, 5), with_bias=True, device=DEVICE, noncontiguous=True)


@contextlib.contextmanager
def narrowest_tiles(enabled: bool = True):
    """Pretend the device wants a huge grid, so the launchers pick their narrowest tiles (the choice
    made for decode-sized batches on a GPU; under the interpreter they otherwise pick the widest)."""
    from sparsekernels.triton import _common, autotune

    with contextlib.ExitStack() as stack:
        if enabled:
            stack.enter_context(mock.patch.object(_common, "target_programs", lambda device: 10**9))
            stack.enter_context(mock.patch.object(autotune, "tuner", HeuristicOnly()))  # not a stored config
        yield


@pytest.fixture
def many_programs_wanted():
    with narrowest_tiles():
        yield


@pytest.mark.parametrize("batch", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [BlockSparse(32, 0.5), BlockSparse(128, 0.5), NM(2, 4), NM(5, 16)], ids=layout_id)
def test_narrow_tiles(layout, dtype, batch, many_programs_wanted):
    check_against_dense(layout, dtype, (batch,), with_bias=True, device=DEVICE)


def check_shape(layout, out_features, in_features, leading, seed):
    """Forward and both gradients of one random weight of the given shape, in float32."""
    torch.manual_seed(seed)
    case = make_case(layout, torch.float32, DEVICE, features=(out_features, in_features))
    check_op_against_dense(
        case, lambda input, values, bias: sparse_linear(case.matrix, input, values, bias), torch.float32, leading,
        with_bias=False, device=DEVICE,
    )


@pytest.mark.parametrize(
    "layout, features",
    [(BlockSparse(16, 0.3), (16, 16)), (BlockSparse(16, 0.3), (13 * 16, 16)), (BlockSparse(32, 0.4), (32, 11 * 32)),
     (NM(2, 4), (1, 4)), (NM(2, 4), (67, 4)), (NM(1, 8), (3, 11 * 8)), (NM(3, 16), (17, 16))],
    ids=["1x1-blocks", "13x1-blocks", "1x11-blocks", "nm-1x4", "nm-67x4", "nm-3x88", "nm-17x16"],
)
def test_odd_weight_shapes(layout, features):
    """Weights of one block / one group, and tall or wide ones that leave partial output/input tiles."""
    check_shape(layout, *features, (5,), seed=0)


_fuzz = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(block_size=st.sampled_from([16, 32]), block_rows=st.integers(1, 6), block_cols=st.integers(1, 6),
       density=st.floats(0.05, 1.0), rows=st.integers(0, 70), narrow=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_block_shapes(block_size, block_rows, block_cols, density, rows, narrow, seed):
    """Random block grids (1..6 x 1..6, any density), row counts around the tile heights, both tilings."""
    with narrowest_tiles(narrow):
        check_shape(BlockSparse(block_size, density), block_rows * block_size, block_cols * block_size, (rows,), seed)


@_fuzz
@given(pattern=st.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (7, 8), (1, 16), (9, 16)]),
       out_features=st.integers(1, 70), groups=st.integers(1, 20), rows=st.integers(0, 70),
       narrow=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_nm_shapes(pattern, out_features, groups, rows, narrow, seed):
    """Random N:M patterns, out_features 1..70 and 1..20 groups (input tiles cut anywhere), both tilings."""
    n, m = pattern
    with narrowest_tiles(narrow):
        check_shape(NM(n, m), out_features, groups * m, (rows,), seed)


def test_empty_pattern_gives_zeros_and_bias():
    """No kept block at all: the output is the bias and both gradients are zero."""
    mask = torch.zeros(32, 48, dtype=torch.bool)
    matrix = BlockSparseMatrix.from_dense(torch.randn(32, 48), 16, mask=mask).to(DEVICE)
    assert matrix.values.shape[0] == 0
    input = torch.randn(3, 48, device=DEVICE, requires_grad=True)
    bias = torch.randn(32, device=DEVICE)
    output = sk.ops.bsr_linear(input, matrix.values, *matrix.index_tensors(), bias)
    torch.testing.assert_close(output, bias.expand(3, 32))
    output.sum().backward()
    assert torch.count_nonzero(input.grad) == 0


@pytest.mark.parametrize("layout", [BlockSparse(16, 0.5), NM(2, 4)], ids=layout_id)
def test_meta_tensors_give_shapes(layout):
    case = make_case(layout, torch.bfloat16, "meta")
    matrix = case.matrix
    input = torch.empty(2, 3, case.dense.shape[1], dtype=torch.bfloat16, device="meta", requires_grad=True)
    values = matrix.values.detach().requires_grad_()
    output = sparse_linear(matrix, input, values)
    assert output.shape == (2, 3, case.dense.shape[0]) and output.device.type == "meta"
    output.sum().backward()
    assert input.grad.shape == input.shape and values.grad.shape == values.shape


def test_int64_index():
    case = make_case(BlockSparse(16, 0.5), torch.float32, DEVICE)
    index64 = [tensor.long() for tensor in case.matrix.index_tensors()]
    input = torch.randn(2, 3, case.dense.shape[1], device=DEVICE)
    output = sk.ops.bsr_linear(input, case.matrix.values, *index64)
    assert_close(output, F.linear(input, case.masked), torch.float32, "output")


@pytest.mark.parametrize("layout", [BlockSparse(32, 0.25), NM(2, 4)], ids=layout_id)
def test_sparse_linear_agrees_with_cpu_kernels(layout):
    """A training step of SparseLinear: the Triton backend matches the C++ CPU kernels."""
    layer = SparseLinear(128, 96, layout, dtype=torch.float16)
    input = torch.randn(4, 9, 128, dtype=torch.float16)
    sk.set_backend("cpu")
    layer(input).float().square().sum().backward()
    expected = [layer.values.grad.clone(), layer.bias.grad.clone()]
    sk.set_backend("triton")
    layer = layer.to(DEVICE)
    layer.zero_grad()
    output = layer(input.to(DEVICE))
    output.float().square().sum().backward()
    for actual, wanted, what in zip((layer.values.grad, layer.bias.grad), expected, ("values", "bias")):
        assert_close(actual.cpu(), wanted, torch.float16, what)


# ---------------------------------------------------------------------- ops: opcheck, compile, errors
def test_opcheck_covers_every_op():
    assert {name for name, _ in opcheck_samples(DEVICE, with_bias_grad=False)} == set(triton_ops().OP_NAMES)


@pytest.mark.parametrize("index", range(len(opcheck_samples(DEVICE, with_bias_grad=False))))
def test_opcheck(index):
    name, args = opcheck_samples(DEVICE, with_bias_grad=False)[index]
    torch.library.opcheck(getattr(torch.ops.sparsekernels_triton, name), args)


@pytest.mark.parametrize("layout", [BlockSparse(16, 0.5), NM(2, 4)], ids=layout_id)
def test_compiles_without_graph_breaks(layout):
    """torch.compile traces through the triton_op ops (fullgraph: a graph break would raise)."""
    torch._dynamo.reset()
    layer = SparseLinear(64, 48, layout).to(DEVICE)
    input = torch.randn(6, 64, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    output = compiled(input)
    output.square().sum().backward()
    grads = (input.grad.clone(), layer.values.grad.clone())
    input.grad = None
    layer.zero_grad()
    expected = layer(input)
    expected.square().sum().backward()
    assert_close(output, expected, torch.float32, "output")
    assert_close(grads[0], input.grad, torch.float32, "grad input")
    assert_close(grads[1], layer.values.grad, torch.float32, "grad values")


@pytest.fixture
def no_kernel_launch(monkeypatch):
    """Make every launcher fail, so a test can show that its error is raised before any kernel."""
    ops = triton_ops()

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the arguments were checked")

    for family in ("bsr", "nm"):
        for kind in ("forward", "grad_input", "grad_values"):
            monkeypatch.setattr(ops, f"{family}_{kind}", launched)


def test_bad_arguments_raise_before_any_kernel(no_kernel_launch):
    ops = torch.ops.sparsekernels_triton
    block = make_case(BlockSparse(16, 0.5), torch.float32, DEVICE).matrix
    nm = make_case(NM(2, 4), torch.float32, DEVICE).matrix
    x_block = torch.randn(3, block.shape[1], device=DEVICE)
    x_nm = torch.randn(3, nm.shape[1], device=DEVICE)
    index = block.index_tensors()
    with pytest.raises(TypeError, match="input and values to have the same dtype"):
        ops.bsr_linear(x_block.half(), block.values, *index, None)
    with pytest.raises(ValueError, match=r"input.shape\[-1\] must equal in_features=80"):
        ops.bsr_linear(x_block[:, :-16], block.values, *index, None)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bsr_linear(x_block, block.values, *index, torch.zeros(2, 48, device=DEVICE))
    with pytest.raises(TypeError, match=r"block_col_indices must have the dtype of block_row_offsets \(torch.int32\)"):
        ops.bsr_linear(x_block, block.values, index[0], index[1].float(), *index[2:], None)
    with pytest.raises(ValueError, match="grad_output.shape\\[-1\\] must equal out_features=48"):
        ops.bsr_linear_grad_input(torch.randn(3, 47, device=DEVICE), block.values, *index)
    with pytest.raises(ValueError, match="grad_output and input must have the same leading dims"):
        ops.bsr_linear_grad_values(torch.randn(4, 48, device=DEVICE), x_block, *index, 16)
    with pytest.raises(TypeError, match="positions must be uint8"):
        ops.nm_linear(x_nm, nm.values, nm.positions.int(), 2, 4, None)
    with pytest.raises(ValueError, match=r"m must be one of \(2, 4, 8, 16\)"):
        ops.nm_linear(x_nm, nm.values, nm.positions, 2, 3, None)
    with pytest.raises(ValueError, match="must be a multiple of m=4"):
        ops.nm_linear_grad_values(torch.randn(3, 24, device=DEVICE), x_nm[:, :-1], nm.positions, 2, 4)
    with pytest.raises(TypeError, match="values must be float32, bfloat16 or float16"):
        ops.nm_linear_grad_input(torch.randn(3, 24, device=DEVICE).double(), nm.values.double(), nm.positions, 2, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_unavailable_without_gpu_or_interpreter():
    code = (
        "import sparsekernels as sk\n"
        "print(sk.triton.unavailable_reason())\n"
        "try:\n    sk.set_backend('triton')\nexcept RuntimeError as error:\n    print('raised:', error)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "TRITON_INTERPRET=1" in result.stdout
    assert "raised: backend 'triton' is not available" in result.stdout


@pytest.mark.gpu
def test_auto_backend_picks_triton_for_cuda():
    sk.set_backend(None)
    assert sk.backend.resolve_backend(torch.device("cuda")) == "triton"


def test_kernels_compile_for_a100_and_h100():
    """The widest- and narrowest-tile configurations compile to cubins for sm_80 and sm_90 and fit in
    shared memory (the interpreter runs code that the compiler may reject; this catches it without a GPU)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "sparsekernels.triton.compile_check", "--quick", "--arch", "80", "90"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert re.search(r"\b[1-9]\d* configurations x 2 architectures: 0 failures", result.stdout), result.stdout[-2000:]


# ------------------------------------------------------------- N:M NaN / Inf: a dropped weight is absent
# The N:M forward and input-gradient kernels rebuild dense weight tiles (zeros where a weight is
# dropped) for tl.dot. A NaN or Inf operand must still meet the kept weights only, exactly as a dense
# product over the kept weights (docs/reliability.md): checked against a reference that forms every
# kept term on its own, so its NaN / +Inf / -Inf pattern is the IEEE one.
NONFINITE_LAYOUTS = [NM(2, 4), NM(1, 4), NM(4, 8), NM(5, 16)]
# 80 input features: a full 64-wide input tile and a partial one for every m; 40 outputs: a partial
# output tile; 70 rows: two row tiles.
NONFINITE_FEATURES = (40, 80)


def nonfinite_weight(layout, dtype, seed: int = 0):
    """(weight [out, in] float32, masked to the pattern, with ~8% kept exact zeros; mask; a column
    that every output drops). The column is the last one of group 1."""
    torch.manual_seed(seed)
    out_features, in_features = NONFINITE_FEATURES
    draws = torch.rand(out_features, in_features // layout.m, layout.m)
    draws[:, 1, -1] = 2.0  # never among the n smallest draws of its group: dropped in every row
    keep = draws.argsort(dim=-1)[..., : layout.n]
    mask = torch.zeros_like(draws, dtype=torch.bool).scatter_(-1, keep, True).reshape(out_features, in_features)
    weight = torch.randn(out_features, in_features).to(dtype).float()
    weight[torch.rand(out_features, in_features) < 0.08] = 0.0
    return weight * mask, mask, 2 * layout.m - 1


def nm_apply(weight, mask, layout, operand, direction, bias=None):
    """The Triton kernel of ``direction`` on ``operand``: the forward ``x @ W.T (+ bias)`` or the input
    gradient ``grad_out @ W`` (weight entries may be non-finite; they are stored as they are)."""
    matrix = NMMatrix.from_dense(weight.to(operand.dtype), layout.n, layout.m, mask=mask)
    triton_ops()  # registers the ops
    ops = torch.ops.sparsekernels_triton
    values, positions = matrix.values.to(DEVICE), matrix.positions.to(DEVICE)
    if direction == "forward":
        bias = None if bias is None else bias.to(operand.dtype).to(DEVICE)
        return ops.nm_linear(operand.to(DEVICE), values, positions, layout.n, layout.m, bias).cpu()
    return ops.nm_linear_grad_input(operand.to(DEVICE), values, positions, layout.n, layout.m).cpu()


def kept_terms_product(operand, weight, mask, direction):
    """``operand @ W.T`` (forward) or ``operand @ W`` (input gradient) in float32, summing the kept
    terms only, each formed on its own: a dropped weight is absent, never 0 * NaN."""
    weight_op, mask_op = (weight, mask) if direction == "forward" else (weight.T, mask.T)
    terms = operand.float()[:, None, :] * weight_op.float()[None]
    return torch.where(mask_op[None], terms, torch.zeros(())).sum(-1)


def operand_for(direction, rows):
    out_features, in_features = NONFINITE_FEATURES
    return torch.randn(rows, in_features if direction == "forward" else out_features)


def check_kept_terms(actual, operand, weight, mask, direction, dtype, what, bias=None):
    expected = kept_terms_product(operand.to(dtype), weight.to(dtype), mask, direction)
    if bias is not None:
        expected = expected + bias.to(dtype).float()
    tolerance = TOLERANCE[dtype]
    finite = torch.isfinite(expected)
    scale = max(expected[finite].abs().max().item(), 1.0) if finite.any() else 1.0
    torch.testing.assert_close(actual.float(), expected, rtol=tolerance, atol=tolerance * scale, equal_nan=True,
                               msg=lambda message: f"{direction}, {what}: {message}")
    return expected


# NaN/Inf operands make the interpreter's numpy arithmetic warn; the results are what is checked.
EXPECTS_NONFINITE = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

NONFINITE_PARAMS = [
    pytest.mark.parametrize("direction", ["forward", "grad_input"]),
    pytest.mark.parametrize("rows", [1, 70]),
    pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str),
    pytest.mark.parametrize("layout", NONFINITE_LAYOUTS, ids=layout_id),
    EXPECTS_NONFINITE,
]


def nonfinite_params(test):
    for mark in NONFINITE_PARAMS:
        test = mark(test)
    return test


@nonfinite_params
def test_nm_nan_and_inf_reach_only_the_outputs_that_keep_them(layout, dtype, rows, direction):
    """A NaN / Inf operand entry reaches exactly the outputs whose kept weights touch it: none for an
    input column that every output drops, and never through a dropped weight (0 * NaN)."""
    weight, mask, dropped_everywhere = nonfinite_weight(layout, dtype)
    mask_op = mask if direction == "forward" else mask.T  # [outputs of the product, operand columns]
    # forward: a column dropped by every output, and one kept by some; input grad: two outputs.
    first, second = (dropped_everywhere, 3 * layout.m) if direction == "forward" else (5, 38)
    operand = operand_for(direction, rows)
    operand[0, first] = operand[0, second] = float("nan")
    if rows > 1:  # in another row tile
        operand[-1, first], operand[-1, second] = float("inf"), float("-inf")
    result = nm_apply(weight, mask, layout, operand.to(dtype), direction)
    touched = mask_op[:, first] | mask_op[:, second]
    assert touched.any() and not touched.all()
    assert torch.equal(torch.isnan(result[0]), touched)
    assert torch.equal(~torch.isfinite(result[-1]), touched)
    if direction == "forward":
        assert not mask_op[:, dropped_everywhere].any()
    check_kept_terms(result, operand, weight, mask, direction, dtype, "NaN / Inf entries")


@nonfinite_params
def test_nm_inf_times_kept_zero_and_opposite_infs_give_nan(layout, dtype, rows, direction):
    """Kept-only IEEE arithmetic: Inf times a KEPT weight that is exactly 0 is NaN, and +Inf and -Inf
    terms meeting in one output give NaN (a dropped 0 weight gives neither)."""
    weight, mask, _ = nonfinite_weight(layout, dtype)
    weight_op, mask_op = (weight, mask) if direction == "forward" else (weight.T, mask.T)  # views
    target = 2  # an output of the product
    kept = mask_op[target].nonzero().squeeze(1)
    assert len(kept) >= 3
    zero_at, positive_at, negative_at = kept[0].item(), kept[1].item(), kept[-1].item()
    weight_op[target, zero_at] = 0.0
    weight_op[target, positive_at] = 1.5
    weight_op[target, negative_at] = -0.5
    dropped_at = (~mask_op[target]).nonzero()[0].item()
    # Inf at a kept zero weight, and at a dropped one (absent: no effect on this output).
    operand = operand_for(direction, rows)
    operand[0, zero_at] = float("inf")
    operand[0, dropped_at] = float("-inf")
    result = nm_apply(weight, mask, layout, operand.to(dtype), direction)
    assert torch.isnan(result[0, target])
    check_kept_terms(result, operand, weight, mask, direction, dtype, "Inf times a kept zero")
    # +Inf * 1.5 and +Inf * -0.5 in the same output: NaN; each alone would be +Inf / -Inf.
    operand = operand_for(direction, rows)
    operand[-1, positive_at] = operand[-1, negative_at] = float("inf")
    result = nm_apply(weight, mask, layout, operand.to(dtype), direction)
    assert torch.isnan(result[-1, target])
    expected = check_kept_terms(result, operand, weight, mask, direction, dtype, "+Inf and -Inf meet")
    assert torch.isposinf(expected).any() or torch.isneginf(expected).any()


@nonfinite_params
def test_nm_sprinkled_nan_and_inf_match_kept_only_product(layout, dtype, rows, direction):
    """NaN, +Inf and -Inf sprinkled over the operand (as after an fp16 overflow), kept zero weights,
    and a few non-finite KEPT weights (an Inf weight meeting an Inf operand is +-Inf, not NaN; meeting
    a 0 operand, NaN): every output gets the class and the value of the sum over its kept terms."""
    weight, mask, _ = nonfinite_weight(layout, dtype, seed=3)
    weight_op, mask_op = (weight, mask) if direction == "forward" else (weight.T, mask.T)
    operand = operand_for(direction, rows)
    pick = torch.rand(operand.shape)
    operand[pick < 0.02] = float("nan")
    operand[(pick >= 0.02) & (pick < 0.04)] = float("inf")
    operand[(pick >= 0.04) & (pick < 0.06)] = float("-inf")
    # Non-finite kept weights; the last row of the operand holds +-Inf right where they are.
    kept_rows, kept_cols = mask_op.nonzero(as_tuple=True)
    for index, value in ((3, float("inf")), (len(kept_rows) // 2, float("-inf")), (-1, float("nan"))):
        weight_op[kept_rows[index], kept_cols[index]] = value
    operand[-1, kept_cols[3]] = float("-inf")
    operand[-1, kept_cols[len(kept_rows) // 2]] = float("-inf")
    # 0 times the +Inf weight is NaN, also in a tile that holds a NaN operand (the next column).
    operand[0, kept_cols[3]], operand[0, kept_cols[3] ^ 1] = 0.0, float("nan")
    bias = torch.randn(NONFINITE_FEATURES[0]) if direction == "forward" else None  # added on either path
    result = nm_apply(weight, mask, layout, operand.to(dtype), direction, bias)
    expected = check_kept_terms(result, operand, weight, mask, direction, dtype, "sprinkled", bias)
    if rows > 1:
        assert torch.isfinite(expected).any() and torch.isnan(expected).any()
        assert torch.isposinf(expected).any() and torch.isneginf(expected).any()


@pytest.mark.parametrize("rows", [1, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", NONFINITE_LAYOUTS, ids=layout_id)
@EXPECTS_NONFINITE
def test_nm_grad_values_never_sample_dropped_positions(layout, dtype, rows):
    """The kept-value gradient picks kept entries of a dense grad_out.T @ x tile: an entry involves one
    input column and one output only, so a NaN / Inf at a dropped position is never sampled."""
    weight, mask, dropped_everywhere = nonfinite_weight(layout, dtype)
    matrix = NMMatrix.from_dense(weight.to(dtype), layout.n, layout.m, mask=mask)
    x = operand_for("forward", rows)
    x[:, dropped_everywhere] = float("nan")
    x[-1, 3 * layout.m + 1] = float("inf")
    grad_out = operand_for("grad_input", rows)
    grad_out[0, 7] = float("-inf")
    triton_ops()
    grad_values = torch.ops.sparsekernels_triton.nm_linear_grad_values(
        grad_out.to(dtype).to(DEVICE), x.to(dtype).to(DEVICE), matrix.positions.to(DEVICE), layout.n, layout.m).cpu()
    columns = matrix.column_indices()
    expected = (grad_out.to(dtype).float().T @ x.to(dtype).float()).gather(1, columns)  # entrywise exact
    assert torch.isfinite(expected).any() and not torch.isfinite(expected).all()
    tolerance = TOLERANCE[dtype]
    scale = max(expected[torch.isfinite(expected)].abs().max().item(), 1.0)
    torch.testing.assert_close(grad_values.float(), expected, rtol=tolerance, atol=tolerance * scale, equal_nan=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts calls of an interpreted kernel helper")
@pytest.mark.parametrize("direction", ["forward", "grad_input"])
@EXPECTS_NONFINITE
def test_nm_kept_only_path_runs_only_where_a_tile_is_not_finite(monkeypatch, direction):
    """The exact path is for programs whose result is not finite: none for finite operands, and for a
    NaN in one row, only the programs of that row tile (70 rows: two row tiles of 64)."""
    from sparsekernels.triton import nm_forward, nm_grad_input

    module, name = ((nm_forward, "_nm_forward_kept_only") if direction == "forward"
                    else (nm_grad_input, "_nm_grad_input_kept_only"))
    calls = []
    exact_path = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return exact_path(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    layout = NM(2, 4)
    weight, mask, _ = nonfinite_weight(layout, torch.float32)
    operand = operand_for(direction, 70)
    finite = nm_apply(weight, mask, layout, operand, direction)
    assert calls == []
    operand[66, 3] = float("nan")
    result = nm_apply(weight, mask, layout, operand, direction)
    programs = 1 if direction == "forward" else 2  # output tiles / input tiles (80 inputs: two of 64)
    assert len(calls) == programs
    assert torch.equal(result[:64], finite[:64])  # the other row tile: the plain product, untouched
    check_kept_terms(result, operand, weight, mask, direction, torch.float32, "one NaN")


# ------------------------------------------------------------ 64-bit column offsets in the N:M kernels
# Column-major views [rows, 64] of one huge buffer (as ``x.T`` of a [64, S] tensor would be): column c
# starts c * HUGE_COLUMN_STRIDE elements in, and the last column's offset, 63 * HUGE_COLUMN_STRIDE,
# passes 2^31 - 1, where an int32 product of column index and stride would wrap to a negative offset.
HUGE_COLUMN_STRIDE = 2**31 // 63 + 1024


@pytest.mark.slow
@EXPECTS_NONFINITE
def test_nm_kernels_address_column_offsets_past_2_31_elements():
    """Forward (the dot path, the kept-only path and the small-M kernel), input gradient (both paths)
    and kept-value gradient read every column of operands whose column offsets pass 2^31 elements.
    The float16 buffer is 4.3 GB of address space (on a GPU, of device memory); on the host only the
    pages written or read are ever backed (about 0.4 GB in all under the interpreter, a few seconds)."""
    layout, features, rows, dtype = NM(2, 4), 64, 17, torch.float16  # 17 rows: nm_forward's dot kernel
    buffer = torch.empty((features - 1) * HUGE_COLUMN_STRIDE + 2 * rows, dtype=dtype, device=DEVICE)
    x = buffer.as_strided((rows, features), (1, HUGE_COLUMN_STRIDE))
    grad_out = buffer.as_strided((rows, features), (1, HUGE_COLUMN_STRIDE), rows)  # the next rows of each column
    assert (features - 1) * x.stride(1) > 2**31 - 1
    x.copy_(torch.randn(rows, features))
    grad_out.copy_(torch.randn(rows, features))
    matrix = NMMatrix.from_dense(torch.randn(features, features).to(dtype), layout.n, layout.m)
    weight, mask = matrix.to_dense().float(), matrix.mask()
    triton_ops()
    ops = torch.ops.sparsekernels_triton
    values, positions = matrix.values.to(DEVICE), matrix.positions.to(DEVICE)

    def host(tensor):
        return tensor.detach().cpu().float()

    assert_close(host(ops.nm_linear(x, values, positions, 2, 4, None)), host(x) @ weight.T, dtype, "forward")
    assert_close(host(ops.nm_linear(x[:3], values, positions, 2, 4, None)), host(x[:3]) @ weight.T, dtype,
                 "small-M forward")
    assert_close(host(ops.nm_linear_grad_input(grad_out, values, positions, 2, 4)), host(grad_out) @ weight, dtype,
                 "grad_input")
    expected_grad_values = (host(grad_out).T @ host(x)).gather(1, matrix.column_indices())
    assert_close(host(ops.nm_linear_grad_values(grad_out, x, positions, 2, 4)), expected_grad_values, dtype,
                 "grad_values")
    # A NaN in the first row tile: the forward and the input gradient recompute it over kept terms only.
    x[0, 1] = grad_out[0, 1] = float("nan")
    check_kept_terms(host(ops.nm_linear(x, values, positions, 2, 4, None)), host(x), weight, mask, "forward",
                     dtype, "kept-only forward")
    check_kept_terms(host(ops.nm_linear_grad_input(grad_out, values, positions, 2, 4)), host(grad_out), weight, mask,
                     "grad_input", dtype, "kept-only grad_input")
