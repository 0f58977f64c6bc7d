"""Triton GPU kernels (block-sparse and N:M linear, forward and backward).

One file per kernel family (``bsr_forward.py``, ``bsr_grad_input.py``, ``bsr_grad_values.py`` and the
three ``nm_*.py``) holds a kernel and its launcher, ``_common.py`` what they share, ``ops.py``
exposes them as ``torch.library.triton_op`` ops in the ``sparsekernels_triton`` namespace with their
own autograd. They run on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``), which is how the CPU-only test suite checks them.

The kernel modules are imported on first use, not with the package: ``triton.jit`` decides between
compiling and interpreting when a kernel is defined, so ``TRITON_INTERPRET`` must be set before that,
and importing sparsekernels should not pay for importing Triton.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

import torch
from torch import Tensor

__all__ = ["bsr_linear", "nm_linear", "unavailable_reason"]


def _interpreting() -> bool:
    """Whether the kernels run (or, not imported yet, will run) under the Triton interpreter."""
    kernels = sys.modules.get(__name__ + ".bsr_forward")
    if kernels is not None:  # decided when they were defined, whatever the environment says now
        from ._common import is_interpreted

        return is_interpreted(kernels._bsr_forward_kernel)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


_triton_installed: Optional[bool] = None


def unavailable_reason() -> Optional[str]:
    """None when the Triton kernels can run here, else why not. (Runs on every op call on CUDA
    tensors through the backend choice, so the package lookup is done once.)"""
    global _triton_installed
    if _triton_installed is None:
        _triton_installed = importlib.util.find_spec("triton") is not None
    if not _triton_installed:
        return "the triton package is not installed (pip install 'sparsekernels[triton]')"
    if not torch.cuda.is_available() and not _interpreting():
        return ("no CUDA GPU is available (set TRITON_INTERPRET=1 before the kernels are first used to run "
                "them on CPU tensors, slowly)")
    return None


def _ops():
    from . import ops

    return ops


def bsr_linear(input: Tensor, values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor,
               block_col_offsets: Tensor, block_row_indices: Tensor, block_value_indices: Tensor,
               bias: Optional[Tensor] = None) -> Tensor:
    """``torch.ops.sparsekernels_triton.bsr_linear`` (same arguments as ``sparsekernels.ops.bsr_linear``);
    CUDA tensors go through the dense-fallback dispatch (dispatch.py), which may run ``F.linear``,
    except under torch.compile (the sparse op, which Inductor traces)."""
    if input.device.type == "cuda" and not torch.compiler.is_compiling():
        from . import dispatch

        return dispatch.bsr_linear(input, values, block_row_offsets, block_col_indices, block_col_offsets,
                                   block_row_indices, block_value_indices, bias)
    return _ops().bsr_linear(input, values, block_row_offsets, block_col_indices, block_col_offsets,
                             block_row_indices, block_value_indices, bias)


def nm_linear(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int,
              bias: Optional[Tensor] = None) -> Tensor:
    """``torch.ops.sparsekernels_triton.nm_linear`` (same arguments as ``sparsekernels.ops.nm_linear``);
    CUDA tensors go through the dense-fallback dispatch (dispatch.py), which may run ``F.linear``,
    except under torch.compile (the sparse op, which Inductor traces)."""
    if input.device.type == "cuda" and not torch.compiler.is_compiling():
        from . import dispatch

        return dispatch.nm_linear(input, values, positions, n, m, bias)
    return _ops().nm_linear(input, values, positions, n, m, bias)
