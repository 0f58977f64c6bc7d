"""The eager inference fast path of SparseLinear on the Triton backend (sparsekernels/triton/eager.py).

It must give the op's result, be taken only for plain eager inference, and leave every other case
(autograd, tracing, modes, profiler, bad input) to the op. Which path ran is observed by counting
calls of the launchers as the op (triton/ops.py) reaches them and of the fast path's entry points
(triton/eager.py); the fast path's launch plans, by counting the plans it builds.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from cases import OpRecorder, assert_close, layout_id, skip_without_triton, triton_device
from sparsekernels import NM, BlockSparse, SparseLinear

DEVICE = triton_device()
LAYOUTS = [BlockSparse(16, 0.5), NM(2, 4)]

pytestmark = [skip_without_triton(), pytest.mark.usefixtures("triton_backend")]


@pytest.fixture(autouse=True)
def _fast_path_not_disabled(monkeypatch):
    monkeypatch.delenv("SPARSEKERNELS_EAGER_FAST_PATH", raising=False)


def _count_calls(monkeypatch, module, name: str, counts: dict, key: str) -> None:
    function = getattr(module, name)

    def counted(*args, **kwargs):
        counts[key] += 1
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.fixture
def paths(monkeypatch):
    """Counts forwards by path: ``{"op": n, "fast": n}`` (the op's launcher calls, the fast path's
    entry points in eager.py)."""
    from sparsekernels.triton import eager, ops

    counts = {"op": 0, "fast": 0}
    for name in ("bsr_forward", "nm_forward"):
        _count_calls(monkeypatch, ops, name, counts, "op")
    for name in ("bsr_linear", "nm_linear"):
        _count_calls(monkeypatch, eager, name, counts, "fast")
    return counts


@pytest.fixture
def plan_builds(monkeypatch):
    """Counts launch plans built by the fast path: ``{"built": n}``."""
    from sparsekernels.triton import eager

    counts = {"built": 0}
    for name in ("plan_bsr_forward", "plan_nm_forward"):
        _count_calls(monkeypatch, eager, name, counts, "built")
    return counts


@contextmanager
def fast_path_off():
    previous = os.environ.get("SPARSEKERNELS_EAGER_FAST_PATH")
    os.environ["SPARSEKERNELS_EAGER_FAST_PATH"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["SPARSEKERNELS_EAGER_FAST_PATH"]
        else:
            os.environ["SPARSEKERNELS_EAGER_FAST_PATH"] = previous


def _op_result(layer, input):
    """The op path's output (the fast path switched off; grad mode on, values requires grad)."""
    with fast_path_off(), torch.enable_grad():
        return layer(input).detach()


def make_layer(layout, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    return SparseLinear(64, 48, layout, bias=bias, dtype=dtype).to(DEVICE)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (2, 3, 64), (0, 64)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS + [NM(2, 4, transposable=True)], ids=layout_id)
def test_fast_path_matches_the_op(layout, shape, dtype, bias, paths):
    layer = make_layer(layout, dtype, bias)
    input = torch.randn(shape, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        fast = layer(input)
    assert paths == {"op": 0, "fast": 1 if input.numel() else paths["fast"]}
    expected = F.linear(input, layer.dense_weight(), layer.bias)
    assert fast.shape == expected.shape
    assert_close(fast, expected, dtype, "output")
    through_op = _op_result(layer, input)
    assert paths["op"] == 1
    torch.testing.assert_close(fast, through_op, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_inference_mode_and_frozen_weights_take_the_fast_path(layout, paths):
    layer = make_layer(layout)
    input = torch.randn(5, 64, device=DEVICE)
    with torch.inference_mode():
        layer(input)
    layer.requires_grad_(False)
    layer(input)  # grad mode on, but nothing requires grad
    assert paths == {"op": 0, "fast": 2}


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_training_takes_the_autograd_fast_path(layout, paths):
    """With grad mode on and an operand requiring grad, the fast path runs the kept plan inside the
    op's own autograd formulas (tests below compare the gradients with the op path's)."""
    layer = make_layer(layout)
    input = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    layer(input).sum().backward()
    layer.requires_grad_(False)
    layer(input)  # only the input requires grad
    assert paths["fast"] == 2 and paths["op"] == 0
    assert input.grad is not None and layer.values.grad is not None


def test_training_a_transposable_layer_runs_its_ops_backward(paths):
    """A transposable layer's op has nm_linear's forward and its own backward (the input gradient
    is the N:M forward on W.T's pattern, through the op: counted as "op")."""
    layer = make_layer(NM(2, 4, transposable=True))
    input = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    layer(input).sum().backward()
    with torch.no_grad():
        layer(input)
    assert paths == {"op": 1, "fast": 2}
    assert input.grad is not None and layer.values.grad is not None


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_dispatch_modes_profiler_and_switch_see_the_op(layout, paths, monkeypatch):
    layer = make_layer(layout)
    input = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        with OpRecorder() as recorder:
            layer(input)
        assert any("sparsekernels_triton" in name for name in recorder.names), recorder.names
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            layer(input)
        assert any("sparsekernels_triton" in event.name for event in profile.events())
        monkeypatch.setenv("SPARSEKERNELS_EAGER_FAST_PATH", "0")
        layer(input)
    assert paths == {"op": 3, "fast": 0}


def test_subclass_input_takes_the_op(paths):
    class Tagged(torch.Tensor):
        pass

    layer = make_layer(NM(2, 4))
    input = torch.randn(3, 64, device=DEVICE).as_subclass(Tagged)
    with torch.no_grad():
        layer(input)
    assert paths == {"op": 1, "fast": 0}


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_bad_input_gets_the_op_errors(layout, paths):
    layer = make_layer(layout)
    with torch.no_grad():
        with pytest.raises(TypeError, match="same dtype"):
            layer(torch.randn(3, 64, dtype=torch.float16, device=DEVICE))
        with pytest.raises(ValueError, match=r"input.shape\[-1\] must equal in_features=64"):
            layer(torch.randn(3, 63, device=DEVICE))
        with pytest.raises(ValueError, match=r"input.shape\[-1\] must equal in_features=64"):
            layer(torch.tensor(1.0, device=DEVICE))
    assert paths["fast"] == 0


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_compile_traces_the_op(layout):
    torch._dynamo.reset()
    layer = make_layer(layout)
    input = torch.randn(4, 64, device=DEVICE)
    with torch.no_grad():
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert_close(compiled(input), layer(input), torch.float32, "output")


def test_pattern_update_is_seen(paths):
    """The fast path reads the layer's current tensors: a new pattern takes effect at once."""
    layer = make_layer(BlockSparse(16, 0.5))
    input = torch.randn(4, 64, device=DEVICE)
    other = make_layer(BlockSparse(16, 0.25))
    torch.manual_seed(1)
    with torch.no_grad():
        before = layer(input)
        layer.set_pattern(other.matrix)
        after = layer(input)
    assert not torch.equal(before, after)
    assert_close(after, F.linear(input, layer.dense_weight(), layer.bias), torch.float32, "output")
    assert paths["fast"] == 2


def test_layer_tensors_are_checked_once_and_again_when_replaced(paths, plan_builds, monkeypatch):
    """The fast path runs the op's metadata checks on the layer's own tensors when it builds a plan:
    once, and again when one of them is a new object; a bad replacement gets the op's error before
    any plan or launch."""
    from sparsekernels.triton import eager

    calls = []
    check = eager.bsr_features
    monkeypatch.setattr(eager, "bsr_features", lambda *args: calls.append(1) or check(*args))
    layer = make_layer(BlockSparse(16, 0.5))
    input = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        layer(input)
        layer(input)
        assert len(calls) == 1
        layer.block_col_indices = layer.block_col_indices.clone()  # same metadata, new object
        layer(input)
        assert len(calls) == 2 and paths == {"op": 0, "fast": 3} and plan_builds["built"] == 2
        layer.block_col_indices = layer.block_col_indices.long()  # no longer the offsets' dtype
        with pytest.raises(TypeError, match="block_col_indices must have the dtype of block_row_offsets"):
            layer(input)
    assert plan_builds["built"] == 2 and paths["op"] == 0


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_a_weight_reshaped_through_data_gets_the_op_error(layout, plan_builds):
    """``.data`` keeps the Parameter object; a values tensor of another shape is a new plan key, and
    building that plan runs the op's checks: the op's error, not a launch with a stale size."""
    layer = make_layer(layout)
    input = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        layer(input)
        layer.values.data = layer.values.data[:-1].clone()  # one block / output row fewer
        with pytest.raises(ValueError):
            layer(input)
    assert plan_builds["built"] == 1


def _errors_of_both_paths(layer, input, monkeypatch) -> tuple:
    """(fast path's error, op path's error) of ``layer(input)`` under no_grad, as (type, message)."""
    errors = []
    for fast in ("1", "0"):
        monkeypatch.setenv("SPARSEKERNELS_EAGER_FAST_PATH", fast)
        with torch.no_grad(), pytest.raises((TypeError, ValueError)) as raised:
            layer(input)
        errors.append((type(raised.value), str(raised.value)))
    monkeypatch.delenv("SPARSEKERNELS_EAGER_FAST_PATH")
    return tuple(errors)


def _change_bias_dtype(layer):
    layer.bias.data = layer.bias.data.double()


def _change_bias_shape(layer):
    layer.bias.data = torch.randn(47, device=DEVICE)  # 48 outputs: the block kernel loads bias unmasked


def _change_index_dtype(layer):
    if isinstance(layer.layout, BlockSparse):
        layer.block_col_indices.data = layer.block_col_indices.data.long()
    else:
        layer.positions.data = layer.positions.data.int()


def _change_index_shape(layer):
    if isinstance(layer.layout, BlockSparse):
        layer.block_value_indices.data = layer.block_value_indices.data[:-1].clone()  # read by the op's checks only
    else:
        layer.positions.data = layer.positions.data[:-1].clone()


def _change_index_device(layer):
    if DEVICE != "cuda":  # set_data takes no CPU <-> meta change: a second device needs a GPU
        pytest.skip("needs a CUDA GPU (a CPU index on a CUDA layer)")
    name = "block_row_offsets" if isinstance(layer.layout, BlockSparse) else "positions"
    getattr(layer, name).data = getattr(layer, name).data.cpu()


@pytest.mark.parametrize("change", [_change_bias_dtype, _change_bias_shape, _change_index_dtype, _change_index_shape,
                                    _change_index_device], ids=lambda change: change.__name__[len("_change_"):])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_a_bias_or_index_changed_through_data_gets_the_op_error(layout, change, paths, plan_builds, monkeypatch):
    """``.data =`` keeps the tensor object but may change its dtype, shape or device: a kept plan
    must not launch with them (a stale size reads past the end), the op's error must come instead."""
    layer = make_layer(layout)
    input = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        layer(input)  # a plan is kept
    change(layer)
    fast_error, op_error = _errors_of_both_paths(layer, input, monkeypatch)
    assert fast_error == op_error
    assert plan_builds["built"] == 1 and paths["fast"] == 2


@pytest.mark.parametrize("name", ["values", "bias"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_a_weight_made_non_contiguous_through_data_is_not_launched_as_contiguous(layout, name, plan_builds):
    """Kept plans pass the weights as they are, planned for contiguous ones: a strided tensor of
    the same shape and dtype, set through ``.data``, must give the op's result."""
    layer = make_layer(layout)
    input = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        layer(input)
        tensor = getattr(layer, name)
        strided = torch.stack([tensor.data, torch.full_like(tensor.data, float("nan"))], dim=-1)[..., 0]
        assert not strided.is_contiguous() and strided.shape == tensor.shape
        tensor.data = strided
        output = layer(input)
    torch.testing.assert_close(output, _op_result(layer, input), rtol=0, atol=0)
    assert plan_builds["built"] == 1  # the strided layer is not planned: the launcher copies it


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_replaced_bias_of_another_dtype_gets_the_op_error(layout, paths, plan_builds):
    layer = make_layer(layout)
    with torch.no_grad():
        layer.bias = torch.nn.Parameter(layer.bias.half())
        with pytest.raises(TypeError, match="same dtype"):
            layer(torch.randn(3, 64, device=DEVICE))
        assert plan_builds["built"] == 0  # the check comes before any plan
        layer.bias = None
        output = layer(torch.randn(3, 64, device=DEVICE))
    assert output.shape == (3, 48) and plan_builds["built"] == 1 and paths["op"] == 0


# ---------------------------------------------------------------------------------- launch plans
# The fast path keeps, per layer and input signature, a launch plan: every host decision of the
# launcher taken once. A kept plan must give the launcher's result bitwise, and must be rebuilt
# whenever a decision in it could change (tests below); paths["fast"] counts forwards, plan_builds
# counts plans built.


@pytest.mark.parametrize("layout", LAYOUTS + [NM(2, 4, transposable=True), NM(1, 4)], ids=layout_id)
@pytest.mark.parametrize("shape", [(1, 64), (17, 64), (2, 3, 64), (64,)], ids=str)
def test_a_kept_plan_gives_the_launchers_result(layout, shape, paths, plan_builds):
    layer = make_layer(layout)
    input = torch.randn(shape, device=DEVICE)
    with torch.no_grad():
        first, second, third = layer(input), layer(input), layer(input.clone())
    assert plan_builds["built"] == 1 and paths["fast"] == 3
    expected = _op_result(layer, input)
    for output in (first, second, third):
        assert output.shape == expected.shape
        torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_plans_are_kept_per_input_signature(plan_builds):
    layer = make_layer(NM(2, 4))
    inputs = [torch.randn(5, 64, device=DEVICE), torch.randn(6, 64, device=DEVICE),
              torch.randn(5, 64, device=DEVICE).half(), torch.randn(64, 5, device=DEVICE).t()]
    with torch.no_grad():
        for input in inputs:  # 5 rows, 6 rows, float16 (op path: dtype differs), transposed strides
            if input.dtype == torch.float32:
                layer(input)
        for input in inputs:
            if input.dtype == torch.float32:
                torch.testing.assert_close(layer(input), _op_result(layer, input), rtol=0, atol=0)
    assert plan_builds["built"] == 3


def test_a_dtype_change_of_the_layer_builds_a_new_plan(plan_builds):
    """``.half()`` keeps the Parameter objects (their ``.data`` is swapped) and the integer index
    buffers: same tensor ids, so the dtype is part of the plan key."""
    layer = make_layer(BlockSparse(16, 0.5))
    input = torch.randn(4, 64, device=DEVICE)
    with torch.no_grad():
        layer(input)
        layer.half()
        output = layer(input.half())
    assert plan_builds["built"] == 2
    assert output.dtype == torch.float16
    torch.testing.assert_close(output, _op_result(layer, input.half()), rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_a_pattern_change_in_place_builds_a_new_plan(layout, plan_builds):
    """set_pattern with the same number of kept weights rewrites the index in place (same objects):
    the block kernels' program order is of the old pattern, so the plan is rebuilt (its stamp holds
    the offsets' version)."""
    layer = make_layer(layout)
    input = torch.randn(4, 64, device=DEVICE)
    torch.manual_seed(3)
    mask = layer.matrix.block_mask() if isinstance(layout, BlockSparse) else layer.dense_mask()
    new_mask = mask[torch.randperm(mask.shape[0])]  # (block) rows permuted: the same count kept
    with torch.no_grad():
        layer(input)
        layer.set_pattern(new_mask)
        after = layer(input)
        layer(input)
    assert plan_builds["built"] == (2 if isinstance(layout, BlockSparse) else 1)
    torch.testing.assert_close(after, _op_result(layer, input), rtol=0, atol=0)


def test_tuner_changes_and_settings_rebuild_the_plan(plan_builds, monkeypatch, tmp_path):
    from sparsekernels.triton import autotune

    monkeypatch.setattr(autotune, "tuner", autotune.Tuner(path=tmp_path / "first.json"))  # on a GPU it tunes
    layer = make_layer(NM(2, 4))
    input = torch.randn(4, 64, device=DEVICE)
    with torch.no_grad():
        layer(input)
        layer(input)
        assert plan_builds["built"] == 1
        autotune.tuner.clear_memory()  # the tuner's answers may differ now
        layer(input)
        assert plan_builds["built"] == 2
        monkeypatch.setenv("SPARSEKERNELS_AUTOTUNE", "1")  # the fixture set 0
        layer(input)
        assert plan_builds["built"] == 3
        monkeypatch.setattr(autotune, "tuner", autotune.Tuner(path=tmp_path / "second.json"))
        layer(input)
        layer(input)
        assert plan_builds["built"] == 4


def test_a_tuner_stand_in_without_generation_keeps_no_plan(plan_builds, monkeypatch):
    from cases import HeuristicOnly

    from sparsekernels.triton import autotune

    monkeypatch.setattr(autotune, "tuner", HeuristicOnly())
    layer = make_layer(BlockSparse(16, 0.5))
    input = torch.randn(4, 64, device=DEVICE)
    with torch.no_grad():
        outputs = [layer(input) for _ in range(3)]
    assert plan_builds["built"] == 3
    for output in outputs:
        torch.testing.assert_close(output, _op_result(layer, input), rtol=0, atol=0)


def test_a_tuned_configuration_is_planned_once(plan_builds, monkeypatch, tmp_path):
    """With a tuner that stores its choice (timing stubbed), the first call tunes, the plan is
    built after the store (its generation is the new one) and kept."""
    from sparsekernels.triton import autotune

    tuner = autotune.Tuner(path=tmp_path / "tune.json", timer=lambda fn: (fn(), 1.0)[1],
                           measurable=lambda device, tensors: True)
    monkeypatch.setattr(autotune, "tuner", tuner)
    monkeypatch.setenv("SPARSEKERNELS_AUTOTUNE", "1")
    layer = make_layer(BlockSparse(16, 0.5))
    input = torch.randn(20, 64, device=DEVICE)
    with torch.no_grad():
        first = layer(input)
        for _ in range(3):
            torch.testing.assert_close(layer(input), first, rtol=0, atol=0)
    assert tuner.tuning_runs == 1 and plan_builds["built"] == 1
    torch.testing.assert_close(first, _op_result(layer, input), rtol=0, atol=0)


def test_inference_mode_layers_keep_their_plan(plan_builds):
    """Index tensors made under inference_mode have no version counter: the plan is kept all the
    same, and a pattern rewritten in place keeps the old program order (a permutation of the block
    rows: the results stay right)."""
    with torch.inference_mode():
        layer = make_layer(BlockSparse(16, 0.5))
        input = torch.randn(4, 64, device=DEVICE)
        outputs = [layer(input) for _ in range(2)]
        expected = F.linear(input, layer.dense_weight(), layer.bias)
        for output in outputs:
            assert_close(output, expected, torch.float32, "output")
        torch.manual_seed(3)
        block_mask = layer.matrix.block_mask()
        layer.set_pattern(block_mask[torch.randperm(block_mask.shape[0])])  # in place: same count
        after = layer(input)
        assert_close(after, F.linear(input, layer.dense_weight(), layer.bias), torch.float32, "after set_pattern")
    assert plan_builds["built"] == 1


def test_plans_per_layer_are_bounded(plan_builds, monkeypatch):
    from sparsekernels.triton import eager

    monkeypatch.setattr(eager, "MAX_PLANS_PER_LAYER", 3)
    layer = make_layer(NM(2, 4))
    inputs = [torch.randn(rows, 64, device=DEVICE) for rows in (1, 2, 3, 4)]
    with torch.no_grad():
        for input in inputs:
            layer(input)
        layer(inputs[3])  # kept after the clear
        layer(inputs[0])  # dropped by the clear: built again
    assert plan_builds["built"] == 5


def test_a_non_contiguous_weight_is_not_planned(plan_builds):
    layer = make_layer(NM(2, 4))
    input = torch.randn(4, 64, device=DEVICE)
    with torch.no_grad():
        strided = torch.empty(layer.values.shape[1], layer.values.shape[0], device=DEVICE).t()
        strided.copy_(layer.values)
        layer.values = torch.nn.Parameter(strided)
        outputs = [layer(input) for _ in range(2)]
    assert plan_builds["built"] == 0
    for output in outputs:
        torch.testing.assert_close(output, _op_result(layer, input), rtol=0, atol=0)


def test_a_split_small_m_plan_allocates_its_partials_per_call(plan_builds, monkeypatch):
    """The small-M N:M kernel split over the kept dimension: the plan holds the split, and each
    call gets its own float32 partial buffer (two calls in a row must both be right)."""
    from sparsekernels.triton import _common

    monkeypatch.setattr(_common, "target_programs", lambda device: 64)
    layer = SparseLinear(512, 8, NM(2, 4), dtype=torch.float32).to(DEVICE)
    first_input, second_input = torch.randn(3, 512, device=DEVICE), torch.randn(3, 512, device=DEVICE)
    with torch.no_grad():
        first = layer(first_input)
        second = layer(second_input)
    assert plan_builds["built"] == 1
    torch.testing.assert_close(first, _op_result(layer, first_input), rtol=0, atol=0)
    torch.testing.assert_close(second, _op_result(layer, second_input), rtol=0, atol=0)


def test_the_layer_state_goes_stale_when_a_checked_tensor_dies():
    """Equal ids mean the same objects only while those objects live: a freed tensor's id can be
    reused, so its death marks the state stale."""
    import gc

    from sparsekernels.nn import _FastPathState

    tensors = (torch.zeros(3), None, torch.zeros(2, dtype=torch.int32))
    state = _FastPathState(tensors)
    assert state.alive[0]
    tensors = None
    gc.collect()
    assert not state.alive[0]


# The dense-fallback decision (CUDA: dispatch.py) held by a plan. eager.routed is patched so that
# the decision is asked for CPU tensors too; a tuner that may measure, with a timer that reports
# the sparse and then the dense timing given, makes the decision and stores it.


def _deciding_tuner(tmp_path, sparse_ms: float, dense_ms: float):
    return _reporting_tuner(tmp_path, [sparse_ms, dense_ms] * 8)


def _reporting_tuner(tmp_path, timings: list):
    """A tuner that may measure, whose timer reports ``timings`` in turn (running nothing)."""
    from sparsekernels.triton import autotune

    reported = iter(timings)
    return autotune.Tuner(path=tmp_path / "tune.json", timer=lambda fn: next(reported),
                          measurable=lambda device, tensors: True)


@pytest.fixture
def routed(monkeypatch, tmp_path):
    """Routes CPU calls through dispatch.py's decision; returns ``counts`` of decisions asked."""
    from sparsekernels.triton import dispatch, eager

    monkeypatch.setattr(eager, "routed", lambda input: True)
    monkeypatch.setenv("SPARSEKERNELS_DENSE_FALLBACK", "1")
    counts = {"decisions": 0}
    for name in ("bsr_path", "nm_path"):
        _count_calls(monkeypatch, dispatch, name, counts, "decisions")
    return counts


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_a_dense_decision_is_kept_in_the_plan(layout, routed, plan_builds, monkeypatch, tmp_path):
    from sparsekernels.triton import autotune, dispatch

    monkeypatch.setattr(autotune, "tuner", _deciding_tuner(tmp_path, sparse_ms=2.0, dense_ms=1.0))
    layer = make_layer(layout)
    input = torch.randn(4, 64, device=DEVICE)
    before = dispatch.path_counts["dense"]
    with torch.no_grad():
        outputs = [layer(input) for _ in range(3)]
        expected = F.linear(input, layer.dense_weight(), layer.bias)
        for output in outputs:
            torch.testing.assert_close(output, expected, rtol=0, atol=0)
        assert routed["decisions"] == 1 and plan_builds["built"] == 0
        assert dispatch.path_counts["dense"] - before == 3 and dispatch.last_path() == "dense"
        # The kept dense plan reads dispatch.py's dense weight, which follows in-place value updates.
        layer.values.mul_(2)
        torch.testing.assert_close(layer(input), F.linear(input, layer.dense_weight(), layer.bias), rtol=0, atol=0)
        assert routed["decisions"] == 1
        # Turning the fallback off changes the stamp: the next call plans the sparse kernel.
        monkeypatch.setenv("SPARSEKERNELS_DENSE_FALLBACK", "0")
        assert_close(layer(input), F.linear(input, layer.dense_weight(), layer.bias), torch.float32, "output")
        assert plan_builds["built"] == 1 and dispatch.last_path() == "sparse"


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_a_sparse_decision_is_kept_in_the_plan(layout, routed, plan_builds, monkeypatch, tmp_path):
    from sparsekernels.triton import autotune, dispatch

    monkeypatch.setattr(autotune, "tuner", _deciding_tuner(tmp_path, sparse_ms=1.0, dense_ms=2.0))
    layer = make_layer(layout)
    input = torch.randn(2, 3, 64, device=DEVICE)
    before = dispatch.path_counts["sparse"]
    with torch.no_grad():
        outputs = [layer(input) for _ in range(3)]
    assert routed["decisions"] == 1 and plan_builds["built"] == 1
    assert dispatch.path_counts["sparse"] - before == 3 and dispatch.last_path() == "sparse"
    expected = _op_result(layer, input)
    for output in outputs:
        torch.testing.assert_close(output, expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_a_cuda_decision_is_kept_in_the_plan(layout, routed, plan_builds, monkeypatch, tmp_path):
    """The CUDA C++ op as the measured winner (dispatch.cuda_candidate patched, so that on CPU
    tensors the op runs its C++ CPU kernel): the plan calls the op as it is. Forcing the backend
    (here: what get_backend reports, as the tests run with triton forced) changes the stamp, and
    without the CUDA candidate the next call decides and plans afresh."""
    from sparsekernels import backend
    from sparsekernels.triton import autotune, dispatch

    reported = {"backend": "auto"}
    monkeypatch.setattr(backend, "get_backend", lambda: reported["backend"])
    monkeypatch.setattr(dispatch, "cuda_candidate", lambda input, values: backend.get_backend() == "auto")
    # sparse, cuda, dense; then sparse, dense
    monkeypatch.setattr(autotune, "tuner", _reporting_tuner(tmp_path, [3.0, 1.0, 2.0, 1.0, 2.0]))
    layer = make_layer(layout)
    input = torch.randn(2, 3, 64, device=DEVICE)
    before = dispatch.path_counts["cuda"]
    with torch.no_grad():
        outputs = [layer(input) for _ in range(3)]
    assert routed["decisions"] == 1 and plan_builds["built"] == 0
    assert dispatch.path_counts["cuda"] - before == 3 and dispatch.last_path() == "cuda"
    if isinstance(layout, BlockSparse):
        expected = dispatch.bsr_cuda(input, layer.values, layer.matrix.index_tensors(), layer.bias)
    else:
        expected = dispatch.nm_cuda(input, layer.values, layer.positions, layout.n, layout.m, layer.bias)
    for output in outputs:
        torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert_close(outputs[0], F.linear(input, layer.dense_weight(), layer.bias), torch.float32, "output")
    reported["backend"] = "triton"
    with torch.no_grad():
        layer(input)
    assert routed["decisions"] == 2 and plan_builds["built"] == 1 and dispatch.last_path() == "sparse"


def test_a_transposable_layer_in_training_decides_as_its_op_does(routed, monkeypatch, tmp_path):
    """nm_linear_transposable runs nm_linear below its own autograd, where the CUDA op competes: the
    fast path's decision for a training call is made the same way (without autograd recording)."""
    from sparsekernels.triton import autotune, dispatch

    recorded = []
    monkeypatch.setattr(dispatch, "cuda_candidate", lambda input, values: recorded.append(
        torch.is_grad_enabled() and (input.requires_grad or values.requires_grad)) or True)
    monkeypatch.setattr(autotune, "tuner", _reporting_tuner(tmp_path, [3.0, 1.0, 2.0]))
    layer = make_layer(NM(2, 4, transposable=True))
    input = torch.randn(2, 3, 64, device=DEVICE, requires_grad=True)
    output = layer(input)
    output.sum().backward()
    assert recorded and not any(recorded) and dispatch.last_path() in ("cuda", "sparse")
    assert input.grad is not None and layer.values.grad is not None


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_a_cuda_plan_under_autograd_runs_the_op_with_its_own_autograd(layout, routed, monkeypatch, tmp_path):
    """A bias-only gradient leaves the CUDA op a candidate (autograd records nothing for input or
    values): the plan then calls the C++ op directly, whose autograd gives the bias gradient, as on
    the op path."""
    from sparsekernels.triton import autotune, dispatch

    monkeypatch.setattr(dispatch, "cuda_candidate", lambda input, values: not (
        torch.is_grad_enabled() and (input.requires_grad or values.requires_grad)))
    monkeypatch.setattr(autotune, "tuner", _reporting_tuner(tmp_path, [3.0, 1.0, 2.0, 1.0, 2.0]))
    layer = make_layer(layout)
    layer.values.requires_grad_(False)
    input = torch.randn(4, 64, device=DEVICE)
    output = layer(input)
    assert dispatch.last_path() == "cuda" and output.grad_fn is not None
    assert "_OpAutograd" not in type(output.grad_fn).__name__
    output.sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((48,), 4.0), rtol=0, atol=0)
    # Input requiring grad: recorded, another plan, decided without the CUDA op.
    layer(input.requires_grad_())
    assert dispatch.last_path() == "sparse"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS + [NM(1, 4)], ids=layout_id)
@pytest.mark.parametrize("rows", [1, 16, 40])
def test_cuda_graph_capture_and_replay(layout, rows, plan_builds):
    """Decode loops capture the layer in a CUDA graph: warm-up calls keep a plan, calls during
    capture plan afresh without keeping anything made there, replays follow new inputs, and eager
    calls after the capture still use the kept plan."""
    layer = SparseLinear(256, 128, layout, dtype=torch.bfloat16).cuda()
    static_input = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                layer(static_input)
        torch.cuda.current_stream().wait_stream(stream)
        kept = plan_builds["built"]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = layer(static_input)
        for _ in range(3):
            new_input = torch.randn_like(static_input)
            static_input.copy_(new_input)
            graph.replay()
            torch.cuda.synchronize()
            expected = _op_result(layer, new_input)
            assert_close(static_output, expected, torch.bfloat16, "replayed output")
        built_after_capture = plan_builds["built"]
        torch.testing.assert_close(layer(static_input), static_output, rtol=0, atol=0)
        assert plan_builds["built"] == built_after_capture  # the warm-up plan, still kept
    assert kept == 1


def test_the_default_device_context_keeps_the_fast_path(paths):
    """``with torch.device(...)`` and ``torch.set_default_device`` are common in inference scripts;
    their mode only fills in factory devices, so the fast path still applies (any other function
    mode takes the op)."""
    layer = make_layer(NM(2, 4))
    input = torch.randn(3, 64, device=DEVICE)
    expected = _op_result(layer, input)
    with torch.no_grad():
        with torch.device(DEVICE):
            torch.testing.assert_close(layer(input), expected, rtol=0, atol=0)
        previous, had_default = torch.get_default_device(), torch._C._len_torch_function_stack() > 0
        torch.set_default_device(DEVICE)
        try:
            torch.testing.assert_close(layer(input), expected, rtol=0, atol=0)
            with torch.device(DEVICE):  # a second DeviceContext on the stack
                torch.testing.assert_close(layer(input), expected, rtol=0, atol=0)
        finally:
            torch.set_default_device(previous if had_default else None)
    assert paths["fast"] == 3 and paths["op"] == 1


# ------------------------------------------------------------------------- grad-enabled fast path
# With grad mode on and an operand requiring grad, the fast path runs the kept plan inside an
# autograd.Function whose backward is the op's registered formula (eager._OpAutograd): outputs and
# gradients must be those of the op path, bitwise, whichever operands require grad.


def _forward_and_grads(forward, input, grad_output, layer=None):
    """(output, input.grad, values.grad, bias.grad) of one forward (``forward(input)``, the layer
    unless ``layer`` is given) and backward."""
    layer = forward if layer is None else layer
    for tensor in (input, layer.values, layer.bias):
        if tensor is not None:
            tensor.grad = None
    output = forward(input)
    output.backward(grad_output)
    grads = [None if tensor is None else tensor.grad for tensor in (input, layer.values, layer.bias)]
    return (output.detach(), *grads)


GRAD_LAYOUTS = LAYOUTS + [NM(2, 4, transposable=True)]


@pytest.mark.parametrize("needs", ["all", "weights", "input"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", GRAD_LAYOUTS, ids=layout_id)
def test_autograd_fast_path_gives_the_ops_gradients(layout, dtype, bias, needs, paths):
    """``needs``: which operands require grad: all, the weights only (a plain input), the input only
    (values and bias frozen)."""
    layer = make_layer(layout, dtype, bias)
    layer.requires_grad_(needs != "input")
    input = torch.randn(2, 3, 64, dtype=dtype, device=DEVICE, requires_grad=needs != "weights")
    grad_output = torch.randn(2, 3, 48, dtype=dtype, device=DEVICE)
    # A transposable layer's input gradient is an N:M forward on W.T through the op, on both paths.
    op_backward = int(layout.transposable and needs != "weights") if isinstance(layout, NM) else 0
    fast = _forward_and_grads(layer, input, grad_output)
    assert paths == {"op": op_backward, "fast": 1}
    with fast_path_off():
        through_op = _forward_and_grads(layer, input, grad_output)
    assert paths == {"op": 1 + 2 * op_backward, "fast": 1}
    for name, fast_result, op_result in zip(("output", "input.grad", "values.grad", "bias.grad"), fast, through_op):
        assert (fast_result is None) == (op_result is None), name
        if fast_result is not None:
            torch.testing.assert_close(fast_result, op_result, rtol=0, atol=0, msg=name)
    assert (fast[1] is None) == (needs == "weights") and (fast[2] is None) == (needs == "input")


def _double_backward(layer, input):
    """What a second-order gradient through the layer gives: ("ok", grads) or (error type, message)."""
    output = layer(input)
    (grad_input,) = torch.autograd.grad(output.square().sum(), input, create_graph=True)
    try:
        grads = torch.autograd.grad(grad_input.square().sum(), (input, layer.values), allow_unused=True)
    except Exception as error:  # noqa: BLE001  (the op path's own error, whatever it is)
        return type(error), str(error)
    return "ok", grads


@pytest.mark.parametrize("layout", GRAD_LAYOUTS, ids=layout_id)
def test_double_backward_behaves_as_on_the_op_path(layout, paths):
    layer = make_layer(layout)
    input = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    fast = _double_backward(layer, input)
    with fast_path_off():
        through_op = _double_backward(layer, input)
    assert paths["fast"] == 1
    assert fast[0] == through_op[0]
    if fast[0] == "ok":
        for fast_grad, op_grad in zip(fast[1], through_op[1]):
            assert (fast_grad is None) == (op_grad is None)
            if fast_grad is not None:
                torch.testing.assert_close(fast_grad, op_grad, rtol=0, atol=0)
    else:
        assert fast[1] == through_op[1]


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_inference_and_training_keep_a_plan_each(layout, paths, plan_builds):
    """Whether autograd records the call is part of the plan key (on CUDA the path decision differs:
    the CUDA op competes for inference only); each mode builds its plan once, and both compute the
    same forward."""
    layer = make_layer(layout)
    input = torch.randn(4, 64, device=DEVICE)
    with torch.no_grad():
        inference = layer(input)
    training = layer(input)
    assert training.requires_grad and plan_builds["built"] == 2 and paths["fast"] == 2
    torch.testing.assert_close(training.detach(), inference, rtol=0, atol=0)
    with torch.no_grad():
        layer(input)
    layer(input)
    assert plan_builds["built"] == 2 and paths["fast"] == 4


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_forward_mode_ad_and_functorch_take_the_op(layout, grad_mode, paths):
    """A dual level (forward-mode AD) or a functorch transform expects the op (its tangent or
    batching rules): the fast path steps aside, grad mode on or off."""
    from torch.autograd import forward_ad

    layer = make_layer(layout)
    input = torch.randn(3, 64, device=DEVICE)
    with torch.set_grad_enabled(grad_mode), forward_ad.dual_level():
        layer(input)
    assert paths == {"op": 1, "fast": 0}
    if grad_mode:
        with pytest.raises(RuntimeError, match="setup_context"):  # the op's own answer to torch.func
            torch.func.grad(lambda x: layer(x).sum())(input)
        assert paths["fast"] == 0


def test_a_dense_plan_is_differentiated_as_on_the_op_path(routed, plan_builds, monkeypatch, tmp_path):
    """A dense decision (CUDA; routed here on CPU tensors): the op path's front end runs
    dispatch.bsr_linear, F.linear on a weight built from the values, which autograd differentiates
    itself; so does the fast path, through its kept dense plan."""
    from sparsekernels.nn import _BSR_INDEX_NAMES
    from sparsekernels.triton import autotune, dispatch

    monkeypatch.setattr(autotune, "tuner", _deciding_tuner(tmp_path, sparse_ms=2.0, dense_ms=1.0))
    layer = make_layer(BlockSparse(16, 0.5))
    input = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    grad_output = torch.randn(4, 48, device=DEVICE)
    fast = _forward_and_grads(layer, input, grad_output)
    fast_again = _forward_and_grads(layer, input, grad_output)
    assert dispatch.last_path() == "dense" and routed["decisions"] == 1 and plan_builds["built"] == 0
    index = [getattr(layer, name) for name in _BSR_INDEX_NAMES]
    routed_op = _forward_and_grads(
        lambda x: dispatch.bsr_linear(x, layer.values, *index, layer.bias), input, grad_output, layer)
    for fast_result, again, op_result in zip(fast, fast_again, routed_op):
        torch.testing.assert_close(fast_result, op_result, rtol=0, atol=0)
        torch.testing.assert_close(again, op_result, rtol=0, atol=0)


@pytest.mark.parametrize("layout", GRAD_LAYOUTS, ids=layout_id)
def test_a_retained_graph_backpropagates_twice_as_on_the_op_path(layout, paths):
    """The second backward through a retained graph sees the same needs_input_grad as the first."""
    layer = make_layer(layout)
    input = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    grad_output = torch.randn(3, 48, device=DEVICE)

    def twice():
        for tensor in (input, layer.values, layer.bias):
            tensor.grad = None
        output = layer(input)
        output.backward(grad_output, retain_graph=True)
        output.backward(grad_output)
        return input.grad, layer.values.grad, layer.bias.grad

    fast = twice()
    with fast_path_off():
        through_op = twice()
    assert paths["fast"] == 1
    for fast_grad, op_grad in zip(fast, through_op):
        torch.testing.assert_close(fast_grad, op_grad, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 64)], ids=str)
@pytest.mark.parametrize("layout", GRAD_LAYOUTS, ids=layout_id)
def test_an_in_place_activation_after_the_layer_in_training(layout, shape, paths):
    """The output is no view (a view made inside an autograd Function may not be modified in place,
    which the op path's reshaped output runs into): ``relu_`` on it trains, with the gradients of an
    out-of-place ``relu`` on the op path."""
    layer = make_layer(layout)
    input = torch.randn(shape, device=DEVICE, requires_grad=True)
    grad_output = torch.randn(*shape[:-1], 48, device=DEVICE)
    fast = _forward_and_grads(lambda x: torch.relu_(layer(x)), input, grad_output, layer)
    with fast_path_off():
        through_op = _forward_and_grads(lambda x: torch.relu(layer(x)), input, grad_output, layer)
    assert paths["fast"] == 1
    for fast_result, op_result in zip(fast, through_op):
        torch.testing.assert_close(fast_result, op_result, rtol=0, atol=0)


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_records_the_op(grad_mode, paths):
    """torch.jit.trace records the ops it sees: the fast path's direct launch would leave the op out
    of the traced graph (and the tracer's scalars break the launch), so tracing takes the op."""
    layer = make_layer(NM(2, 4))
    input = torch.randn(3, 64, device=DEVICE)
    with torch.set_grad_enabled(grad_mode), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values in the layer
        traced = torch.jit.trace(layer, input, check_trace=False)  # the check reruns the layer, untraced
    assert any(node.kind() == "sparsekernels_triton::nm_linear" for node in traced.graph.nodes())
    assert paths["fast"] == 0
    torch.testing.assert_close(traced(input), _op_result(layer, input), rtol=0, atol=0)


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", ["transpose_index", "positions_t"])
def test_a_transposed_pattern_changed_through_data_gets_the_op_error(name, grad_mode, paths, monkeypatch):
    """W.T's pattern of a transposable layer is checked by its op: by the fast path too."""
    layer = make_layer(NM(2, 4, transposable=True))
    input = torch.randn(5, 64, device=DEVICE)
    layer(input)
    getattr(layer, name).data = getattr(layer, name).data[:-1].clone()
    errors = []
    for fast in ("1", "0"):
        monkeypatch.setenv("SPARSEKERNELS_EAGER_FAST_PATH", fast)
        with torch.set_grad_enabled(grad_mode), pytest.raises((TypeError, ValueError)) as raised:
            layer(input)
        errors.append((type(raised.value), str(raised.value)))
    assert errors[0] == errors[1] and name in errors[0][1]
    assert paths["fast"] == 2
