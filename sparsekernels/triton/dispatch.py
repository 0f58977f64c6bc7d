"""Forward dispatch that is never slower than dense: the sparse Triton kernel or ``F.linear``.

Rule. For each key ``(layout family, M bucket, out_features, in_features, block size or n:m, density
bucket, dtype, GPU)``, for float32 with torch's TF32 setting (the tuning key of autotune.py, without
the kernel name: both the kernel and cuBLAS multiply float32 in TF32 when it is on) the forward
takes the faster of

* ``"sparse"``: the Triton op (``torch.ops.sparsekernels_triton.bsr_linear`` / ``nm_linear``), and
* ``"dense"``:  ``F.linear(input, W, bias)`` on the masked dense weight ``W`` (cuBLAS),

decided by one measurement on CUDA the first time a key is seen (both paths timed with the tuner's
timer, ``triton.testing.do_bench``), stored with the tuning cache (memory and the JSON file, section
``"dispatch"``), so that later calls and later processes only look it up. Where no measurement can
run (CPU tensors, torch.compile tracing, CUDA graph capture) the path is ``"sparse"``, and nothing is
stored. ``SPARSEKERNELS_DENSE_FALLBACK=0`` always takes the sparse path. The front end
(``sparsekernels.triton.bsr_linear`` / ``nm_linear``) routes CUDA tensors through here in eager mode;
CPU tensors (the interpreter) go to the sparse op directly unless a test calls this module.

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

import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .. import reference
from . import autotune

__all__ = [
    "bsr_linear", "nm_linear", "bsr_path", "nm_path", "bsr_dense", "nm_dense", "count_path", "last_path",
    "path_counts", "clear_dense_cache", "fallback_enabled",
]

path_counts = {"sparse": 0, "dense": 0}
_last = [None]
_dense_cache = WeakIdKeyDictionary()  # values tensor -> (stamp, weak refs to the index, dense weight)


def last_path() -> Optional[str]:
    """``"sparse"`` or ``"dense"``: the path of the last forward routed here (None before any)."""
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


def _choose(key_fn, sizes: tuple, input: Tensor, values: Tensor, sparse, dense_fn, tuner) -> str:
    if torch.compiler.is_compiling() or not all(type(size) is int for size in sizes) or not fallback_enabled():
        return "sparse"
    tuner = tuner or autotune.tuner

    def measure() -> tuple:
        with torch.no_grad():
            weight = dense_fn()
            sparse()  # a first call tunes the kernel's launch config (if it was not tuned yet): untimed
            sparse_ms = float(tuner.timer(sparse))
            dense_ms = float(tuner.timer(lambda: F.linear(input.detach(), weight)))
        return sparse_ms, dense_ms

    return tuner.decide(key_fn(), input.device, (input, values), measure)


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
    """``"sparse"`` or ``"dense"`` for this block-sparse forward (``index``: the five index tensors in
    op order), by the rule above; decided once per key, nothing counted or run after that."""
    from . import ops

    build, (block_size, n_block_rows, n_block_cols, out_features, in_features) = _bsr_builder(values, index)
    rows = input.numel() // in_features if in_features else 0
    nnz = values.shape[0]
    return _choose(
        lambda: ("bsr", autotune.m_bucket(rows), out_features, in_features, f"b{block_size}",
                 autotune.density_bucket(nnz / max(n_block_rows * n_block_cols, 1)), str(input.dtype)),
        (rows, nnz, in_features), input, values, lambda: ops.bsr_linear(input.detach(), values.detach(), *index),
        lambda: build(values.detach()), tuner)


def bsr_dense(input: Tensor, values: Tensor, index: tuple, bias: Optional[Tensor]) -> Tensor:
    """The dense path: ``F.linear`` on the masked dense weight (cached as described above; the
    weight is a function of ``values`` and the BSR half of the index, so only those are stamped)."""
    return F.linear(input, _dense_weight(values, index[:2], _bsr_builder(values, index)[0]), bias)


def bsr_linear(input: Tensor, values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor,
               block_col_offsets: Tensor, block_row_indices: Tensor, block_value_indices: Tensor,
               bias: Optional[Tensor] = None, tuner: Optional[autotune.Tuner] = None) -> Tensor:
    """``input @ W.T (+ bias)`` for a block-sparse W by the faster of the Triton kernel and dense
    ``F.linear`` (arguments of ``sparsekernels.ops.bsr_linear``; ``tuner`` for tests)."""
    from . import ops

    index = (block_row_offsets, block_col_indices, block_col_offsets, block_row_indices, block_value_indices)
    if count_path(bsr_path(input, values, index, tuner)) == "dense":
        return bsr_dense(input, values, index, bias)
    return ops.bsr_linear(input, values, *index, bias)


def nm_path(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int,
            tuner: Optional[autotune.Tuner] = None) -> str:
    """``"sparse"`` or ``"dense"`` for this N:M forward, as :func:`bsr_path`."""
    from . import ops

    out_features, kept = values.shape
    in_features = kept // n * m
    rows = input.numel() // in_features if in_features else 0
    return _choose(
        lambda: ("nm", autotune.m_bucket(rows), out_features, in_features, f"{n}:{m}", round(n / m, 4),
                 str(input.dtype)),
        (rows, out_features, in_features), input, values,
        lambda: ops.nm_linear(input.detach(), values.detach(), positions, n, m),
        lambda: reference.nm_to_dense(values.detach(), positions, n, m), tuner)


def nm_dense(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    """The dense path of an N:M forward: ``F.linear`` on the masked dense weight (cached)."""
    weight = _dense_weight(values, (positions,),
                           lambda kept_values: reference.nm_to_dense(kept_values, positions, n, m))
    return F.linear(input, weight, bias)


def nm_linear(input: Tensor, values: Tensor, positions: Tensor, n: int, m: int, bias: Optional[Tensor] = None,
              tuner: Optional[autotune.Tuner] = None) -> Tensor:
    """``input @ W.T (+ bias)`` for an N:M W by the faster of the Triton kernel and dense ``F.linear``
    (arguments of ``sparsekernels.ops.nm_linear``; ``tuner`` for tests)."""
    from . import ops

    if count_path(nm_path(input, values, positions, n, m, tuner)) == "dense":
        return nm_dense(input, values, positions, n, m, bias)
    return ops.nm_linear(input, values, positions, n, m, bias)
