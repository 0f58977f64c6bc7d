"""Eager inference fast path of ``SparseLinear`` on the Triton backend: the launcher, without the op.

Why. At decode batch sizes the kernel takes a few microseconds, and issue 4's budget for
everything else is 15 µs per ``SparseLinear.forward``. The op path spends more than that in Python
before the launch: the front end checks the arguments and picks a backend, the ``torch.library``
op dispatches (custom op -> autograd -> backend kernel) and checks them again, then the launcher
builds its tuning key. A layer's own tensors were validated when its pattern was set, and an
inference call needs no autograd graph, so that work can be skipped when nothing else needs it.

When. :func:`applies` is True only for plain eager inference:

* not tracing (torch.compile, export) and no autograd graph to record (grad mode off, or none of
  input, values and bias requires grad);
* no TorchFunctionMode, TorchDispatchMode or functorch transform active, and the profiler off
  (each expects to see the op: FakeTensorMode, FlopCounterMode, vmap, traces by op name);
* input is a plain ``torch.Tensor`` (no subclass: FakeTensor, DTensor, ...) with the weight's dtype
  and device and ``in_features`` last; values and bias are plain tensors or Parameters;
* ``SPARSEKERNELS_EAGER_FAST_PATH`` is not ``0``.

Anything else, including every bad input, takes the op path, which raises the documented
errors. The layer's own tensors get the op's metadata checks once per tensor object (SparseLinear
re-runs them when one is replaced), so a bad replacement raises the same errors. The fast path runs
exactly what the op would run on these arguments: on CUDA the dense-fallback decision (dispatch.py)
and then the sparse launcher or ``F.linear``; on CPU tensors (the interpreter, in tests) the sparse
launcher.

Launch plans. The launcher's host work (sizes, tuning key and lookup, program order, grid, the
kernel's integer and constexpr arguments) gives the same answer at every call with the same
operands, so the fast path keeps it: per layer (in SparseLinear's fast-path state, dropped when a
tensor of the layer is replaced) and per *key* ``(input shape, input strides, dtype, values shape)``,
a plan holds the planned launch (``plan_bsr_forward`` / ``plan_nm_forward``) and a *stamp* of what
its decisions depend on beyond the key, checked at every call; a plan whose stamp differs is built
again. The stamp: the tuner object and its ``generation`` (bumped when a stored configuration or
dispatch decision appears or memory is cleared), ``SPARSEKERNELS_AUTOTUNE``, for block layouts the
version counter of ``block_row_offsets`` (the program order is of that pattern; ``set_pattern``
rewrites it in place), and on CUDA ``SPARSEKERNELS_DENSE_FALLBACK`` and, for float32, torch's TF32
flag. A plan is kept only for the sparse path (a dense decision asks dispatch.py at every call),
with contiguous weight tensors, a non-empty output, and never while a CUDA graph is being captured,
for an inference-mode index (no version counter) or with a tuner stand-in that has no
``generation``. A kept plan's call is the output allocation and the launch. At most
:data:`MAX_PLANS_PER_LAYER` are kept per layer (then they start afresh). Not seen, as anywhere in
the fast path: a tensor's storage replaced through ``.data`` by hand (``set_pattern``, ``.to()``
and ``load_state_dict`` are seen).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

from . import autotune, dispatch
from .bsr_forward import bsr_forward, plan_bsr_forward
from .nm_forward import nm_forward, plan_nm_forward

__all__ = ["applies", "enabled", "bsr_linear", "nm_linear", "MAX_PLANS_PER_LAYER"]

_PLAIN_WEIGHT_TYPES = (Tensor, nn.Parameter)


def enabled() -> bool:
    """False when ``SPARSEKERNELS_EAGER_FAST_PATH=0`` (every call takes the op path)."""
    return os.environ.get("SPARSEKERNELS_EAGER_FAST_PATH", "1").strip().lower() not in ("0", "false", "off", "no")


def applies(input: Tensor, values: Tensor, bias: Optional[Tensor], in_features: int) -> bool:
    """Whether a forward on these operands may skip the op (see the module docstring)."""
    if torch.compiler.is_compiling():  # first: under torch.compile nothing below is traced
        return False
    if type(input) is not Tensor or type(values) not in _PLAIN_WEIGHT_TYPES:
        return False
    if bias is not None and type(bias) not in _PLAIN_WEIGHT_TYPES:
        return False
    if torch.is_grad_enabled() and (
        input.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    if (
        torch._C._len_torch_function_stack() > 0
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.autograd._profiler_enabled()
    ):
        return False
    return (
        input.dtype == values.dtype
        and input.device == values.device
        and input.dim() >= 1
        and input.shape[-1] == in_features
        and enabled()
    )


# Plans kept per layer at most; more distinct input shapes (prefill at many sequence lengths) start
# the layer's plans afresh rather than growing without bound.
MAX_PLANS_PER_LAYER = 32


def _plan_stamp(input: Tensor, block_row_offsets: Optional[Tensor]) -> Optional[tuple]:
    """What a kept plan's decisions depend on beyond its key (see the module docstring); None when
    a plan must not be kept: a tuner without a ``generation`` (a stand-in), an inference-mode index
    (no version counter), or a CUDA graph being captured (an order computed there holds its values
    only once the graph replays)."""
    tuner = autotune.tuner
    generation = getattr(tuner, "generation", None)
    if generation is None:
        return None
    stamp = (tuner, generation, autotune.tuning_enabled())
    if block_row_offsets is not None:
        try:
            stamp += (block_row_offsets._version,)
        except RuntimeError:  # inference tensors have no version counter
            return None
    if input.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None
        stamp += (dispatch.fallback_enabled(), input.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    return stamp


def _planned(plans: dict, key: tuple, input: Tensor, block_row_offsets: Optional[Tensor]):
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


def _flat_operands(input: Tensor, in_features: int, out_features: int):
    """(rows, x, out, restore): ``input`` as 2-D rows, a fresh output, and how to give it input's
    leading dimensions back."""
    if input.dim() == 2:
        x = input
        out = x.new_empty((x.shape[0], out_features))
        return x.shape[0], x, out, None
    lead = input.shape[:-1]
    x = input.reshape(-1, in_features)
    return x.shape[0], x, x.new_empty((x.shape[0], out_features)), (*lead, out_features)


def bsr_linear(plans: dict, input: Tensor, values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor,
               block_col_offsets: Tensor, block_row_indices: Tensor, block_value_indices: Tensor,
               bias: Optional[Tensor], out_features: int, in_features: int) -> Tensor:
    """``sparsekernels.ops.bsr_linear`` on arguments for which :func:`applies` holds; ``plans`` is
    the layer's plan dict (kept plans by input shape, strides, dtype and weight shape)."""
    key = (input.shape, input.stride(), input.dtype, values.shape)
    run = _planned(plans, key, input, block_row_offsets)
    if run is not None:
        return run(input, values, block_row_offsets, block_col_indices, bias)

    def sparse() -> Tensor:
        if not _plannable(input, in_features, out_features, values, block_row_offsets, block_col_indices, bias):
            output = bsr_forward(input.reshape(-1, in_features), values, block_row_offsets, block_col_indices, bias)
            return output.view(*input.shape[:-1], out_features)
        rows, x, out, restore = _flat_operands(input, in_features, out_features)
        launch_forward = plan_bsr_forward(x, out, values, block_row_offsets, block_col_indices, bias)
        run = _plan_run(launch_forward, rows, in_features, out_features, restore, input.device.type == "cuda")
        _keep(plans, key, run, input, block_row_offsets)
        launch_forward(x, out, values, block_row_offsets, block_col_indices, bias)
        return out if restore is None else out.view(restore)

    if input.device.type == "cuda":
        return dispatch.bsr_linear(input, values, block_row_offsets, block_col_indices, block_col_offsets,
                                   block_row_indices, block_value_indices, bias, sparse=sparse)
    return sparse()


def nm_linear(plans: dict, input: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor],
              out_features: int, in_features: int) -> Tensor:
    """``sparsekernels.ops.nm_linear`` on arguments for which :func:`applies` holds; ``plans`` as in
    :func:`bsr_linear`."""
    key = (input.shape, input.stride(), input.dtype, values.shape)
    run = _planned(plans, key, input, None)
    if run is not None:
        return run(input, values, positions, bias)

    def sparse() -> Tensor:
        if not _plannable(input, in_features, out_features, values, positions, bias):
            output = nm_forward(input.reshape(-1, in_features), values, positions, n, m, bias)
            return output.view(*input.shape[:-1], out_features)
        rows, x, out, restore = _flat_operands(input, in_features, out_features)
        launch_forward = plan_nm_forward(x, out, values, positions, n, m, bias)
        run = _plan_run(launch_forward, rows, in_features, out_features, restore, input.device.type == "cuda")
        _keep(plans, key, run, input, None)
        launch_forward(x, out, values, positions, bias)
        return out if restore is None else out.view(restore)

    if input.device.type == "cuda":
        return dispatch.nm_linear(input, values, positions, n, m, bias, sparse=sparse)
    return sparse()


def _plannable(input: Tensor, in_features: int, out_features: int, *weights: Optional[Tensor]) -> bool:
    """Whether a plan is worth building: a non-empty output (an empty one needs no launch), and
    contiguous weight tensors, which the planned launch passes as they are (the launchers copy
    non-contiguous ones, which a plan would have to repeat at every call)."""
    return input.numel() // in_features * out_features > 0 and all(
        tensor is None or tensor.is_contiguous() for tensor in weights)


def _plan_run(launch_forward, rows: int, in_features: int, out_features: int, restore: Optional[tuple], cuda: bool):
    """The kept plan: the output allocation and the planned launch, nothing else."""
    if restore is None:
        def run(input, *weights):
            out = input.new_empty((rows, out_features))
            launch_forward(input, out, *weights)
            if cuda:
                dispatch.count_sparse()
            return out
    else:
        def run(input, *weights):
            x = input.reshape(rows, in_features)
            out = x.new_empty((rows, out_features))
            launch_forward(x, out, *weights)
            if cuda:
                dispatch.count_sparse()
            return out.view(restore)
    return run
