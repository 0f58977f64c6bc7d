"""Forward dispatch that is never slower than dense: the fastest of the sparse kernels and ``F.linear``.

Rule. For each key ``(layout family, M bucket, out_features, in_features, block size or n:m, density
bucket, candidates, dtype, GPU)``, for float32 with torch's TF32 setting (the tuning key of
autotune.py, without the kernel name: the kernels and cuBLAS multiply float32 in TF32 when it is
on), the forward takes the fastest of

* ``"sparse"``: the Triton op (``torch.ops.sparsekernels_triton.bsr_linear`` / ``nm_linear``);
* ``"cuda"``:   the CUDA C++ op (``torch.ops.sparsekernels.bsr_linear`` / ``nm_linear`` on CUDA
  tensors: csrc/cuda's decode kernels, and the 2:4 sparse-tensor-core GEMM where it applies, see
  docs/cuda.md), a candidate only when the extension was built with CUDA kernels, the backend is
  ``"auto"`` (a forced ``"triton"`` means Triton), the call records no autograd graph for input or
  values (inference; also the forward and input-gradient products inside a transposable 2:4
  layer's op and backward), and only where that op runs on these operands;
* ``"dense"``:  ``F.linear(input, W, bias)`` on the masked dense weight ``W`` (cuBLAS),

decided by one measurement on CUDA the first time a key is seen (every candidate timed with the
tuner's timer, ``triton.testing.do_bench``), stored with the tuning cache (memory and the JSON file,
section ``"dispatch"``), so that later calls and later processes only look it up. Where no
measurement can run (CPU tensors, torch.compile tracing, CUDA graph capture) the path is
``"sparse"``, and nothing is stored. ``SPARSEKERNELS_DENSE_FALLBACK=0`` turns the decision off:
always the Triton kernel (how the GPU tests pin the kernel they test). The front end
(``sparsekernels.triton.bsr_linear`` / ``nm_linear``) routes CUDA tensors through here in eager mode;
CPU tensors (the interpreter) go to the sparse op directly unless a test calls this module.

Why the CUDA kernels compete here rather than by a fixed rule: they cover what Triton cannot reach
(the 2:4 sparse tensor cores; weight-bytes-bound decode kernels at M <= 16), but which of the two
wins depends on shape, dtype and GPU, and a measured choice can never pick the slower one. Why not
under autograd: the decision times the forward only, and the backward follows the forward's path;
the CUDA backend's backward ops are composites over a dense weight (docs/cuda.md), so a training
step through them could lose what the forward won.

Which path ran: :func:`last_path` (the last call) and :data:`path_counts` (totals), for the benchmark.

Dense weight. It is built only when the dense path is taken, by a scatter of the kept values
(``reference.bsr_to_dense`` / ``nm_to_dense``: no host sync, differentiable in ``values``):

* when autograd needs the gradient of ``values`` (grad mode on and ``values.requires_grad``), it is
  rebuilt at every call, so that the gradient flows to the kept values only (the scatter's backward
  is a gather); in training the values change at every step anyway;
* otherwise (inference, ``torch.no_grad``) it is cached per ``values`` tensor (weakly: the cache
  dies with the tensor) and reused while the *stamp* is unchanged: the ``_version`` counter and
  ``data_ptr()`` of ``values`` and of the index tensors it is built from (``block_row_offsets`` and
  ``block_col_indices``, or ``positions``), and those are the same objects. An in-place write
  (``optimizer.step()``, ``values.mul_()``, ``copy_``) bumps ``_version``; assigning new storage
  changes ``data_ptr``; either invalidates the copy. Writes the version counter cannot see (through ``.data`` or
  ``.detach()`` aliases, DLPack, numpy views) are not detected: call :func:`clear_dense_cache` after
  them. Inference-mode tensors have no version counter and are never cached.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .. import backend, reference
from . import autotune

__all__ = [
    "bsr_linear", "nm_linear", "bsr_path", "nm_path", "bsr_dense", "nm_dense", "bsr_cuda", "nm_cuda",
    "count_path", "last_path", "path_counts", "clear_dense_cache", "fallback_enabled", "cuda_candidate",
]

path_counts = {path: 0 for path in autotune.DISPATCH_PATHS}
_last = [None]
_dense_cache = WeakIdKeyDictionary()  # values tensor -> (stamp, weak refs to the index, dense weight)


def last_path() -> Optional[str]:
    """``"sparse"``, ``"cuda"`` or ``"dense"``: the path of the last forward routed here (None before any)."""
    return _last[0]


def count_path(path: str) -> str:
    """Record that a forward took ``path`` (:func:`last_path`, :data:`path_counts`); returns it.
    The eager fast path's kept plans (eager.py) call this for the path they were built for."""
    _last[0] = path
    path_counts[path] += 1
    return path


def fallback_enabled() -> bool:
    """False when ``SPARSEKERNELS_DENSE_FALLBACK=0`` (always the sparse kernel)."""
    return os.environ.get("SPARSEKERNELS_DENSE_FALLBACK", "1").strip().lower() not in ("0", "false", "off", "no")


def cuda_candidate(input: Tensor, values: Tensor) -> bool:
    """Whether the CUDA C++ op competes for this forward (see the rule above)."""
    return (
        input.device.type == "cuda"
        and not (torch.is_grad_enabled() and (input.requires_grad or values.requires_grad))
        and backend.get_backend() == "auto"
        and _cuda_kernels_built()
    )


@functools.cache
def _cuda_kernels_built() -> bool:
    """Whether the extension registered CUDA kernels (fixed for the process: asked once)."""
    return backend.backend_available("cuda")


def clear_dense_cache() -> None:
    """Drop every cached dense weight."""
    _dense_cache.clear()


def _stamp(values: Tensor, index: tuple) -> Optional[tuple]:
    try:
        return tuple((tensor._version, tensor.data_ptr()) for tensor in (values, *index))
    except RuntimeError:  # inference tensors have no version counter
        return None


def _dense_weight(values: Tensor, index: tuple, build) -> Tensor:
    """The masked dense weight ``build(values)``: fresh and differentiable when autograd needs it,
    else cached while the stamp of ``values`` and ``index`` is unchanged."""
    if torch.is_grad_enabled() and values.requires_grad:
        return build(values)
    stamp = _stamp(values, index)
    entry = _dense_cache.get(values) if stamp is not None else None
    # The index tensors must be the same objects too (held weakly): a new index tensor may reuse a
    # freed one's address with the same version count.
    if entry is not None and entry[0] == stamp and all(ref() is tensor for ref, tensor in zip(entry[1], index)):
        return entry[2]
    with torch.no_grad():
        dense = build(values.detach())
    if stamp is not None:
        _dense_cache[values] = (stamp, tuple(weakref.ref(tensor) for tensor in index), dense)
    return dense


def _choose(key_fn, sizes: tuple, input: Tensor, values: Tensor, sparse, cuda, dense_fn, tuner) -> str:
    if torch.compiler.is_compiling() or not all(type(size) is int for size in sizes) or not fallback_enabled():
        return "sparse"
    tuner = tuner or autotune.tuner
    with_cuda = cuda_candidate(input, values)

    def measure() -> dict:
        with torch.no_grad():
            weight = dense_fn()
            sparse()  # a first call tunes the kernel's launch config (if it was not tuned yet): untimed
            times = {"sparse": tuner.timer(sparse)}
            if with_cuda and _runs(cuda):
                times["cuda"] = tuner.timer(cuda)
            times["dense"] = tuner.timer(lambda: F.linear(input.detach(), weight))
        return times

    # The candidates are part of the key (before the dtype, which the tuner expects last): a build
    # without CUDA kernels must not read a "cuda" decision.
    key = key_fn()
    key = key[:-1] + ("sparse+cuda" if with_cuda else "sparse", key[-1])
    return tuner.decide(key, input.device, (input, values), measure)


# Errors that say nothing about whether the CUDA op supports these operands: out of memory during
# the measurement, or a CUDA error that poisons the context. They propagate (nothing is stored).
_TRANSIENT_ERRORS = tuple(
    error for error in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None)) if error
)


def _runs(candidate) -> bool:
    """Whether ``candidate()`` runs on these operands: the CUDA ops refuse some (an unsupported dtype
    or n:m, a GPU the extension was not built for) with an error, which here only means "not a
    candidate" (and is stored with the decision). Transient errors are raised, not stored."""
    try:
        candidate()
    except _TRANSIENT_ERRORS:
        raise
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False
    return True


def _bsr_builder(values: Tensor, index: tuple):
    """(build, sizes): ``build(kept_values)`` scatters kept blocks into the masked dense weight."""
    block_row_offsets, block_col_indices, block_col_offsets = index[:3]
    block_size = values.shape[-1]
    n_block_rows, n_block_cols = block_row_offsets.shape[0] - 1, block_col_offsets.shape[0] - 1
    out_features, in_features = n_block_rows * block_size, n_block_cols * block_size

    def build(kept: Tensor) -> Tensor:
        return reference.bsr_to_dense(kept, block_row_offsets, block_col_indices, out_features, in_features)

    return build, (block_size, n_block_rows, n_block_cols, out_features, in_features)


def bsr_path(input: Tensor, values: Tensor, index: tuple, tuner: Optional[autotune.Tuner] = None) -> str:
    """``"sparse"``, ``"cuda"`` or ``"dense"`` for this block-sparse forward (``index``: the five index
    tensors in op order), by the rule above; decided once per key, nothing counted or run after that."""
    from . import ops

    build, (block_size, n_block_rows, n_block_cols, out_features, in_features) = _bsr_builder(values, index)
    rows = input.numel() // in_features if in_features else 0
    nnz = values.shape[0]
    return _choose(
        lambda: ("bsr", autotune.m_bucket(rows), out_features, in_features, f"b{block_size}",
                 autotune.density_bucket(nnz / max(n_block_rows * n_block_cols, 1)), str(input.dtype)),
        (rows, nnz, in_features), input, values, lambda: ops.bsr_linear(input.detach(), values.detach(), *index),
        lambda: bsr_cuda(input.detach(), values.detach(), index, None), lambda: build(values.detach()), tuner)


def bsr_dense(input: Tensor, values: Tensor, index: tuple, bias: Optional[Tensor]) -> Tensor:
    """The dense path: ``F.linear`` on the masked dense weight (cached as described above; the
    weight is a function of ``values`` and the BSR half of the index, so only those are stamped)."""
    return F.linear(input, _dense_weight(values, index[:2], _bsr_builder(values, index)[0]), bias)


def bsr_cuda(input: Tensor, values: Tensor, index: tuple, bias: Optional[Tensor]) -> Tensor:
    """The CUDA path: the C++ op, whose CUDA implementation is csrc/cuda's (differentiable through
    the op's own autograd)."""
    return torch.ops.sparsekernels.bsr_linear(input, values, *index, bias)


def bsr_linear(input: Tensor, values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor,
               block_col_offsets: Tensor, block_row_indices: Tensor, block_value_indices: Tensor,
               bias: Optional[Tensor] = None, tuner: Optional[autotune.Tuner] = None) -> Tensor:
    """``input @ W.T (+ bias)`` for a block-sparse W by the fastest path of the rule above
    (arguments of ``sparsekernels.ops.bsr_linear``; ``tuner`` for tests)."""
    from . import ops

    index = (block_row_offsets, block_col_indices, block_col_offsets, block_row_indices, block_value_indices)
    path = count_path(bsr_path(input, values, index, tuner))
    if path == "dense":
        return bsr_dense(input, values, index, bias)
    if path == "cuda":
        return bsr_cuda(input, values, index, bias)
    return ops.bsr_linear(input, values, *index, bias)


def nm_path(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int,
            tuner: Optional[autotune.Tuner] = None) -> str:
    """``"sparse"``, ``"cuda"`` or ``"dense"`` for this N:M forward, as :func:`bsr_path`."""
    from . import ops

    out_features, kept = values.shape
    in_features = kept // n * m
    rows = input.numel() // in_features if in_features else 0
    return _choose(
        lambda: ("nm", autotune.m_bucket(rows), out_features, in_features, f"{n}:{m}", round(n / m, 4),
                 str(input.dtype)),
        (rows, out_features, in_features), input, values,
        lambda: ops.nm_linear(input.detach(), values.detach(), positions, n, m),
        lambda: nm_cuda(input.detach(), values.detach(), positions, n, m, None),
        lambda: reference.nm_to_dense(values.detach(), positions, n, m), tuner)


def nm_dense(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    """The dense path of an N:M forward: ``F.linear`` on the masked dense weight (cached)."""
    weight = _dense_weight(values, (positions,),
                           lambda kept_values: reference.nm_to_dense(kept_values, positions, n, m))
    return F.linear(input, weight, bias)


def nm_cuda(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    """The CUDA path of an N:M forward: the C++ op (csrc/cuda), as :func:`bsr_cuda`."""
    return torch.ops.sparsekernels.nm_linear(input, values, positions, n, m, bias)


def nm_linear(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor] = None,
              tuner: Optional[autotune.Tuner] = None) -> Tensor:
    """``input @ W.T (+ bias)`` for an N:M W by the fastest path of the rule above (arguments of
    ``sparsekernels.ops.nm_linear``; ``tuner`` for tests)."""
    from . import ops

    path = count_path(nm_path(input, values, positions, n, m, tuner))
    if path == "dense":
        return nm_dense(input, values, positions, n, m, bias)
    if path == "cuda":
        return nm_cuda(input, values, positions, n, m, bias)
    return ops.nm_linear(input, values, positions, n, m, bias)
