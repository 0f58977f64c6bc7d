"""Weight importance scores: magnitude ``|w|``, first-order Taylor ``|w * grad|``, and block scores.

A score tensor has the dense weight's shape ``[out_features, in_features]``; larger means more
important. Scores are float32 whatever the weight dtype, so that ranking bf16/fp16 weights does not
suffer from their coarse rounding.
"""

from __future__ import annotations

from torch import Tensor

from ..formats._common import check_block_size, check_dense_weight

__all__ = ["magnitude_scores", "taylor_scores", "block_scores"]


def magnitude_scores(weight: Tensor) -> Tensor:
    """``|w|`` as float32 ``[out, in]``."""
    check_dense_weight(weight)
    return weight.detach().float().abs()


def taylor_scores(weight: Tensor, grad: Tensor) -> Tensor:
    """``|w * grad|`` as float32: the first-order estimate of the loss change from zeroing each weight."""
    check_dense_weight(weight)
    if not isinstance(grad, Tensor):
        raise TypeError(f"grad must be a torch.Tensor, got {type(grad).__name__}")
    if grad.shape != weight.shape:
        raise ValueError(f"grad must have the weight's shape {list(weight.shape)}, got {list(grad.shape)}")
    return (weight.detach().float() * grad.detach().float()).abs()


def block_scores(scores: Tensor, block_size: int) -> Tensor:
    """One score per ``block_size x block_size`` block: the Frobenius norm of the block's scores.

    ``scores`` is ``[out, in]`` (both multiples of block_size); the result is float32
    ``[out / block_size, in / block_size]``. On magnitude scores this is the block's weight norm,
    the criterion ``BlockSparseMatrix.from_dense`` prunes by.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor [out, in], got {getattr(scores, 'shape', scores)!r}")
    check_block_size(block_size)
    rows, cols = scores.shape
    if rows % block_size or cols % block_size:
        raise ValueError(f"scores shape {list(scores.shape)} must be multiples of block_size={block_size}")
    blocks = scores.detach().float().reshape(rows // block_size, block_size, cols // block_size, block_size)
    return blocks.square().sum(dim=(1, 3)).sqrt()
