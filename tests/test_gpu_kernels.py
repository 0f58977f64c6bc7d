"""The Triton kernels on a GPU at the issue's shapes, and torch.compile with Inductor on CUDA.

Every test here needs a CUDA GPU (``gpu`` marker: skipped elsewhere). The interpreter tests
(tests/test_triton*.py) cover the kernels' logic at small shapes; these run the compiled kernels at
the shapes they are built for (weights 4096x4096 and 14336x4096, bfloat16, M = 1, 16 and 2048:
the small-M and the tiled programs, splits of long reductions) and through Inductor's code
generation, which the interpreter cannot reach.

Cost: compilation, not arithmetic. Tuning is off (``triton_backend``: each kernel compiles for its
heuristic configuration only), so the shape tests compile a few dozen kernel variants; the compile
test builds one small model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cases import assert_close, layout_id, skip_without_triton, sparse_linear
from sparsekernels import NM, BlockSparse, BlockSparseMatrix, NMMatrix, SparseLinear, reference

pytestmark = [pytest.mark.gpu, skip_without_triton(), pytest.mark.usefixtures("triton_backend")]

# ------------------------------------------------------------------ issue shapes against the reference
ISSUE_LAYOUTS = [BlockSparse(64, 0.1), BlockSparse(128, 0.5), NM(2, 4)]
ISSUE_WEIGHTS = [(4096, 4096), (14336, 4096)]  # (out_features, in_features)

_matrices: dict = {}


def issue_matrix(layout, features):
    """A random bfloat16 weight of ``layout`` drawn on the GPU (drawing 14336x4096 on the host costs
    seconds), kept for the module: the three M of a shape share it. Block patterns get an empty
    and a full block row, the two ends of the kernels' row schedule."""
    key = (layout_id(layout), features)
    if key not in _matrices:
        out_features, in_features = features
        dense = torch.randn(out_features, in_features, device="cuda").to(torch.bfloat16)
        if isinstance(layout, BlockSparse):
            b = layout.block_size
            block_mask = torch.rand(out_features // b, in_features // b, device="cuda") < layout.density
            block_mask[0], block_mask[1] = False, True
            _matrices[key] = BlockSparseMatrix.from_dense(dense, b, mask=block_mask)
        else:
            scores = torch.rand(out_features, in_features // layout.m, layout.m, device="cuda")
            keep = scores.argsort(dim=-1)[..., : layout.n]
            mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, keep, True)
            _matrices[key] = NMMatrix.from_dense(dense, layout.n, layout.m, mask=mask.reshape(out_features, -1))
    return _matrices[key]


def reference_pass(matrix, input, values, bias, grad_output):
    """Output and gradients (input, values, bias) of sparsekernels.reference in float32."""
    input, values, bias = (tensor.detach().float().requires_grad_() for tensor in (input, values, bias))
    output = sparse_linear(matrix, input, values, bias, ops=reference)
    output.backward(grad_output.float())
    return output.detach(), input.grad, values.grad, bias.grad


def assert_within_rounding(actual, expected, absolute_sum, terms: int, what: str):
    """``|actual - expected| <= 2^-7 |expected| + terms * 2^-22 * absolute_sum`` elementwise.

    ``expected`` is a float32 sum of ``terms`` exact products of bfloat16 numbers, ``absolute_sum``
    the same sum of their absolute values. The kernel sums the same products in float32 in another
    order and rounds once to bfloat16: the rounding is at most 2^-8 |result| (bfloat16's unit
    roundoff; bound: twice that, which also covers truncation, as the Triton interpreter does), and
    each float32 summation differs from the exact sum by at most terms * 2^-24 * absolute_sum
    (bound: 4x that for the two summations, with room for tensor cores that truncate). So the
    tolerance grows with the reduction length, as a fixed relative one cannot at K = 4096."""
    bound = 2.0**-7 * expected.abs() + terms * 2.0**-22 * absolute_sum
    excess = (actual.float() - expected).abs() - bound
    if not bool((excess <= 0).all()):  # NaN fails too
        worst = int(torch.nan_to_num(excess, nan=float("inf")).argmax())
        raise AssertionError(
            f"{what}: {int((~(excess <= 0)).sum())} of {excess.numel()} elements out of bound; the worst is "
            f"{actual.flatten()[worst].item():.6g}, expected {expected.flatten()[worst].item():.6g} "
            f"+- {bound.flatten()[worst].item():.3g}"
        )


@pytest.mark.parametrize("rows", [1, 16, 2048])
@pytest.mark.parametrize("layout", ISSUE_LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("features", ISSUE_WEIGHTS, ids=lambda features: "x".join(map(str, features)))
def test_issue_shapes_forward_and_backward_match_reference(features, layout, rows, monkeypatch):
    from sparsekernels.triton import dispatch

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # a float32 reference
    out_features, in_features = features
    matrix = issue_matrix(layout, features)
    input = torch.randn(rows, in_features, device="cuda").to(torch.bfloat16).requires_grad_()
    values = matrix.values.detach().clone().requires_grad_()
    bias = torch.randn(out_features, device="cuda").to(torch.bfloat16).requires_grad_()
    grad_output = torch.randn(rows, out_features, device="cuda").to(torch.bfloat16)

    output = sparse_linear(matrix, input, values, bias)  # backend triton, dense fallback off
    assert dispatch.last_path() == "sparse"
    output.backward(grad_output)
    actual = (output, input.grad, values.grad, bias.grad)

    expected = reference_pass(matrix, input, values, bias, grad_output)
    absolute = reference_pass(matrix, input.abs(), values.abs(), bias.abs(), grad_output.abs())
    for name, terms, got, want, absolute_sum in zip(
        ("output", "grad input", "grad values", "grad bias"),
        (in_features, out_features, rows, rows),
        actual, expected, absolute,
    ):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, name
        assert_within_rounding(got, want, absolute_sum, terms, name)


# ------------------------------------------------------------------ torch.compile with Inductor
def compile_model():
    """A small model with a block-sparse and a 2:4 layer (float32: eager and compiled runs of the
    same kernels then agree closely), and an input of 64 rows (the tiled N:M forward)."""
    model = nn.Sequential(
        SparseLinear(256, 512, BlockSparse(64, 0.25)), nn.GELU(), SparseLinear(512, 256, NM(2, 4)), nn.LayerNorm(256)
    ).cuda()
    return model, torch.randn(4, 16, 256, device="cuda", requires_grad=True)


def forward_backward(model, input):
    """Output, and the gradients of input and of every parameter, after one backward."""
    input.grad = None
    model.zero_grad(set_to_none=True)
    output = model(input)
    output.square().mean().backward()
    return [output.detach(), input.grad] + [parameter.grad for parameter in model.parameters()]


def test_torch_compile_inductor_fullgraph_runs_the_triton_kernels(monkeypatch):
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, input = compile_model()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: model(x).square().mean())(input)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    expected = forward_backward(model, input)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # the default backend: Inductor
    with torch._inductor.config.patch(force_disable_caches=True):  # a cache hit could skip code generation
        actual, code = run_and_get_code(forward_backward, compiled, input)
    for index, (got, want) in enumerate(zip(actual, expected)):
        assert_close(got, want, torch.float32, f"compiled vs eager, tensor {index}")
    # Inductor inlines the user kernels of the triton_ops into its generated code, by their names:
    # the forward and both backward kernels of each layout.
    code = "\n".join(code)
    for kernel in ("_bsr_forward_kernel", "_bsr_grad_input_kernel", "_bsr_grad_values_kernel",
                   "_nm_forward_kernel", "_nm_grad_input_kernel", "_nm_grad_values_kernel"):
        assert kernel in code, f"{kernel} is not in Inductor's generated code"
