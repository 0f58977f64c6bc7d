"""How a compiled Triton kernel is launched (sparsekernels/triton/_common.py ``launch``).

In plain eager mode the kernel is called directly; wherever a tracer may be watching (torch.compile,
a TorchDispatchMode such as make_fx / FakeTensorMode, a TorchFunctionMode, a tensor subclass
argument, a SymInt) it goes through ``wrap_triton`` so that the launch can be recorded. Called
outside a ``triton_op`` body, as the eager fast path does, ``wrap_triton`` dispatches a higher-order
op even when nothing traces (tens of µs of host time per launch), hence the direct call.

No GPU is needed: the test kernel is a compiled-mode ``JITFunction`` (built directly, so
``TRITON_INTERPRET`` does not turn it into an interpreted one) whose ``run`` is replaced by a
recorder, so what reaches Triton's launch is observed without compiling anything.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import JITFunction

from sparsekernels.triton import _common


def _probe(x_ptr, out_ptr, n, BLOCK):  # body never compiled: run() is replaced in every test
    pass


@pytest.fixture
def kernel(monkeypatch):
    """A compiled-mode JITFunction whose ``run`` records its calls: ``kernel.runs`` lists (grid, args)."""
    probe = JITFunction(_probe)
    probe.runs = []

    def run(*args, grid, warmup, **kwargs):
        probe.runs.append((grid, args, kwargs))

    monkeypatch.setattr(probe, "run", run)
    return probe


@pytest.fixture
def wrapped(monkeypatch):
    """Records the kernels launched through ``wrap_triton``, and stops there: what wrap_triton does
    next depends on the tracer (a user's dispatch mode, for one, must handle its higher-order op)."""
    calls = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def recording(kernel):
        calls.append(kernel)
        return Stub()

    monkeypatch.setattr(_common, "wrap_triton", recording)
    return calls


def test_compiled_kernel_is_not_interpreted(kernel):
    assert not _common.is_interpreted(kernel)


def test_plain_eager_launch_calls_the_kernel_directly(kernel, wrapped):
    x, out = torch.randn(4, 8), torch.empty(4, 8)
    _common.launch(kernel, (3, 2), x, out, 32, BLOCK=16)
    assert wrapped == []
    assert len(kernel.runs) == 1
    grid, args, kwargs = kernel.runs[0]
    assert grid == (3, 2)
    assert args[0] is x and args[1] is out and args[2] == 32
    assert kwargs["BLOCK"] == 16


def test_parameter_arguments_are_plain(kernel, wrapped):
    weight = torch.nn.Parameter(torch.randn(4, 8))
    _common.launch(kernel, (1,), weight, torch.empty(4, 8), 32, BLOCK=16)
    assert wrapped == [] and len(kernel.runs) == 1


class _PassThroughDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassThroughFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [_PassThroughDispatch, _PassThroughFunction], ids=["dispatch-mode", "function-mode"])
def test_an_active_mode_takes_wrap_triton(kernel, wrapped, mode):
    x, out = torch.randn(4, 8), torch.empty(4, 8)
    with mode():
        _common.launch(kernel, (1,), x, out, 32, BLOCK=16)
    assert wrapped == [kernel] and kernel.runs == []


def test_a_tensor_subclass_argument_takes_wrap_triton(kernel, wrapped):
    class Marked(torch.Tensor):
        pass

    x = torch.randn(4, 8).as_subclass(Marked)
    _common.launch(kernel, (1,), x, torch.empty(4, 8), 32, BLOCK=16)
    assert wrapped == [kernel] and kernel.runs == []


def test_a_symbolic_size_takes_wrap_triton(kernel, wrapped):
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    size = ShapeEnv().create_unbacked_symint()
    _common.launch(kernel, (1,), torch.randn(4, 8), torch.empty(4, 8), size, BLOCK=16)
    assert wrapped == [kernel] and kernel.runs == []


def test_while_compiling_takes_wrap_triton(kernel, wrapped, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _common.launch(kernel, (1,), torch.randn(4, 8), torch.empty(4, 8), 32, BLOCK=16)
    assert wrapped == [kernel] and kernel.runs == []


def test_meta_tensors_launch_nothing(kernel, wrapped):
    _common.launch(kernel, (1,), torch.empty(4, 8, device="meta"), torch.empty(4, 8, device="meta"), 32, BLOCK=16)
    assert kernel.runs == [] and wrapped == []


def test_the_default_device_context_launches_directly(kernel, wrapped):
    """``with torch.device(...)`` / ``torch.set_default_device`` push a DeviceContext function mode,
    which traces nothing: launches stay direct under it, alone; with another mode above, wrapped."""
    x, out = torch.randn(4, 8), torch.empty(4, 8)
    with torch.device("cpu"):
        _common.launch(kernel, (1,), x, out, 32, BLOCK=16)
        assert wrapped == [] and len(kernel.runs) == 1
        with _PassThroughFunction():
            _common.launch(kernel, (1,), x, out, 32, BLOCK=16)
        assert wrapped == [kernel]
    previous, had_default = torch.get_default_device(), torch._C._len_torch_function_stack() > 0
    torch.set_default_device("cpu")
    try:
        _common.launch(kernel, (1,), x, out, 32, BLOCK=16)
        with torch.device("cpu"):  # a second DeviceContext on the stack
            _common.launch(kernel, (1,), x, out, 32, BLOCK=16)
    finally:
        torch.set_default_device(previous if had_default else None)
    assert wrapped == [kernel] and len(kernel.runs) == 3


# ------------------------------------------------------------------------------ float32 dot mode
# Float32 tiles are multiplied in TF32 only when torch allows it for its own float32 matmuls. torch
# has two APIs for that setting; after the new one set "tf32", reading the legacy flag raises, so
# the setting is read through the new one where torch has it (autotune.tf32_enabled).


@pytest.fixture
def restored_fp32_precision():
    """Restores torch's float32 precision settings (global and CUDA matmul) after the test."""
    generic, matmul = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.fp32_precision = generic
    torch.backends.cuda.matmul.fp32_precision = matmul


def _set_legacy_allow_tf32(value: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = value


def _set_matmul_precision(value: str) -> None:
    torch.backends.cuda.matmul.fp32_precision = value


def _set_global_precision(value: str) -> None:
    torch.backends.fp32_precision = value


@pytest.mark.parametrize("set_precision, value, expected", [
    (_set_legacy_allow_tf32, True, "tf32"),
    (_set_legacy_allow_tf32, False, "ieee"),
    (_set_matmul_precision, "tf32", "tf32"),
    (_set_matmul_precision, "ieee", "ieee"),
    (_set_global_precision, "tf32", "tf32"),
    (_set_global_precision, "ieee", "ieee"),
], ids=["legacy-true", "legacy-false", "matmul-tf32", "matmul-ieee", "global-tf32", "global-ieee"])
def test_dot_mode_follows_either_tf32_api(kernel, restored_fp32_precision, set_precision, value, expected):
    from sparsekernels.triton import autotune

    torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = "none"
    assert _common.dot_mode(kernel, torch.float32) == "ieee"  # torch's default: full precision
    set_precision(value)
    assert _common.dot_mode(kernel, torch.float32) == expected
    assert autotune.tf32_enabled() == (expected == "tf32")
    # Half-precision tiles go to the tensor cores as they are, whatever the setting.
    assert _common.dot_mode(kernel, torch.bfloat16) == "ieee"
    assert _common.dot_mode(kernel, torch.float16) == "ieee"


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_torch_without_the_new_api_reads_the_legacy_flag(kernel, monkeypatch, allow_tf32):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=allow_tf32))
    assert _common.dot_mode(kernel, torch.float32) == ("tf32" if allow_tf32 else "ieee")
