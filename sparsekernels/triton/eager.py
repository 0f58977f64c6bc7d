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
re-runs them when one is replaced), so a bad replacement raises the same errors. The fast path runs exactly what the op would run on these arguments: on CUDA the
dense-fallback decision (dispatch.py, a dictionary lookup after the first call) and then the
sparse launcher or ``F.linear``; on CPU tensors (the interpreter, in tests) the sparse launcher.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

from . import dispatch
from .bsr_forward import bsr_forward
from .nm_forward import nm_forward

__all__ = ["applies", "enabled", "bsr_linear", "nm_linear"]

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


def bsr_linear(input: Tensor, values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor,
               block_col_offsets: Tensor, block_row_indices: Tensor, block_value_indices: Tensor,
               bias: Optional[Tensor], out_features: int, in_features: int) -> Tensor:
    """``sparsekernels.ops.bsr_linear`` on arguments for which :func:`applies` holds."""
    if input.device.type == "cuda":
        return dispatch.bsr_linear(input, values, block_row_offsets, block_col_indices, block_col_offsets,
                                   block_row_indices, block_value_indices, bias,
                                   sparse=lambda: _bsr_sparse(input, values, block_row_offsets,
                                                              block_col_indices, bias, out_features, in_features))
    return _bsr_sparse(input, values, block_row_offsets, block_col_indices, bias, out_features, in_features)


def _bsr_sparse(input, values, block_row_offsets, block_col_indices, bias, out_features, in_features) -> Tensor:
    out = bsr_forward(input.reshape(-1, in_features), values, block_row_offsets, block_col_indices, bias)
    return out.view(*input.shape[:-1], out_features)


def nm_linear(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor],
              out_features: int, in_features: int) -> Tensor:
    """``sparsekernels.ops.nm_linear`` on arguments for which :func:`applies` holds."""
    if input.device.type == "cuda":
        return dispatch.nm_linear(input, values, positions, n, m, bias,
                                  sparse=lambda: _nm_sparse(input, values, positions, n, m, bias,
                                                            out_features, in_features))
    return _nm_sparse(input, values, positions, n, m, bias, out_features, in_features)


def _nm_sparse(input, values, positions, n, m, bias, out_features, in_features) -> Tensor:
    out = nm_forward(input.reshape(-1, in_features), values, positions, n, m, bias)
    return out.view(*input.shape[:-1], out_features)
