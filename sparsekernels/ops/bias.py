"""Fake kernel of ``sparsekernels::linear_bias_grad`` (the bias gradient shared by all layouts)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the op schemas)
from ._checks import FLOAT_DTYPES


@torch.library.register_fake("sparsekernels::linear_bias_grad")
def _linear_bias_grad_fake(grad_output):
    if grad_output.dtype not in FLOAT_DTYPES:
        raise TypeError(f"grad_output must be float32, bfloat16 or float16, got {grad_output.dtype}")
    if grad_output.dim() < 1:
        raise ValueError("grad_output must have at least 1 dimension")
    return grad_output.new_empty((grad_output.shape[-1],))
