"""Eager fast path of ``SparseLinear`` on the Triton backend: the launcher, without the op.

Why. At decode batch sizes the kernel takes a few microseconds, and issue 4's budget for
everything else is 15 µs per ``SparseLinear.forward``. The op path spends more than that in Python
before the launch: the front end checks the arguments and picks a backend, the ``torch.library``
op dispatches (custom op -> autograd -> backend kernel) and checks them again, then the launcher
builds its tuning key; with grad mode on, torch's custom-op autograd wrapper adds about 100 µs.
A layer's own tensors were validated when its pattern was set, so that work can be skipped when
nothing else needs it.

When. :func:`path` is not None only for plain eager calls:

* not tracing (torch.compile, export);
* no TorchDispatchMode, functorch transform or TorchFunctionMode active (torch's default-device
  context of ``with torch.device(...)`` / ``torch.set_default_device`` aside), no forward-mode AD
  dual level, no ``torch.jit.trace``, and the profiler off (each expects to see the op:
  FakeTensorMode, FlopCounterMode, vmap, tangents, the traced graph, traces by op name);
* input is a plain ``torch.Tensor`` (no subclass: FakeTensor, DTensor, ...) with the weight's dtype
  and device and ``in_features`` last; values and bias are plain tensors or Parameters;
* ``SPARSEKERNELS_EAGER_FAST_PATH`` is not ``0``.

It is :data:`INFERENCE` when there is no autograd graph to record (grad mode off, or none of input,
values and bias requires grad): the plan runs as it is. It is :data:`AUTOGRAD` otherwise
(training, or eval without ``no_grad``): the plan runs inside :class:`_OpAutograd`, whose
``setup_context`` and ``backward`` are the very formulas the op registers (ops.py), so gradients
are the op path's, bitwise; a dense plan (below) runs as it is there too, since the op path's dense
route is ``F.linear``, which autograd differentiates itself. The transposable N:M layout's op
(``nm_linear_transposable``) has the same forward and its own backward: there the Function wraps
either plan, with that op's formulas, as the op runs either path below its own autograd.

Anything else, including every bad input, takes the op path, which raises the documented errors.
The fast path runs exactly what the op would run on these arguments: on CUDA the path decision
(dispatch.py), then the sparse launcher, the CUDA C++ op or ``F.linear``; on CPU tensors (the
interpreter, in tests) the sparse launcher.

Launch plans. The launcher's host work (sizes, tuning key and lookup, program order, grid, the
kernel's integer and constexpr arguments) gives the same answer at every call with the same
operands, so the fast path keeps it as a *plan*, per layer (SparseLinear's fast-path state, which
starts afresh when a tensor of the layer is replaced, or when the dtype, shape or device of its
bias or an index tensor, or the contiguity of any of its tensors, changes: ``.data =`` keeps the
object) and per *key*: input shape, strides, dtype and device, the values' shape, and whether
autograd records the call (the path decision differs: dispatch.py's CUDA op competes only where it
does not). A weight whose dtype, shape or device changes through ``.data`` (as ``nn.Module.to`` and
``.half()`` do for parameters, keeping the objects) therefore gets a new plan too. Building a plan runs the op's
metadata checks on the layer's tensors, so a bad replacement raises the op's error before any
launch.

* A *sparse* plan is the output allocation and the planned launch (``plan_bsr_forward`` /
  ``plan_nm_forward``); a *dense* plan (CUDA, when dispatch.py decided so) is ``F.linear`` on
  dispatch.py's cached dense weight, which follows in-place value updates by its own stamp (with
  grad mode on and values requiring grad, a weight built afresh and differentiable, as on the op
  path); a *cuda* plan (likewise; inference only, see dispatch.py) is the CUDA C++ op, called as
  it is.
* Each plan carries a *stamp* of what its decisions depend on beyond the key, compared at every
  call (a differing stamp builds the plan again): the tuner object and its ``generation`` (bumped
  when a configuration or decision is stored, or memory cleared), ``SPARSEKERNELS_AUTOTUNE``, for
  block layouts the version counter of ``block_row_offsets`` (the program order is that pattern's;
  ``set_pattern`` rewrites it in place), and on CUDA ``SPARSEKERNELS_DENSE_FALLBACK``, the forced
  backend (``set_backend``: a forced ``"triton"`` excludes the CUDA op) and, for float32, torch's
  TF32 setting (``autotune.tf32_enabled``).
* Not kept: sparse plans over non-contiguous weights or with an empty output (the launcher runs at
  every call), plans built during CUDA graph capture, plans under a tuner stand-in without a
  ``generation``. At most :data:`MAX_PLANS_PER_LAYER` per layer (then they start afresh).
* An index made under ``torch.inference_mode`` has no version counter: its plans are kept, and an
  in-place pattern change keeps the old program order, still a permutation of the block rows
  (results stay right; only the load balance is the old pattern's).
* Not seen: index *contents* replaced by hand through ``.data``. As on the op path, contents are
  validated when a pattern is set and the kernels clamp every index they read, so such a layer
  gives wrong numbers, never an access outside its tensors.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from .. import backend
from ..ops import nm_transposable
from ..ops._checks import bsr_features, check_bias, nm_features
from ..ops.nm_transposable import check_transposed_pattern
from . import autotune, dispatch
from . import ops as triton_ops
from ._common import no_function_mode_but_default_device
from .bsr_forward import bsr_forward, plan_bsr_forward
from .nm_forward import nm_forward, plan_nm_forward

__all__ = ["path", "INFERENCE", "AUTOGRAD", "enabled", "bsr_linear", "nm_linear", "MAX_PLANS_PER_LAYER"]

_PLAIN_WEIGHT_TYPES = (Tensor, nn.Parameter)


def enabled() -> bool:
    """False when ``SPARSEKERNELS_EAGER_FAST_PATH=0`` (every call takes the op path)."""
    return os.environ.get("SPARSEKERNELS_EAGER_FAST_PATH", "1").strip().lower() not in ("0", "false", "off", "no")


INFERENCE = "inference"
AUTOGRAD = "autograd"


def path(input: Tensor, values: Tensor, bias: Optional[Tensor], in_features: int) -> Optional[str]:
    """How a forward on these operands may skip the op (see the module docstring): :data:`INFERENCE`
    (no autograd graph to record), :data:`AUTOGRAD` (grad mode on and an operand requires grad: the
    op's autograd formulas around the plan), or None (the op)."""
    if torch.compiler.is_compiling():  # first: under torch.compile nothing below is traced
        return None
    if type(input) is not Tensor or type(values) not in _PLAIN_WEIGHT_TYPES:
        return None
    if bias is not None and type(bias) not in _PLAIN_WEIGHT_TYPES:
        return None
    if (
        not no_function_mode_but_default_device()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._functorch.peek_interpreter_stack() is not None
        or forward_ad._current_level >= 0  # a dual level: input may carry a tangent (forward-mode AD)
        or torch._C._get_tracing_state() is not None  # torch.jit.trace records ops, not launches
        or torch.autograd._profiler_enabled()
    ):
        return None
    if not (
        input.dtype == values.dtype
        and input.device == values.device
        and input.dim() >= 1
        and input.shape[-1] == in_features
        and enabled()
    ):
        return None
    if torch.is_grad_enabled() and (
        input.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return AUTOGRAD
    return INFERENCE


# Plans kept per layer at most; more distinct input shapes (prefill at many sequence lengths) start
# the layer's plans afresh rather than growing without bound.
MAX_PLANS_PER_LAYER = 32


def _plan_stamp(input: Tensor, block_row_offsets: Optional[Tensor]) -> Optional[tuple]:
    """What a kept plan's decisions depend on beyond its key (see the module docstring); None when
    a plan must not be kept: a tuner without a ``generation`` (a stand-in), or a CUDA graph being
    captured (an order computed there holds its values only once the graph replays)."""
    tuner = autotune.tuner
    generation = getattr(tuner, "generation", None)
    if generation is None:
        return None
    stamp = (tuner, generation, autotune.tuning_enabled())
    if block_row_offsets is not None:
        try:
            stamp += (block_row_offsets._version,)
        except RuntimeError:
            # An inference-mode index has no version counter: a pattern rewritten in place is not
            # seen, and the plan keeps the old program order. That order is still a permutation of
            # the block rows, so results stay right; only the load balance is the old pattern's.
            stamp += (None,)
    if input.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None
        stamp += (input.dtype == torch.float32 and autotune.tf32_enabled(),)
    if routed(input):
        stamp += (dispatch.fallback_enabled(), backend.get_backend())
    return stamp


def _recorded(autograd: bool, input: Tensor, values: Tensor) -> bool:
    """Whether autograd records this call for input or values: dispatch.py's rule for the CUDA
    op's candidacy, so plans made on either side of it are kept apart (a bias-only gradient does
    not count, as there)."""
    return autograd and (input.requires_grad or values.requires_grad)


def routed(input: Tensor) -> bool:
    """Whether dispatch.py decides this call's path (Triton kernel, CUDA op or dense ``F.linear``): CUDA
    tensors, as the op's front end does. Tests patch it to run that logic on CPU tensors."""
    return input.device.type == "cuda"


def _lookup(plans: dict, key: tuple, input: Tensor, block_row_offsets: Optional[Tensor]):
    """The kept plan for ``key`` if its stamp still holds, else None."""
    entry = plans.get(key)
    if entry is not None and entry[1] == _plan_stamp(input, block_row_offsets):
        return entry[0]
    return None


def _keep(plans: dict, key: tuple, run, input: Tensor, block_row_offsets: Optional[Tensor]) -> None:
    stamp = _plan_stamp(input, block_row_offsets)  # after building: tuning may have bumped the generation
    if stamp is None:
        return
    if len(plans) >= MAX_PLANS_PER_LAYER:
        plans.clear()
    plans[key] = (run, stamp)


def bsr_linear(plans: dict, input: Tensor, values: Tensor, index: tuple, bias: Optional[Tensor],
               out_features: int, in_features: int, autograd: bool = False) -> Tensor:
    """``sparsekernels.ops.bsr_linear`` on arguments for which :func:`path` is not None (``index``:
    the five index tensors in op order; ``autograd``: it said :data:`AUTOGRAD`); ``plans`` is the
    layer's plan dict."""
    key = (input.shape, input.stride(), input.dtype, input.device, values.shape, _recorded(autograd, input, values))
    run = _lookup(plans, key, input, index[0])
    if run is None:
        run, keep = _bsr_plan(input, values, index, bias, out_features, in_features)
        if keep:
            _keep(plans, key, run, input, index[0])
    if autograd and not getattr(run, "differentiable", False):
        return _OpAutograd.apply(input, values, bias, (run, index, (input, values, *index, bias), _bsr_autograd))
    return run(input, values, index, bias)


def nm_linear(plans: dict, input: Tensor, values: Tensor, index: tuple, n: int, m: int, bias: Optional[Tensor],
              out_features: int, in_features: int, autograd: bool = False) -> Tensor:
    """``sparsekernels.ops.nm_linear`` on arguments for which :func:`path` is not None (``index``:
    ``(positions,)``), or ``nm_linear_transposable`` (``index``: ``(positions, transpose_index,
    positions_t)``: the same forward, its own backward); ``plans`` and ``autograd`` as in
    :func:`bsr_linear`."""
    key = (input.shape, input.stride(), input.dtype, input.device, values.shape,
           len(index) != 3 and _recorded(autograd, input, values))
    run = _lookup(plans, key, input, None)
    if run is None:
        run, keep = _nm_plan(input, values, index, n, m, bias, out_features, in_features)
        if keep:
            _keep(plans, key, run, input, None)
    if autograd and len(index) == 3:  # the transposable op runs either plan below its own autograd
        return _OpAutograd.apply(input, values, bias, (run, index, (input, values, *index, n, m, bias),
                                                       _nm_transposable_autograd))
    if autograd and not getattr(run, "differentiable", False):
        return _OpAutograd.apply(input, values, bias, (run, index, (input, values, index[0], n, m, bias), _nm_autograd))
    return run(input, values, index, bias)


class _OpAutograd(torch.autograd.Function):
    """The op's autograd around a kept plan, so that gradients are those of the op path, bitwise.

    ``apply(input, values, bias, (run, index, op_arguments, formulas))`` returns ``run(input, values,
    index, bias)`` and records the op's own ``setup_context`` and ``backward`` (``formulas``: the
    pair ops.py registers with ``register_autograd``, and the position of ``bias`` among the op's
    arguments), given ``op_arguments`` in the op's order, as torch's custom-op autograd wrapper
    calls them. Only the three differentiable operands are the Function's inputs: every argument
    costs host time in ``Function.apply``; ``ctx.needs_input_grad`` is laid out in the op's order
    for the formula (and restored after: a retained graph may run the backward again). Not
    ``once_differentiable``: a double backward runs the op's backward under autograd, as the op
    path does (the backward ops have no derivative: both raise the same error)."""

    @staticmethod
    def forward(ctx, input, values, bias, plan):
        run, index, op_arguments, (setup_context, backward, bias_position) = plan
        output = run(input, values, index, bias)
        setup_context(ctx, op_arguments, output)
        ctx.op_backward = backward, len(op_arguments), bias_position
        return output

    @staticmethod
    def backward(ctx, grad_output):
        backward, arity, bias_position = ctx.op_backward
        needs_input_grad = ctx.needs_input_grad
        in_op_order = [False] * arity
        in_op_order[0], in_op_order[1], in_op_order[bias_position] = needs_input_grad[:3]
        ctx.needs_input_grad = tuple(in_op_order)
        try:
            grads = backward(ctx, grad_output)
        finally:
            ctx.needs_input_grad = needs_input_grad
        return grads[0], grads[1], grads[bias_position], None


# The (setup_context, backward) pairs the Triton ops register (ops.py), and where bias is among the
# op's arguments: bsr_linear(input, values, <5 index tensors>, bias), nm_linear(input, values,
# positions, n, m, bias).
_bsr_autograd = (triton_ops._bsr_setup_context, triton_ops._bsr_backward, 7)
_nm_autograd = (triton_ops._nm_setup_context, triton_ops._nm_backward, 5)
# nm_linear_transposable(input, values, positions, transpose_index, positions_t, n, m, bias).
_nm_transposable_autograd = (nm_transposable._setup_context, nm_transposable._backward, 7)


def _bsr_plan(input, values, index, bias, out_features, in_features):
    """(run, keep) for a block-sparse forward: the op's metadata checks of the layer's tensors, the
    path (CUDA: dispatch.py's decision), then the dense ``F.linear``, the CUDA C++ op, the planned
    sparse launch, or the launcher at every call (not kept)."""
    check_bias(bias, values, bsr_features(values, *index)[0])
    decided = routed(input)
    path = dispatch.bsr_path(input, values, index) if decided else "sparse"
    if path != "sparse":
        return _routed_run(path, {"dense": dispatch.bsr_dense, "cuda": dispatch.bsr_cuda}[path]), True
    if not _plannable(input, in_features, out_features, values, index[0], index[1], bias):
        def unplanned(input, values, index, bias):
            if decided:
                dispatch.count_path("sparse")
            output = bsr_forward(input.reshape(-1, in_features), values, index[0], index[1], bias)
            return output.view(*input.shape[:-1], out_features)

        return unplanned, False
    x, out, restore = _flat_operands(input, in_features, out_features)
    launch_forward = plan_bsr_forward(x, out, values, index[0], index[1], bias)
    return _sparse_run(lambda x, out, values, index, bias: launch_forward(x, out, values, index[0], index[1], bias),
                       x.shape[0], in_features, out_features, restore, decided), True


def _routed_run(path: str, forward):
    """The kept plan of a path dispatch.py chose other than the Triton kernel (``"dense"``:
    ``F.linear`` on its cached dense weight; ``"cuda"``: the C++ op): ``forward(input, values,
    index, bias)``, counted. It is differentiable itself, as those routes are on the op path
    (``F.linear`` on a weight built from values; the C++ op's own autograd), so autograd calls run
    it directly rather than inside :class:`_OpAutograd`."""
    def run(input, values, index, bias):
        dispatch.count_path(path)
        return forward(input, values, index, bias)

    run.differentiable = True
    return run


def _nm_plan(input, values, index, n, m, bias, out_features, in_features):
    """(run, keep) for an N:M forward, as :func:`_bsr_plan`."""
    out_features_checked, in_features_checked = nm_features(values, index[0], n, m)
    check_bias(bias, values, out_features_checked)
    if len(index) == 3:  # transposable: its op checks W.T's pattern too
        check_transposed_pattern(index[1], index[2], values, n, m, out_features_checked, in_features_checked)
    decided = routed(input)
    path = "sparse"
    if decided:
        # The transposable op runs nm_linear inside its own autograd, where nothing is recorded:
        # decide as it does, whatever grad mode this call has.
        with torch.no_grad() if len(index) == 3 else contextlib.nullcontext():
            path = dispatch.nm_path(input, values, index[0], n, m)
    if path != "sparse":
        forward = dispatch.nm_dense if path == "dense" else dispatch.nm_cuda
        return _routed_run(path, lambda input, values, index, bias: forward(input, values, index[0], n, m, bias)), True
    if not _plannable(input, in_features, out_features, values, index[0], bias):
        def unplanned(input, values, index, bias):
            if decided:
                dispatch.count_path("sparse")
            output = nm_forward(input.reshape(-1, in_features), values, index[0], n, m, bias)
            return output.view(*input.shape[:-1], out_features)

        return unplanned, False
    x, out, restore = _flat_operands(input, in_features, out_features)
    launch_forward = plan_nm_forward(x, out, values, index[0], n, m, bias)
    return _sparse_run(lambda x, out, values, index, bias: launch_forward(x, out, values, index[0], bias),
                       x.shape[0], in_features, out_features, restore, decided), True


def _flat_operands(input: Tensor, in_features: int, out_features: int):
    """(x, out, restore): ``input`` as 2-D rows, an output for planning (tuning may launch into it),
    and the output shape with input's leading dimensions (None for a 2-D input)."""
    x = input if input.dim() == 2 else input.reshape(-1, in_features)
    restore = None if input.dim() == 2 else (*input.shape[:-1], out_features)
    return x, x.new_empty((x.shape[0], out_features)), restore


def _plannable(input: Tensor, in_features: int, out_features: int, *weights: Optional[Tensor]) -> bool:
    """Whether a sparse plan is worth building: a non-empty output (an empty one needs no launch),
    and contiguous weight tensors, which the planned launch passes as they are (the launchers copy
    non-contiguous ones, which a plan would have to repeat at every call)."""
    return input.numel() // in_features * out_features > 0 and all(
        tensor is None or tensor.is_contiguous() for tensor in weights)


def _sparse_run(launch, rows: int, in_features: int, out_features: int, restore: Optional[tuple], counted: bool):
    """A sparse plan's call: the output allocation and the planned launch, nothing else. The output
    is allocated in its final shape (the launch writes a 2-D view of it), so it is no view: a view
    made inside an autograd Function may not be modified in place (an in-place activation after the
    layer in training)."""
    if restore is None:
        def run(input, values, index, bias):
            out = input.new_empty((rows, out_features))
            launch(input, out, values, index, bias)
            if counted:
                dispatch.count_path("sparse")
            return out
    else:
        def run(input, values, index, bias):
            out = input.new_empty(restore)
            launch(input.reshape(rows, in_features), out.view(rows, out_features), values, index, bias)
            if counted:
                dispatch.count_path("sparse")
            return out
    return run
