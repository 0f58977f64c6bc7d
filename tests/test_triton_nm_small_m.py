"""The small-M N:M forward (sparsekernels/triton/nm_forward_small_m.py): at most 16 rows, no tl.dot.

Expectations come from a dense float32 weight and mask drawn first (tests/cases.py) and the kept-only
reference (``sparsekernels.reference.kept_only_linear``), which sums kept terms only, so that NaN and
Inf inputs have one right answer. Under the Triton interpreter (no GPU) the kernel runs on CPU
tensors; TRITON_INTERPRET is set before the kernel modules are first imported (``triton_device()``,
tests/cases.py), as in test_triton.py.
"""

from __future__ import annotations

import pytest
import torch

import sparsekernels as sk
from cases import (
    TOLERANCE,
    KeyRecorder,
    SparseCase,
    assert_close,
    check_op_against_dense,
    layout_id,
    make_case,
    random_mask,
    skip_without_triton,
    sparse_linear,
    triton_device,
)
from sparsekernels import NM, NMMatrix, SparseLinear, reference
from test_triton import narrowest_tiles

DEVICE = triton_device()

# Every N:M pattern the layouts accept (layouts.NM: m in 2, 4, 8, 16 and 1 <= n < m).
ALL_PATTERNS = [(n, m) for m in (2, 4, 8, 16) for n in range(1, m)]
# One per offset width (1, 2 and 4 bits), odd n, and m=16 (two offsets per byte).
SOME_PATTERNS = [(1, 2), (2, 4), (3, 8), (5, 16)]
ROWS = [1, 2, 7, 16]
OUT_FEATURES = 37  # not a multiple of any output tile

pytestmark = [skip_without_triton(), pytest.mark.usefixtures("triton_backend")]


def small_m():
    from sparsekernels.triton import nm_forward_small_m

    return nm_forward_small_m


class LaunchRecorder:
    """Wraps ``launch`` of the small-M module: records (kernel name, grid), then launches."""

    def __init__(self, launch):
        self.launch, self.calls = launch, []

    def __call__(self, kernel, grid, *args, **kwargs):
        self.calls.append((kernel.__name__, grid))
        self.launch(kernel, grid, *args, **kwargs)

    def grids(self, name: str) -> list:
        return [grid for kernel, grid in self.calls if kernel == name]


@pytest.fixture
def launches(monkeypatch):
    module = small_m()
    recorder = LaunchRecorder(module.launch)
    monkeypatch.setattr(module, "launch", recorder)
    return recorder


@pytest.fixture
def many_programs_wanted():
    """The device wants a huge grid: narrowest output tiles, then split-K (under the interpreter
    ``target_programs`` is 1, so the split is otherwise never taken)."""
    with narrowest_tiles():
        yield


def nm_case(pattern, dtype, in_groups=13, out_features=OUT_FEATURES, mask=None) -> SparseCase:
    """A random ``[out_features, in_groups * m]`` N:M weight (random mask unless one is given)."""
    n, m = pattern
    if mask is None:
        return make_case(NM(n, m), dtype, DEVICE, features=(out_features, in_groups * m))
    dense = torch.randn(mask.shape).to(dtype)
    matrix = NMMatrix.from_dense(dense, n, m, mask=mask)
    return SparseCase(matrix.to(DEVICE), dense.to(DEVICE), mask.to(DEVICE))


def expected_output(case, input, bias=None):
    """Kept-only float32 product of the masked dense weight (+ bias), float32."""
    return reference.kept_only_linear(input.float(), case.masked.float(), case.mask,
                                      None if bias is None else bias.float())


def run_forward(case, input, bias=None):
    matrix = case.matrix
    return sk.ops.nm_linear(input, matrix.values, matrix.positions, matrix.n, matrix.m, bias)


# ------------------------------------------------------------------------------ forward vs reference
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("pattern", ALL_PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
def test_every_pattern_matches_reference(pattern, with_bias, launches):
    """Every n:m, rows 1/2/7/16, 37 outputs and 13 groups (tails along both axes), float32."""
    case = nm_case(pattern, torch.float32)
    bias = torch.randn(OUT_FEATURES, device=DEVICE) if with_bias else None
    for rows in ROWS:
        input = torch.randn(rows, case.dense.shape[1], device=DEVICE)
        output = run_forward(case, input, bias)
        assert output.shape == (rows, OUT_FEATURES) and output.dtype == torch.float32
        assert_close(output, expected_output(case, input, bias), torch.float32, f"rows={rows}")
    assert len(launches.grids("_nm_forward_small_m_kernel")) == len(ROWS)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", SOME_PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
def test_dtypes_forward_and_backward(pattern, dtype, rows, with_bias):
    """Forward (this kernel) and both gradients (the unchanged backward ops) against dense float32."""
    case = nm_case(pattern, dtype)
    check_op_against_dense(
        case, lambda input, values, bias: sparse_linear(case.matrix, input, values, bias), dtype, (rows,), with_bias,
        DEVICE,
    )


def strided_input(kind: str, rows: int, in_features: int, dtype):
    if kind == "every-other-column":
        return torch.randn(rows, 2 * in_features, device=DEVICE).to(dtype)[:, ::2]
    if kind == "transposed":  # column-major: stride (1, rows)
        return torch.randn(in_features, rows, device=DEVICE).to(dtype).t()
    if kind == "broadcast-rows":  # stride 0 along the rows
        return torch.randn(1, in_features, device=DEVICE).to(dtype).expand(rows, in_features)
    if kind == "3d-noncontiguous":  # 2 x 5 rows, every other column
        return torch.randn(2, 5, 2 * in_features, device=DEVICE).to(dtype)[..., ::2]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["every-other-column", "transposed", "broadcast-rows", "3d-noncontiguous"])
@pytest.mark.parametrize("pattern", [(2, 4), (5, 16)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_strided_inputs(pattern, kind, launches):
    case = nm_case(pattern, torch.float16)
    input = strided_input(kind, 7, case.dense.shape[1], torch.float16)
    assert not input.is_contiguous()
    bias = torch.randn(OUT_FEATURES, device=DEVICE).half()
    output = run_forward(case, input, bias)
    assert output.shape == (*input.shape[:-1], OUT_FEATURES)
    assert_close(output, expected_output(case, input, bias), torch.float16, kind)
    assert launches.grids("_nm_forward_small_m_kernel")  # 3-D: 10 flattened rows, still small


def test_single_group_and_single_output():
    """The smallest weights: one output feature, one group of m."""
    for pattern in [(1, 2), (3, 4), (9, 16)]:
        case = nm_case(pattern, torch.float32, in_groups=1, out_features=1)
        input = torch.randn(3, pattern[1], device=DEVICE)
        assert_close(run_forward(case, input), expected_output(case, input), torch.float32, str(pattern))


# ------------------------------------------------------------------------------ split-K
def split_groups(pattern, rows):
    """Groups of a weight whose kept dimension has at least 6 chunks (3 splits) under the narrowest
    output tile (16) at ``rows``, cut at an odd group count."""
    from sparsekernels.triton.autotune import m_bucket

    block_kept = small_m().kept_block(m_bucket(rows), 16, 4)
    return (6 * block_kept) // pattern[0] + 1


def split_case(pattern, dtype, rows):
    return nm_case(pattern, dtype, in_groups=split_groups(pattern, rows))


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", SOME_PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
def test_forced_split_k(pattern, dtype, rows, with_bias, many_programs_wanted, launches):
    """Split-K: float32 partials summed in a fixed order with the bias, one rounding; deterministic."""
    case = split_case(pattern, dtype, rows)
    input = torch.randn(rows, case.dense.shape[1], device=DEVICE).to(dtype)
    bias = torch.randn(OUT_FEATURES, device=DEVICE).to(dtype) if with_bias else None
    output = run_forward(case, input, bias)
    (grid,) = launches.grids("_nm_forward_small_m_kernel")
    assert grid[1] > 1, f"expected a split, got grid {grid}"
    assert len(launches.grids("_sum_splits_kernel")) == 1
    assert_close(output, expected_output(case, input, bias), dtype, f"{grid[1]} splits")
    again = run_forward(case, input, bias)
    assert torch.equal(again, output)  # bitwise: no atomics, fixed summation order


def test_split_count_rules():
    module = small_m()
    device = torch.device(DEVICE)
    with narrowest_tiles():  # the device wants more programs than any grid has
        assert module.split_count(3, 1000, 128, device) == 8 // module.MIN_CHUNKS_PER_SPLIT  # 8 chunks
        assert module.split_count(3, 100, 128, device) == 1  # one chunk: nothing to split
        assert module.split_count(3, 10**6, 8, device) == module.MAX_SPLITS
    if DEVICE == "cpu":  # the interpreter wants one program: never split
        assert module.split_count(1, 10**6, 8, device) == 1


# ------------------------------------------------------------------------------ NaN / Inf
def mask_dropping(pattern, out_features, in_groups, group, offset):
    """A random N:M mask in which column ``group * m + offset`` is dropped in every output row."""
    n, m = pattern
    mask = random_mask(NM(n, m), out_features, in_groups * m).reshape(out_features, in_groups, m)
    others = torch.tensor([o for o in range(m) if o != offset])
    for row in range(out_features):
        keep = others[torch.randperm(m - 1)[:n]]
        mask[row, group] = False
        mask[row, group, keep] = True
    return mask.reshape(out_features, in_groups * m)


@pytest.mark.parametrize("split", [False, True], ids=["one-split", "split-k"])
@pytest.mark.parametrize("rows", [1, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", SOME_PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
def test_nan_and_inf_at_dropped_inputs_do_not_reach_the_output(pattern, dtype, rows, split):
    """A dropped weight is absent, not 0 * NaN: NaN/Inf in a column every output drops changes nothing."""
    n, m = pattern
    groups = split_groups(pattern, rows) if split else 13
    group, offset = 2, 1
    mask = mask_dropping(pattern, OUT_FEATURES, groups, group, offset)
    case = nm_case(pattern, dtype, mask=mask)
    dropped = group * m + offset
    assert not case.mask[:, dropped].any()
    input = torch.randn(rows, groups * m, device=DEVICE).to(dtype)
    input[0, dropped] = float("nan")
    input[-1, dropped] = float("inf")
    input[rows // 2, dropped] = float("-inf")
    with narrowest_tiles(split):
        output = run_forward(case, input)
    assert torch.isfinite(output).all()
    assert_close(output, expected_output(case, input), dtype, "dropped non-finite inputs")


@pytest.mark.parametrize("rows", [1, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", SOME_PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
def test_nan_at_a_kept_input_propagates(pattern, dtype, rows):
    """A NaN in a column reaches exactly the outputs that keep that column, in its row only; an Inf
    in another row gives the same classes (NaN / +-Inf) as the kept-only reference."""
    case = nm_case(pattern, dtype)
    column = 2 * pattern[1] + 1
    keeps = case.mask[:, column]
    assert keeps.any() and not keeps.all()
    input = torch.randn(rows, case.dense.shape[1], device=DEVICE).to(dtype)
    input[0, column] = float("nan")
    if rows > 1:
        input[-1, column] = float("inf")
    output = run_forward(case, input)
    assert torch.equal(torch.isnan(output[0]), keeps)
    expected = expected_output(case, input)
    assert torch.equal(torch.isnan(output), torch.isnan(expected))
    assert torch.equal(torch.isinf(output), torch.isinf(expected))
    finite = torch.isfinite(expected)
    tolerance = TOLERANCE[dtype] * max(expected[finite].abs().max().item(), 1.0)
    torch.testing.assert_close(output.float()[finite], expected[finite], atol=tolerance, rtol=TOLERANCE[dtype])


# ------------------------------------------------------------------------------ dispatch and tuning
@pytest.mark.parametrize("rows, small", [(0, True), (1, True), (16, True), (17, False), (40, False)])
def test_rows_up_to_16_take_the_small_m_kernel(rows, small, launches):
    case = nm_case((2, 4), torch.float32)
    input = torch.randn(rows, case.dense.shape[1], device=DEVICE)
    output = run_forward(case, input)
    assert_close(output, expected_output(case, input), torch.float32, f"rows={rows}")
    # rows=0: the empty output is returned before any kernel is planned or launched.
    assert bool(launches.grids("_nm_forward_small_m_kernel")) == (small and rows > 0)
    called = []
    module = small_m()
    original = module.plan_nm_forward_small_m
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "plan_nm_forward_small_m", lambda *args: called.append(1) or original(*args))
        run_forward(case, input)
    assert bool(called) == (small and rows > 0)


def test_tuning_key(monkeypatch):
    """Its own kernel name; rows in one power-of-two bucket share a key."""
    from sparsekernels.triton import autotune

    recorder = KeyRecorder()
    monkeypatch.setattr(autotune, "tuner", recorder)
    case = nm_case((2, 4), torch.float16)
    for rows in (5, 8, 1):
        run_forward(case, torch.randn(rows, case.dense.shape[1], device=DEVICE).half())
    key = ("nm_forward_small_m", 8, OUT_FEATURES, case.dense.shape[1], "2:4", 0.5, "torch.float16")
    assert recorder.keys == [key, key, ("nm_forward_small_m", 1, *key[2:])]


class Forced:
    """A tuner that returns the candidate at ``index``."""

    def __init__(self, index):
        self.index, self.count = index, 0

    def choose(self, key, device, tensors, heuristic, candidates, run):
        options = candidates()
        self.count = len(options)
        return options[self.index % len(options)]


@pytest.mark.parametrize("narrow", [False, True], ids=["one-split", "split-k"])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("index", range(6))
def test_every_tuning_candidate_matches_reference(index, rows, narrow, monkeypatch):
    from sparsekernels.triton import autotune

    forced = Forced(index)
    with narrowest_tiles(narrow):
        monkeypatch.setattr(autotune, "tuner", forced)
        case = split_case((3, 8), torch.float32, rows) if narrow else nm_case((3, 8), torch.float32, out_features=300)
        input = torch.randn(rows, case.dense.shape[1], device=DEVICE)
        bias = torch.randn(case.dense.shape[0], device=DEVICE)
        assert_close(run_forward(case, input, bias), expected_output(case, input, bias), torch.float32, "candidate")
    assert forced.count >= 3


@pytest.mark.parametrize("wanted", [1, 10**9], ids=["wide", "narrow"])
def test_configurations_keep_the_product_tile_bounded(wanted, monkeypatch):
    """Heuristic and candidates, every row bucket: whole position bytes per chunk, and at most twice
    the per-thread product budget (more spilled registers when compiled)."""
    from sparsekernels.triton import _common

    module = small_m()
    monkeypatch.setattr(_common, "target_programs", lambda device: wanted)
    for rows_padded in (1, 2, 4, 8, 16):
        for out_features in (20, 37, 4096, 10**5):
            candidates = module.small_m_candidates(rows_padded, out_features)
            assert 2 <= len(candidates) <= 6
            heuristic = module.heuristic_config(rows_padded, out_features, torch.device(DEVICE))
            for config in [heuristic, *candidates]:
                block_kept = module.kept_block(rows_padded, config.tile, config.num_warps)
                assert block_kept % 8 == 0 and config.block_rows == rows_padded
                products = rows_padded * config.tile * block_kept
                assert products <= 2 * module.PRODUCTS_PER_THREAD * 32 * config.num_warps, config


# ------------------------------------------------------------------------------ SparseLinear at M=1
@pytest.mark.parametrize("leading", [(1,), (1, 1)], ids=["1", "1x1"])
@pytest.mark.parametrize("layout", [NM(2, 4), NM(5, 16)], ids=layout_id)
def test_sparse_linear_decode_step_agrees_with_cpu_kernels(layout, leading, launches):
    """One token through SparseLinear (N:M, float16): the Triton backend, forward through the small-M
    kernel, matches the C++ CPU kernels in output and gradients."""
    layer = SparseLinear(160, 96, layout, dtype=torch.float16)
    input = torch.randn(*leading, 160, dtype=torch.float16)
    sk.set_backend("cpu")
    expected_output_ = layer(input)
    expected_output_.float().square().sum().backward()
    expected = [expected_output_.detach(), layer.values.grad.clone(), layer.bias.grad.clone()]
    sk.set_backend("triton")
    layer = layer.to(DEVICE)
    layer.zero_grad()
    output = layer(input.to(DEVICE))
    output.float().square().sum().backward()
    assert launches.grids("_nm_forward_small_m_kernel")
    for actual, wanted, what in zip((output.detach(), layer.values.grad, layer.bias.grad), expected,
                                    ("output", "values", "bias")):
        assert_close(actual.cpu(), wanted, torch.float16, what)
