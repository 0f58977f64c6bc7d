"""Which implementation runs an op: backend choice per device, overridable for tests and debugging.

Backends:

* ``"cpu"``: the C++ kernels of csrc/cpu (CPU tensors).
* ``"cuda"``: the CUDA C++ kernels of csrc/cuda (CUDA tensors; built when torch has CUDA).
* ``"triton"``: the Triton kernels of sparsekernels/triton (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``).
* ``"reference"``: dense masked math in PyTorch (sparsekernels.reference); any device, slow.

By default (``"auto"``) CPU tensors use ``"cpu"`` and CUDA tensors the best GPU backend that is
built, falling back to ``"reference"`` when none is. ``set_backend(name)`` or the environment
variable ``SPARSEKERNELS_BACKEND`` (read at import) forces one backend for every op.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

_forced: str = "auto"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: Optional[str]) -> None:
    """Force ``name`` for every op (``None`` or ``"auto"`` restores the per-device choice)."""
    global _forced
    name = "auto" if name is None else _check_name(name)
    if name != "auto" and not backend_available(name):
        raise RuntimeError(f"backend {name!r} is not available in this build: {_why_unavailable(name)}")
    _forced = name


def get_backend() -> str:
    """The forced backend, or ``"auto"``."""
    return _forced


def backend_available(name: str) -> bool:
    return _why_unavailable(_check_name(name)) is None


def _why_unavailable(name: str) -> Optional[str]:
    if name in ("auto", "cpu", "reference"):
        return None
    if name == "triton":
        from . import triton as triton_backend

        return triton_backend.unavailable_reason()
    if name == "cuda":
        from . import _C  # noqa: F401  (the extension registers CUDA kernels when built with them)

        if not torch._C._dispatch_has_kernel_for_dispatch_key("sparsekernels::bsr_linear", "CUDA"):
            return "sparsekernels was built without CUDA kernels"
        return None
    return f"unknown backend {name!r}"


def cpu_isa() -> str:
    """The instruction set the C++ CPU kernels run in this process: ``"generic"`` (portable C++),
    ``"avx2"`` (AVX2 + FMA), ``"avx512"``, ``"avx512_bf16"`` (AVX-512 plus VDPBF16PS pair dot
    products for bfloat16, on CPUs without AMX such as AMD Zen 4 and 5) or ``"amx"`` (AVX-512 plus
    AMX-BF16 tiles for bfloat16).

    Chosen once per process from what the CPU supports;
    ``SPARSEKERNELS_CPU_ISA=generic|avx2|avx512|avx512_bf16``
    (set before the first CPU kernel call) caps it lower, e.g. to compare paths.
    """
    from . import _C

    return _C.cpu_isa()


def resolve_backend(device: torch.device) -> str:
    """The backend that runs an op whose operands live on ``device``."""
    if _forced != "auto":
        if _forced == "cpu" and device.type not in ("cpu", "meta"):
            raise RuntimeError(f"backend 'cpu' was forced, but the operands are on {device}")
        if _forced == "cuda" and device.type not in ("cuda", "meta"):
            raise RuntimeError(f"backend 'cuda' was forced, but the operands are on {device}")
        return _forced
    if device.type in ("cpu", "meta"):
        return "cpu"
    if device.type == "cuda":
        for candidate in ("triton", "cuda"):
            if backend_available(candidate):
                return candidate
    return "reference"


_env_choice = os.environ.get("SPARSEKERNELS_BACKEND")
if _env_choice:
    set_backend(_env_choice)
