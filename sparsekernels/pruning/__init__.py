"""Pruning masks and scores: which weights a sparse layer keeps.

* ``scores``: importance of every weight, by magnitude ``|w|`` or first-order Taylor ``|w * grad|``,
  and their reduction to one score per block.
* ``masks``: block masks (top-k blocks by score, per-layer density) and N:M masks from scores.
* ``transposable``: N:M masks whose pattern holds along rows and columns of every m x m tile, so the
  transposed weight (the input gradient's operand) is N:M too.
"""

from .masks import block_mask, nm_mask
from .scores import block_scores, magnitude_scores, taylor_scores
from .transposable import transposable_nm_mask, transposable_patterns

__all__ = [
    "block_mask",
    "block_scores",
    "magnitude_scores",
    "nm_mask",
    "taylor_scores",
    "transposable_nm_mask",
    "transposable_patterns",
]
