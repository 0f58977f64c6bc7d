"""Work and traffic of a cell, to turn a time into useful TFLOP/s and GB/s.

Both count only what the sparse computation needs, whoever runs it, so that the numbers of different
implementations of one cell compare directly (the dense baseline does more work than this):

* useful FLOPs: 2 per kept multiply-add, ``2 * M * kept_weights`` per matmul (a training step has
  three: forward, input gradient, weight gradient);
* bytes: each tensor the op must read or write, once: the kept weight values and the pattern's
  index / metadata, ``x``, ``y``, ``dy``, ``dx``, and the kept values of ``dW``.
"""

from __future__ import annotations

from .cases import Case, Op
from .workloads import SparseWeight

MATMULS_PER_OP = {Op.FORWARD: 1, Op.GRAD_INPUT: 1, Op.GRAD_WEIGHT: 1, Op.TRAIN_STEP: 3}


def useful_flops(case: Case, weight: SparseWeight) -> int:
    return 2 * case.rows * weight.kept_weights * MATMULS_PER_OP[case.op]


def bytes_needed(case: Case, weight: SparseWeight) -> int:
    element = weight.masked_dense.element_size()
    rows_in = case.rows * case.in_features * element  # x or dx
    rows_out = case.rows * case.out_features * element  # y or dy
    sparse_weight = weight.value_bytes + weight.index_bytes  # W, or dW with its pattern
    if case.op is Op.TRAIN_STEP:
        # reads x, W, dy; writes y, dx, dW (values only: it shares W's pattern)
        return 2 * rows_in + 2 * rows_out + sparse_weight + weight.value_bytes
    return rows_in + rows_out + sparse_weight
