"""The eager inference fast path of SparseLinear on the Triton backend (sparsekernels/triton/eager.py).

It must give the op's result, be taken only for plain eager inference, and leave every other case
(autograd, tracing, modes, profiler, bad input) to the op. Which path ran is observed by counting
calls of the launchers as the op (triton/ops.py) and the fast path (triton/eager.py) reach them.
"""

from __future__ import annotations

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


@pytest.fixture
def paths(monkeypatch):
    """Counts launcher calls by caller: ``{"op": n, "fast": n}``."""
    from sparsekernels.triton import eager, ops

    counts = {"op": 0, "fast": 0}
    for module, path in ((ops, "op"), (eager, "fast")):
        for name in ("bsr_forward", "nm_forward"):
            launcher = getattr(module, name)

            def counted(*args, _launcher=launcher, _path=path, **kwargs):
                counts[_path] += 1
                return _launcher(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    return counts


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
    with torch.enable_grad():
        through_op = layer(input)  # values requires grad: the op path
    assert paths["op"] == 1
    torch.testing.assert_close(fast, through_op.detach(), rtol=0, atol=0)


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
def test_training_takes_the_op(layout, paths):
    layer = make_layer(layout)
    input = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    layer(input).sum().backward()
    layer.requires_grad_(False)
    layer(input)  # only the input requires grad
    assert paths["fast"] == 0 and paths["op"] == 2
    assert input.grad is not None


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


def test_layer_tensors_are_checked_once_and_again_when_replaced(paths, monkeypatch):
    """The fast path runs the op's metadata checks on the layer's own tensors once, and again when
    one of them is a new object; a bad replacement gets the op's error, not a kernel launch."""
    import sparsekernels.nn as sk_nn

    calls = []
    check = sk_nn.bsr_features
    monkeypatch.setattr(sk_nn, "bsr_features", lambda *args: calls.append(1) or check(*args))
    layer = make_layer(BlockSparse(16, 0.5))
    input = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        layer(input)
        layer(input)
        assert len(calls) == 1
        layer.block_col_indices = layer.block_col_indices.clone()  # same metadata, new object
        layer(input)
        assert len(calls) == 2 and paths == {"op": 0, "fast": 3}
        layer.block_col_indices = layer.block_col_indices.long()  # no longer the offsets' dtype
        with pytest.raises(TypeError, match="block_col_indices must have the dtype of block_row_offsets"):
            layer(input)
    assert paths["fast"] == 3


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_replaced_bias_of_another_dtype_gets_the_op_error(layout, paths):
    layer = make_layer(layout)
    with torch.no_grad():
        layer.bias = torch.nn.Parameter(layer.bias.half())
        with pytest.raises(TypeError, match="same dtype"):
            layer(torch.randn(3, 64, device=DEVICE))
        layer.bias = None
        output = layer(torch.randn(3, 64, device=DEVICE))
    assert output.shape == (3, 48) and paths["fast"] == 1
