"""Pieces shared by the Triton kernel families: the dot-product helper and launch-time facts.

Why a dot helper: every kernel accumulates in float32 and multiplies tiles with ``tl.dot``. On a GPU
the tiles go to the tensor cores in their storage dtype; float32 tiles are multiplied in full
precision (``input_precision="ieee"``) unless torch allows TF32 for its own float32 matmuls, so
float32 results are not silently computed in TF32. The Triton interpreter (``TRITON_INTERPRET=1``,
how the CPU-only tests run these kernels) multiplies bfloat16 tiles as raw 16-bit integers, so there
the tiles are widened to float32 first; bfloat16 products are exact in float32, so the result is the
same as the tensor-core path up to summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def dot_accumulate(a, b, acc, DOT: tl.constexpr):
    """``acc + a @ b`` in float32, the multiply chosen by ``DOT`` (see :func:`dot_mode`)."""
    if DOT == "widen":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on the host, numpy)."""
    return isinstance(kernel, InterpretedFunction)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """Launch ``kernel`` over ``grid``, traceably (``wrap_triton``) when compiled.

    Nothing runs on meta tensors (shapes only). An interpreted kernel cannot be traced: it reads the
    tensors' memory on the host, so it runs on real tensors only and is skipped on fake ones (shape
    inference, torch.compile), where the results' shapes are all that is asked for; ops.py registers
    such kernels as opaque ops.
    """
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    if any(tensor.device.type == "meta" for tensor in tensors):
        return
    if not is_interpreted(kernel):
        wrap_triton(kernel)[grid](*args, **kwargs)
    elif not any(is_fake(tensor) for tensor in tensors):
        kernel[grid](*args, **kwargs)


def dot_mode(kernel, dtype: torch.dtype) -> str:
    """The ``DOT`` argument of :func:`dot_accumulate` for tiles of ``dtype`` run by ``kernel``.

    ``"widen"`` for bfloat16 under the interpreter; for float32 on a GPU, ``"tf32"`` only when torch's
    own float32 matmuls may use TF32 (``torch.backends.cuda.matmul.allow_tf32``), else ``"ieee"``;
    half-precision tiles always go to the tensor cores as they are (the flag does not apply).
    """
    if is_interpreted(kernel):
        return "widen" if dtype == torch.bfloat16 else "ieee"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def pipeline_stages(bytes_per_stage: int, budget: int = 96 * 1024) -> int:
    """Software-pipelining depth (``num_stages``) whose operand buffers fit ``budget`` bytes of shared
    memory (1 to 3): big float32 tiles (128-blocks) would otherwise exceed what an SM has."""
    return max(1, min(3, budget // max(bytes_per_stage, 1)))


def check_device(kernel, tensor: torch.Tensor, name: str) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU tensors too; meta tensors only
    ask for shapes."""
    if tensor.device.type in ("cuda", "meta") or (is_interpreted(kernel) and tensor.device.type == "cpu"):
        return
    raise ValueError(
        f"the Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
        f"got {name} on {tensor.device}"
    )


# Largest grid along axis 1 (CUDA limit); the kernels put the unbounded row tiles on axis 0.
MAX_GRID_Y = 65535


def target_programs(device: torch.device) -> int:
    """How many programs a launch should have to fill the device: two per SM on a GPU. Under the
    interpreter (CPU tensors) speed does not matter and fewer, larger programs run faster: 1."""
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def rows_block(rows: int) -> int:
    """Tile height over the flattened input rows: small for decode-sized batches, 64 for large ones."""
    if rows <= 16:
        return 16
    if rows <= 32:
        return 32
    return 64
