"""Transposable N:M: W.T's pattern (NMMatrix.transposed_pattern), the op nm_linear_transposable whose
input gradient is the N:M forward on W.T, and SparseLinear with ``NM(n, m, transposable=True)``.

Expectations come from dense float32 PyTorch on the masked weight (tests/cases.py). Masks are the
pruning function's (``transposable_nm_mask``, 1:2 and 2:4) or built here by hand (2:8, 4:8), with
another construction than the library's ``random_transposable_mask``. The Triton backend runs under
the interpreter on CPU tensors (TRITON_INTERPRET is set before the kernels are first imported,
``triton_device()`` as in tests/test_triton.py), on small shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekernels as sk
from cases import OpRecorder, SparseCase, TOLERANCE, assert_close, check_op_against_dense, triton_device
from sparsekernels import NM, BlockSparseMatrix, NMMatrix, SparseLinear
from sparsekernels.formats.nm import random_transposable_mask
from sparsekernels.ops.nm_transposable import nm_linear_transposable
from sparsekernels.pruning import transposable_nm_mask
from sparsekernels.training import RigL, SET, SRSTELinear, finalize_ste_

TRITON_DEVICE = triton_device()

# (n, m, (out_features, in_features)): not powers of two where the pattern allows, several tiles
# both ways. 1:2 and 2:4 masks come from transposable_nm_mask, 2:8 and 4:8 from hand_built_mask.
PATTERNS = [(1, 2, (6, 10)), (2, 4, (12, 20)), (2, 8, (16, 24)), (4, 8, (24, 16))]
PATTERN_IDS = [f"{n}:{m}" for n, m, _ in PATTERNS]
LEADING = [(1,), (7,), (2, 3)]


def hand_built_mask(out_features: int, in_features: int, n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """Tile by tile: with sigma a random permutation, row i keeps columns sigma(i), ..., sigma(i+n-1)
    (mod m), so column sigma(j) is kept by rows j, j-1, ..., j-n+1: n per row and per column."""
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    for tile_row in range(out_features // m):
        for tile_col in range(in_features // m):
            sigma = torch.randperm(m, generator=generator).tolist()
            rows = torch.randperm(m, generator=generator).tolist()
            for i in range(m):
                for k in range(n):
                    mask[tile_row * m + rows[i], tile_col * m + sigma[(i + k) % m]] = True
    return mask


def is_nm_both_ways(mask: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = mask.shape
    along_rows = mask.reshape(rows, cols // m, m).sum(-1) == n
    along_cols = mask.t().reshape(cols, rows // m, m).sum(-1) == n
    return bool(along_rows.all()) and bool(along_cols.all())


def transposable_case(n, m, features, dtype=torch.float32, device="cpu", seed=0) -> SparseCase:
    out_features, in_features = features
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(out_features, in_features, generator=generator).to(dtype)
    if m in (2, 4):
        mask = transposable_nm_mask(dense.abs().float(), n, m)
    else:
        mask = hand_built_mask(out_features, in_features, n, m, generator)
    assert is_nm_both_ways(mask, n, m)
    matrix = NMMatrix.from_dense(dense, n, m, mask=mask)
    return SparseCase(matrix.to(device), dense.to(device), mask.to(device))


def op_args(matrix: NMMatrix):
    transpose_index, positions_t = matrix.transposed_pattern()
    return matrix.positions, transpose_index, positions_t, matrix.n, matrix.m


def triton_available() -> bool:
    return sk.backend_available("triton")


def use_backend(backend: str, monkeypatch) -> str:
    """Force ``backend``; returns the device its tensors live on."""
    if backend == "triton":
        if not triton_available():
            pytest.skip(str(sk.triton.unavailable_reason()))
        monkeypatch.setenv("SPARSEKERNELS_DENSE_FALLBACK", "0")  # on a GPU: the kernels, not F.linear
        monkeypatch.setenv("SPARSEKERNELS_AUTOTUNE", "0")
    sk.set_backend(backend)
    return TRITON_DEVICE if backend == "triton" else "cpu"


def check_against_dense(case: SparseCase, dtype, leading, with_bias, device="cpu"):
    """Forward and the three gradients of nm_linear_transposable against dense float32 autograd."""
    check_op_against_dense(
        case, lambda input, values, bias: nm_linear_transposable(input, values, *op_args(case.matrix), bias),
        dtype, leading, with_bias, device,
    )


# ---------------------------------------------------------------------- the format: W.T's pattern
@pytest.mark.parametrize("n, m, features", PATTERNS, ids=PATTERN_IDS)
def test_transposed_pattern_gives_w_transposed(n, m, features):
    matrix = transposable_case(n, m, features).matrix
    assert matrix.is_transposable()
    transpose_index, positions_t = matrix.transposed_pattern()
    assert transpose_index.dtype == torch.int64 and positions_t.dtype == torch.uint8
    # A permutation of the kept slots: W.T's values are W's, reordered.
    assert torch.equal(transpose_index.sort().values, torch.arange(matrix.values.numel()))
    transposed = matrix.t()
    assert tuple(transposed.shape) == (features[1], features[0])
    assert torch.equal(transposed.to_dense(), matrix.to_dense().t())
    assert torch.equal(transposed.mask(), matrix.mask().t())
    # W.T's positions are a valid N:M pattern in the ordinary encoding.
    NMMatrix(transposed.values, positions_t, n, m)


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (7, 8), (5, 16)])
def test_random_transposable_patterns(n, m):
    first = NMMatrix.random((3 * m, 5 * m), n, m, transposable=True, generator=torch.Generator().manual_seed(1))
    second = NMMatrix.random((3 * m, 5 * m), n, m, transposable=True, generator=torch.Generator().manual_seed(2))
    assert is_nm_both_ways(first.mask(), n, m) and first.is_transposable()
    assert not torch.equal(first.mask(), second.mask())
    assert is_nm_both_ways(random_transposable_mask(2 * m, m, n, m), n, m)


def test_non_transposable_patterns_are_refused_with_the_reason():
    matrix = NMMatrix.from_dense(torch.randn(8, 8), 2, 4, mask=torch.tensor([[1, 1, 0, 0] * 2] * 8).bool())
    assert not matrix.is_transposable()
    with pytest.raises(ValueError, match=r"not along out_features.*column 0, rows 0..3 keep 4"):
        matrix.transposed_pattern()
    with pytest.raises(ValueError, match="out_features=6 is not a multiple of m=4"):
        NMMatrix.from_dense(torch.randn(6, 8), 2, 4).t()
    with pytest.raises(ValueError, match="out_features=6 must be a multiple of m=4"):
        NMMatrix.random((6, 8), 2, 4, transposable=True)


def test_layout_value_semantics():
    assert NM(2, 4) == NM(2, 4, transposable=False) and hash(NM(2, 4)) == hash(NM(2, 4, False))
    assert NM(2, 4, transposable=True) != NM(2, 4)
    assert repr(NM(2, 4)) == "NM(n=2, m=4)"
    assert repr(NM(2, 4, transposable=True)) == "NM(n=2, m=4, transposable=True)"
    assert NM(2, 4, transposable=True).density == 0.5
    with pytest.raises(TypeError, match="transposable must be a bool"):
        NM(2, 4, transposable=1)
    with pytest.raises(ValueError, match="out_features=6 must be a multiple of m=4 for a transposable layout"):
        NM(2, 4, transposable=True).check_shape(6, 8)
    NM(2, 4).check_shape(6, 8)


# ---------------------------------------------------------------------- the op against dense math
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, m, features", PATTERNS, ids=PATTERN_IDS)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_matches_dense_reference(backend, n, m, features, dtype, leading, with_bias, monkeypatch):
    device = use_backend(backend, monkeypatch)
    check_against_dense(transposable_case(n, m, features, dtype, device), dtype, leading, with_bias, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_grad_input_equals_the_plain_nm_path(backend, dtype, monkeypatch):
    """Same weight, same inputs: the transposed path gives the gradient of ``nm_linear``'s own
    backward (nm_linear_grad_input), up to summation order."""
    device = use_backend(backend, monkeypatch)
    matrix = transposable_case(2, 4, (12, 20), dtype, device, seed=3).matrix
    input = torch.randn(2, 5, 20, device=device).to(dtype)
    grad_output = torch.randn(2, 5, 12, device=device).to(dtype)
    grads = []
    for transposable in (False, True):
        x = input.clone().requires_grad_()
        values = matrix.values.detach().clone().requires_grad_()
        if transposable:
            output = nm_linear_transposable(x, values, *op_args(matrix))
        else:
            output = sk.ops.nm_linear(x, values, matrix.positions, 2, 4)
        output.backward(grad_output)
        grads.append((output.detach(), x.grad, values.grad))
    for plain, transposed, what in zip(grads[0], grads[1], ("output", "grad input", "grad values")):
        torch.testing.assert_close(transposed, plain, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], msg=what)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_wrong_transpose_index_or_positions_t_gives_a_wrong_input_gradient(backend, monkeypatch):
    """Where the input gradient takes the transposed route, it really reads transpose_index and
    positions_t: a swap of two entries of either (still in range, still the right shape) breaks it
    while the forward stays right. (The ``cpu`` backend reads neither: see the next tests.)"""
    if use_backend(backend, monkeypatch) != "cpu":
        pytest.skip("small CPU tensors; the GPU path is covered by test_matches_dense_reference")
    case = transposable_case(2, 4, (12, 20))
    matrix = case.matrix
    positions, transpose_index, positions_t, n, m = op_args(matrix)
    input = torch.randn(5, 20)
    # Not all ones: a permutation inside one column of W would not change grad_output @ W then.
    grad_output = torch.randn(5, 12)
    expected = grad_output @ case.masked

    def grad_input(index, pattern_t):
        x = input.clone().requires_grad_()
        output = nm_linear_transposable(x, matrix.values, positions, index, pattern_t, n, m)
        torch.testing.assert_close(output, F.linear(input, case.masked))
        output.backward(grad_output)
        return x.grad

    torch.testing.assert_close(grad_input(transpose_index, positions_t), expected)
    swapped = transpose_index.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not torch.allclose(grad_input(swapped, positions_t), expected)
    # positions_t of another transposable pattern: same shape and encoding, other kept rows
    other = transposable_case(2, 4, (12, 20), seed=1).matrix
    _, _, other_positions_t, _, _ = op_args(other)
    assert not torch.equal(other_positions_t, positions_t)
    assert not torch.allclose(grad_input(transpose_index, other_positions_t), expected)


def backward_ops(backend: str, monkeypatch) -> list:
    """The ops that the backward of a small transposable layer reaches, eagerly, with ``backend``."""
    device = use_backend(backend, monkeypatch)
    matrix = transposable_case(2, 4, (12, 20), device=device).matrix
    x = torch.randn(3, 20, device=device, requires_grad=True)
    output = nm_linear_transposable(x, matrix.values.detach().clone().requires_grad_(), *op_args(matrix))
    with OpRecorder() as recorder:
        output.sum().backward()
    return recorder.names


def test_backward_runs_the_nm_forward_on_w_transposed(monkeypatch):
    """Triton backend: the input gradient is a gather plus the N:M forward on W.T, never
    nm_linear_grad_input (which on CUDA expands the weight to dense)."""
    names = backward_ops("triton", monkeypatch)
    assert any("index_select" in name for name in names), names
    assert not any("nm_linear_grad_input" in name for name in names), names


def test_cpu_backward_runs_the_expanding_grad_input_kernel(monkeypatch):
    """CPU backend: the input gradient is the C++ nm_linear_grad_input, with no gather (on CPU the
    gather alone costs more than that kernel; see transposable_grad_input)."""
    names = backward_ops("cpu", monkeypatch)
    assert "sparsekernels.nm_linear_grad_input.default" in names, names
    assert "sparsekernels.nm_linear_grad_values.default" in names, names
    assert not any("index_select" in name for name in names), names
    assert "sparsekernels.nm_linear.default" not in names, names


# ---------------------------------------------------------------------- op contract: checks, opcheck, compile
def test_bad_arguments_raise_clear_errors():
    case = transposable_case(2, 4, (12, 20))
    matrix = case.matrix
    positions, transpose_index, positions_t, n, m = op_args(matrix)
    x = torch.randn(3, 20)
    op = torch.ops.sparsekernels.nm_linear_transposable
    with pytest.raises(TypeError, match="transpose_index must be int64, got torch.int32"):
        op(x, matrix.values, positions, transpose_index.int(), positions_t, n, m, None)
    with pytest.raises(ValueError, match=r"transpose_index must be 1-D with nnz=120 entries"):
        op(x, matrix.values, positions, transpose_index[:-1], positions_t, n, m, None)
    with pytest.raises(TypeError, match="positions_t must be uint8"):
        op(x, matrix.values, positions, transpose_index, positions_t.int(), n, m, None)
    with pytest.raises(ValueError, match=r"positions_t \(the pattern of W.T \[20, 12\]\) must have shape \[20, 2\]"):
        op(x, matrix.values, positions, transpose_index, positions_t[:-1], n, m, None)
    with pytest.raises(ValueError, match=r"input.shape\[-1\] must equal in_features=20"):
        op(x[:, :-4], matrix.values, positions, transpose_index, positions_t, n, m, None)
    # out_features not a multiple of m: W.T cannot be N:M
    rows = NMMatrix.from_dense(torch.randn(6, 20), 2, 4)
    with pytest.raises(ValueError, match="out_features=6 must be a multiple of m=4"):
        op(x, rows.values, rows.positions, torch.arange(60), torch.zeros(20, 1, dtype=torch.uint8), 2, 4, None)
    # the same checks run on fake tensors (torch.compile, meta)
    meta = [t.to("meta") for t in (x, matrix.values, positions, transpose_index, positions_t)]
    with pytest.raises(TypeError, match="transpose_index must be int64"):
        op(meta[0], meta[1], meta[2], meta[3].int(), meta[4], n, m, None)
    assert op(*meta, n, m, None).shape == (3, 12)


def test_composite_ops_are_listed():
    assert sk.ops.COMPOSITE_OP_NAMES == ("nm_linear_transposable",)
    assert not set(sk.ops.COMPOSITE_OP_NAMES) & set(sk.ops.OP_NAMES)
    for name in sk.ops.COMPOSITE_OP_NAMES:
        assert hasattr(torch.ops.sparsekernels, name)


def opcheck_samples():
    samples = []
    for n, m, features in (PATTERNS[1], PATTERNS[3]):
        matrix = transposable_case(n, m, features).matrix
        out_features, in_features = features
        for leading in ((5,), (2, 3)):
            input = torch.randn(*leading, in_features, requires_grad=True)
            values = matrix.values.detach().clone().requires_grad_()
            bias = torch.randn(out_features, requires_grad=True)
            samples += [(input, values, *op_args(matrix), bias), (input, values, *op_args(matrix), None)]
    return samples


# The reference backend is left out: its dense math checks inputs for NaN on the host (kept-only
# semantics), which cannot be traced with dynamic shapes; it is not meant for torch.compile.
@pytest.mark.parametrize("backend, index", [("cpu", index) for index in range(8)] + [("triton", 0), ("triton", 7)])
def test_opcheck(backend, index, monkeypatch):
    use_backend(backend, monkeypatch)
    torch.library.opcheck(torch.ops.sparsekernels.nm_linear_transposable, opcheck_samples()[index])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compiles_without_graph_breaks(backend, monkeypatch):
    """torch.compile(fullgraph=True) through a transposable layer; the traced backward holds the
    gather and the forward op on W.T, not nm_linear_grad_input (on the ``cpu`` backend the reverse:
    nm_linear_grad_input and no gather)."""
    device = use_backend(backend, monkeypatch)
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    backward_graphs = []

    def forward_compiler(graph, example_inputs):
        return make_boxed_func(graph.forward)

    def backward_compiler(graph, example_inputs):
        backward_graphs.append(graph.code)
        return make_boxed_func(graph.forward)

    layer = SparseLinear(20, 12, NM(2, 4, transposable=True)).to(device)
    input = torch.randn(6, 20, device=device, requires_grad=True)
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler),
                             fullgraph=True)
    output = compiled(input)
    output.square().sum().backward()
    grads = (input.grad.clone(), layer.values.grad.clone(), layer.bias.grad.clone())
    input.grad = None
    layer.zero_grad()
    expected = layer(input)
    expected.square().sum().backward()
    assert_close(output, expected, torch.float32, "output")
    for actual, wanted, what in zip(grads, (input.grad, layer.values.grad, layer.bias.grad), ("input", "values", "bias")):
        assert_close(actual, wanted, torch.float32, f"grad {what}")
    assert len(backward_graphs) == 1
    code = backward_graphs[0]
    if backend == "cpu":
        assert "nm_linear_grad_input" in code and "index_select" not in code, code
        assert "nm_linear_grad_values" in code and "nm_linear.default" not in code, code
        return
    assert "index_select" in code and "nm_linear_grad_input" not in code, code
    if device == "cpu":
        # Opaque ops (Triton under the interpreter) appear by name; on a GPU a triton_op is
        # decomposed into its kernel launches, so only the gather is recognisable there.
        assert "nm_linear_grad_values" in code and "nm_linear.default" in code, code


# ---------------------------------------------------------------------- SparseLinear
@pytest.mark.parametrize("n, m, features", PATTERNS, ids=PATTERN_IDS)
def test_sparse_linear_training_step_matches_dense(n, m, features):
    out_features, in_features = features
    layer = SparseLinear(in_features, out_features, NM(n, m, transposable=True), dtype=torch.bfloat16)
    assert is_nm_both_ways(layer.dense_mask(), n, m)
    assert layer.transpose_index.dtype == torch.int64 and layer.positions_t.dtype == torch.uint8
    input = torch.randn(2, 3, in_features).to(torch.bfloat16).requires_grad_()
    output = layer(input)
    weight_ref = layer.dense_weight().detach().float().requires_grad_()
    input_ref = input.detach().float().requires_grad_()
    output_ref = F.linear(input_ref, weight_ref, layer.bias.detach().float())
    assert_close(output, output_ref, torch.bfloat16, "output")
    output.float().square().sum().backward()
    output_ref.square().sum().backward()
    assert_close(input.grad, input_ref.grad, torch.bfloat16, "grad input")
    expected_values_grad = weight_ref.grad.gather(1, layer.matrix.column_indices())
    assert_close(layer.values.grad, expected_values_grad, torch.bfloat16, "grad values")


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4)])
def test_from_dense_and_sparsify_prune_transposably(n, m):
    linear = nn.Linear(5 * m, 3 * m)
    layer = SparseLinear.from_dense(linear, NM(n, m, transposable=True))
    assert layer.layout == NM(n, m, transposable=True)
    expected = transposable_nm_mask(linear.weight.detach().abs(), n, m)
    assert torch.equal(layer.dense_mask(), expected)
    torch.testing.assert_close(layer.dense_weight(), linear.weight.detach() * expected, rtol=0, atol=0)
    model = sk.sparsify_(nn.Sequential(nn.Linear(5 * m, 3 * m), nn.ReLU(), nn.Linear(3 * m, m)),
                         NM(n, m, transposable=True))
    for index in (0, 2):
        assert model[index].layout.transposable and is_nm_both_ways(model[index].dense_mask(), n, m)
    model(torch.randn(4, 5 * m)).sum().backward()
    with pytest.raises(ValueError, match=r"cannot sparsify 2 .*out_features=2 must be a multiple of m=4"):
        sk.sparsify_(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), NM(2, 4, transposable=True))


def test_other_patterns_need_an_explicit_transposable_mask():
    linear = nn.Linear(24, 16)
    with pytest.raises(ValueError, match=r"cannot prune into NM\(n=4, m=8, transposable=True\) by magnitude "
                                         r"\(transposable masks support m in \(2, 4\), got m=8\).*from_matrix"):
        SparseLinear.from_dense(linear, NM(4, 8, transposable=True))
    mask = hand_built_mask(16, 24, 4, 8, torch.Generator().manual_seed(0))
    layer = SparseLinear.from_matrix(NMMatrix.from_dense(linear.weight.detach(), 4, 8, mask=mask),
                                     linear.bias.detach(), transposable=True)
    assert layer.layout == NM(4, 8, transposable=True)
    x = torch.randn(3, 24, requires_grad=True)
    layer(x).sum().backward()
    assert_close(x.grad, torch.ones(3, 16) @ (linear.weight.detach() * mask), torch.float32, "grad input")
    plain = NMMatrix.from_dense(linear.weight.detach(), 4, 8)
    with pytest.raises(ValueError, match=r"does not fit the layout NM\(n=4, m=8, transposable=True\)"):
        SparseLinear.from_matrix(plain, transposable=True)
    with pytest.raises(ValueError, match="transposable=True needs an NMMatrix"):
        SparseLinear.from_matrix(BlockSparseMatrix.from_dense(torch.randn(32, 32), 16, 0.5), transposable=True)
    with pytest.raises(ValueError, match="out_features=6 must be a multiple of m=4"):
        SparseLinear(8, 6, NM(2, 4, transposable=True))


def test_set_pattern_keeps_buffers_and_refuses_non_transposable_patterns():
    layer = SparseLinear(20, 12, NM(2, 4, transposable=True))
    buffers = (layer.transpose_index, layer.positions_t)
    values_before, positions_before = layer.values.detach().clone(), layer.positions.clone()
    weight = torch.randn(12, 20)
    new_mask = transposable_nm_mask(weight.abs(), 2, 4)
    layer.set_pattern(new_mask, values=weight)
    assert layer.transpose_index is buffers[0] and layer.positions_t is buffers[1]  # in place
    expected = NMMatrix.from_dense(weight, 2, 4, mask=new_mask).transposed_pattern()
    assert torch.equal(layer.transpose_index, expected.transpose_index)
    assert torch.equal(layer.positions_t, expected.positions_t)
    x = torch.randn(4, 20, requires_grad=True)
    layer(x).sum().backward()
    assert_close(x.grad, torch.ones(4, 12) @ (weight * new_mask), torch.float32, "grad input after set_pattern")

    layer = SparseLinear(20, 12, NM(2, 4, transposable=True))
    values_before, positions_before = layer.values.detach().clone(), layer.positions.clone()
    index_before = layer.transpose_index.clone()
    row_only = torch.tensor([[1, 1, 0, 0] * 5] * 12).bool()
    with pytest.raises(ValueError, match=r"does not fit the layout NM\(n=2, m=4, transposable=True\).*"
                                         r"not along out_features"):
        layer.set_pattern(row_only)
    assert torch.equal(layer.values.detach(), values_before) and torch.equal(layer.positions, positions_before)
    assert torch.equal(layer.transpose_index, index_before)


def test_state_dict_round_trip_and_compatibility():
    trained = SparseLinear(20, 12, NM(2, 4, transposable=True))
    state = trained.state_dict()
    assert set(state) == {"values", "bias", "positions"}  # W.T's pattern is derived, not saved
    fresh = SparseLinear(20, 12, NM(2, 4, transposable=True))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.transpose_index, trained.transpose_index)
    assert torch.equal(fresh.positions_t, trained.positions_t)
    x = torch.randn(3, 20, requires_grad=True)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    fresh(x).sum().backward()
    assert_close(x.grad, torch.ones(3, 12) @ trained.dense_weight().detach(), torch.float32, "grad input")
    # The same state dict loads into a plain N:M layer, and a plain layer's transposable pattern loads back.
    plain = SparseLinear(20, 12, NM(2, 4))
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), trained(x), rtol=0, atol=0)
    fresh.load_state_dict(plain.state_dict())
    # A non-transposable pattern is refused, and the layer keeps its previous pattern (and W.T's),
    # so it still computes consistently (values, as for any refused load, may hold the loaded ones).
    before = [tensor.clone() for tensor in (fresh.positions, fresh.transpose_index, fresh.positions_t)]
    with pytest.raises(RuntimeError, match="invalid sparse pattern.*not along out_features"):
        fresh.load_state_dict(SparseLinear(20, 12, NM(2, 4)).state_dict())
    after = (fresh.positions, fresh.transpose_index, fresh.positions_t)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    x.grad = None
    fresh(x).sum().backward()
    assert_close(x.grad, torch.ones(3, 12) @ fresh.dense_weight().detach(), torch.float32, "grad input after refusal")


# ---------------------------------------------------------------------- training toolkit
def test_rigl_and_set_refuse_transposable_layers():
    model = nn.Sequential(SparseLinear(16, 8, NM(2, 4, transposable=True)), SparseLinear(8, 8, NM(2, 4)))
    for tool in (RigL, SET):
        with pytest.raises(ValueError, match=rf"{tool.__name__} does not keep N:M masks transposable.*: 0\. "
                                             r"Exclude them with filter_fn"):
            tool(model, None)
        tool(model, None, filter_fn=lambda layer, fqn: not layer.layout.transposable)


def test_finalize_ste_keeps_transposable_masks():
    model = nn.Sequential(SRSTELinear(16, 8, transposable=True), nn.ReLU(), SRSTELinear(8, 4))
    x = torch.randn(3, 16)
    expected = model(x)
    finalize_ste_(model)
    assert model[0].layout == NM(2, 4, transposable=True) and model[2].layout == NM(2, 4)
    torch.testing.assert_close(model(x), expected)


# ---------------------------------------------------------------------- GPU visit
@pytest.mark.gpu
def test_cuda_grad_input_runs_the_sparse_tensor_core_gemm():
    """On a GPU with the CUDA backend: a 2:4 bf16 input gradient is the CUTLASS 2:4 GEMM on W.T
    ([512, 128]: the sm80 and sm90 kernels' shape rules hold), and matches the dense reference."""
    sk.set_backend("cuda")
    case = transposable_case(2, 4, (128, 512), torch.bfloat16, "cuda")
    matrix = case.matrix
    x = torch.randn(100, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    output = nm_linear_transposable(x, matrix.values, *op_args(matrix))  # values need no gradient
    grad_output = torch.randn_like(output)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        output.backward(grad_output)
        torch.cuda.synchronize()
    names = " ".join(event.key for event in profile.key_averages())
    assert "cutlass" in names and "Sparse" in names, names
    assert_close(x.grad, grad_output.float() @ case.masked.float(), torch.bfloat16, "grad input")


# ---------------------------------------------------------------------- benchmark cell
def test_bench_transposable_cells_run_and_are_correct():
    """The ``2:4T`` layout of the full suite: every op measured on CPU and checked against dense."""
    from bench.cases import Op, build_cases, layout_label, parse_layout
    from bench.implementations import Dense, Sparsekernels
    from bench.results import Status
    from bench.runner import run_cells
    from bench.suites import full
    from bench.timing import TimingConfig

    assert layout_label(NM(2, 4, transposable=True)) == "2:4T"
    assert parse_layout("2:4T") == NM(2, 4, transposable=True) and parse_layout("2:4") == NM(2, 4)
    assert NM(2, 4, transposable=True) in full("cuda").layouts
    cases, misfits = build_cases([(64, 96)], [NM(2, 4, transposable=True)], [torch.float32], [1, 5], list(Op))
    assert not misfits and len(cases) == 2 * len(Op)
    timing = TimingConfig(warmup=0, repeats=2, budget_s=0.01)
    for result in run_cells(cases, [Dense, Sparsekernels], torch.device("cpu"), timing, progress=False):
        assert result.measurements["sparsekernels"].status is Status.OK, result
    assert Sparsekernels(build_weight_for_bench()).transposed is not None


def build_weight_for_bench():
    from bench.workloads import build_weight

    weight = build_weight(64, 96, NM(2, 4, transposable=True), torch.float32, torch.device("cpu"))
    assert is_nm_both_ways(weight.mask, 2, 4)
    return weight
