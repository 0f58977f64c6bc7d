"""Triton GPU kernels (block-sparse and N:M linear, forward and backward).

One file per kernel family lives here (``bsr_forward.py``, ``bsr_grad_input.py``, ...). They run on
CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``), which is how
the CPU-only test suite checks them. This build has no Triton kernels yet; the ``triton`` backend
reports itself unavailable and ``sparsekernels.set_backend("triton")`` raises.
"""

from __future__ import annotations

from typing import Optional


def unavailable_reason() -> Optional[str]:
    """None when the Triton kernels can run here, else why not."""
    return "the Triton kernels are not part of this build yet"
