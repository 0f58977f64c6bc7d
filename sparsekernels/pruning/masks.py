"""Block and N:M masks from importance scores.

Masks are bool tensors: a block mask is ``[out / b, in / b]`` (what
``BlockSparseMatrix.from_block_mask`` and ``SparseLinear.set_pattern`` take), an N:M mask is the
element mask ``[out, in]`` with exactly n True in every group of m consecutive inputs (what
``NMMatrix.from_dense(weight, n, m, mask=...)`` takes). Ties go to the earlier position, as in the
formats' own magnitude pruning, so the same scores always give the same mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..formats._common import check_density
from ..formats.block_sparse import top_blocks_mask
from ..layouts import NM
from .scores import block_scores

__all__ = ["block_mask", "nm_mask"]


def _check_scores(scores: Tensor) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {list(scores.shape)}")


def block_mask(scores: Tensor, block_size: int, density: float, *, allowed: Optional[Tensor] = None) -> Tensor:
    """Keep the ``max(1, round(density * n_blocks))`` blocks of largest score (block Frobenius norm).

    ``scores`` is an element score ``[out, in]``. ``allowed`` (bool block mask) restricts the choice
    to those blocks, e.g. the currently kept ones when pruning gradually; it must hold at least as
    many blocks as are kept.
    """
    _check_scores(scores)
    per_block = block_scores(scores, block_size)
    density = check_density(density)
    if allowed is not None:
        if not isinstance(allowed, Tensor) or allowed.shape != per_block.shape or allowed.dtype != torch.bool:
            raise ValueError(f"allowed must be a bool block mask of shape {list(per_block.shape)}")
        keep = max(1, round(density * per_block.numel()))
        if int(allowed.sum()) < keep:
            raise ValueError(f"allowed holds {int(allowed.sum())} blocks, fewer than the {keep} to keep")
        per_block = torch.where(allowed, per_block, torch.full_like(per_block, -1.0))
    return top_blocks_mask(per_block, density)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the n largest scores of every group of m consecutive inputs (ties to the lower column)."""
    _check_scores(scores)
    NM(n, m).check_shape(*scores.shape)
    rows, cols = scores.shape
    groups = scores.detach().float().reshape(rows, cols // m, m)
    groups = torch.where(torch.isnan(groups), torch.full_like(groups, float("inf")), groups)
    top = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, top, True)
    return mask.reshape(rows, cols)
