"""The bias gradient shared by all layouts: the fake kernel of ``sparsekernels::linear_bias_grad``, and
the same reduction in torch ops for the backends that have no such op (Triton, reference)."""

from __future__ import annotations

import torch

from torch import Tensor

from .. import _C  # noqa: F401  (loads the op schemas)
from ._checks import FLOAT_DTYPES


@torch.library.register_fake("sparsekernels::linear_bias_grad")
def _linear_bias_grad_fake(grad_output):
    if grad_output.dtype not in FLOAT_DTYPES:
        raise TypeError(f"grad_output must be float32, bfloat16 or float16, got {grad_output.dtype}")
    if grad_output.dim() < 1:
        raise ValueError("grad_output must have at least 1 dimension")
    return grad_output.new_empty((grad_output.shape[-1],))


def bias_grad_reduction(grad_output: Tensor) -> Tensor:
    """``grad_output`` summed over its leading dims in float32, in its dtype: ``linear_bias_grad``."""
    return grad_output.reshape(-1, grad_output.shape[-1]).sum(0, dtype=torch.float32).to(grad_output.dtype)
