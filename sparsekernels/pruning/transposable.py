"""Transposable N:M masks: n kept in every group of m along rows AND along columns.

The weight is cut into m x m tiles; in each tile every row and every column keeps exactly n
entries. Then both W (groups along in_features) and W.T (groups along out_features) are N:M, so
the input gradient ``grad_output @ W`` can run on N:M kernels as well as the forward.

Exact and fast for the useful cases, m in {2, 4}: every valid tile pattern is enumerated once
(90 for 2:4, 24 for 1:4 and 3:4, 2 for 1:2), the kept score of every pattern in every tile is one
batched matmul ``tiles[T, m*m] @ patterns[m*m, P]``, and the best pattern is an argmax. So the
mask maximises the kept score tile by tile, not approximately. A 14336 x 4096 weight has 3.7M
tiles; they are scored in chunks to bound memory. For m >= 8 the pattern set is astronomically
large (about 1.2e11 for 4:8) and this module raises ValueError rather than silently returning a
heuristic.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch import Tensor

from ..layouts import NM

__all__ = ["transposable_nm_mask", "transposable_patterns"]

_SUPPORTED_M = (2, 4)
_CHUNK_TILES = 1 << 18  # tiles scored per matmul: 2^18 x 90 float32 scores = 94 MB at most


@lru_cache(maxsize=None)
def _patterns_cpu(n: int, m: int) -> Tensor:
    rows = [tuple(1 if j in kept else 0 for j in range(m)) for kept in itertools.combinations(range(m), n)]
    valid = [
        tile for tile in itertools.product(rows, repeat=m)
        if all(sum(row[j] for row in tile) == n for j in range(m))
    ]
    return torch.tensor(valid, dtype=torch.bool).reshape(len(valid), m * m)


def transposable_patterns(n: int = 2, m: int = 4) -> Tensor:
    """Every m x m bool tile with n True per row and per column, as ``[P, m, m]`` (P=90 for 2:4)."""
    NM(n, m)
    if m not in _SUPPORTED_M:
        raise ValueError(f"transposable masks support m in {_SUPPORTED_M}, got m={m}")
    return _patterns_cpu(n, m).reshape(-1, m, m).clone()


def transposable_nm_mask(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Bool ``[out, in]`` mask, N:M along rows and columns, keeping the largest total score per tile.

    ``scores`` is ``[out, in]`` (e.g. ``magnitude_scores(weight)``) with both sizes multiples of m.
    Ties between patterns go to the first in enumeration order, so the result is deterministic.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {list(scores.shape)}")
    NM(n, m)
    if m not in _SUPPORTED_M:
        raise ValueError(f"transposable masks support m in {_SUPPORTED_M}, got m={m}")
    rows, cols = scores.shape
    if rows % m or cols % m or rows == 0 or cols == 0:
        raise ValueError(f"scores shape {list(scores.shape)} must be positive multiples of m={m} in both dims")
    patterns = _patterns_cpu(n, m).to(scores.device)
    pattern_weights = patterns.float().T.contiguous()  # [m*m, P]
    tiles = (
        scores.detach().float().reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)
    )
    # NaN scores would poison every pattern's sum; rank them as largest instead (kept, visible).
    tiles = torch.nan_to_num(tiles, nan=float("inf"), posinf=torch.finfo(torch.float32).max)
    tiles = tiles.clamp(max=torch.finfo(torch.float32).max / (m * m))
    best = torch.empty(tiles.shape[0], dtype=torch.int64, device=scores.device)
    for start in range(0, tiles.shape[0], _CHUNK_TILES):
        chunk = tiles[start:start + _CHUNK_TILES]
        best[start:start + _CHUNK_TILES] = (chunk @ pattern_weights).argmax(dim=1)
    mask_tiles = patterns[best]  # [T, m*m]
    return mask_tiles.reshape(rows // m, cols // m, m, m).permute(0, 2, 1, 3).reshape(rows, cols)
