"""Argument checks for the op front ends and fake kernels (mirrors csrc/bindings/checks.h).

They run before any kernel: a bad argument raises TypeError / ValueError naming it and what was
expected. Costs a few attribute reads, and nothing under torch.compile (traced away).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_operand(operand: Tensor, name: str, weight: Tensor, weight_name: str, last_dim: int, last_name: str) -> None:
    """``operand`` must match ``weight``'s dtype and device (as nn.Linear) and end in ``last_dim``."""
    if not isinstance(operand, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(operand).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{weight_name} must be float32, bfloat16 or float16, got {weight.dtype}")
    if operand.dtype != weight.dtype:
        raise TypeError(
            f"expected {name} and {weight_name} to have the same dtype (as nn.Linear requires), "
            f"got {name} {operand.dtype} and {weight_name} {weight.dtype}"
        )
    if operand.device != weight.device:
        raise ValueError(
            f"expected {name} and {weight_name} on the same device, got {name} on {operand.device} "
            f"and {weight_name} on {weight.device}"
        )
    if operand.dim() < 1 or operand.shape[-1] != last_dim:
        raise ValueError(f"{name}.shape[-1] must equal {last_name}={last_dim}, got shape {tuple(operand.shape)}")


def check_bias(bias: Optional[Tensor], values: Tensor, out_features: int) -> None:
    if bias is None:
        return
    check_operand(bias, "bias", values, "values", out_features, "out_features")
    if bias.dim() != 1:
        raise ValueError(f"bias must have shape [out_features={out_features}], got {tuple(bias.shape)}")


def bsr_features(values: Tensor, block_row_offsets: Tensor, block_col_offsets: Tensor) -> tuple[int, int]:
    """(out_features, in_features) of a block-sparse weight."""
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must have shape [nnz_blocks, block_size, block_size], got {tuple(values.shape)}")
    block_size = values.shape[-1]
    return (block_row_offsets.shape[0] - 1) * block_size, (block_col_offsets.shape[0] - 1) * block_size


def nm_features(values: Tensor, n: int, m: int) -> tuple[int, int]:
    """(out_features, in_features) of an N:M weight."""
    if values.dim() != 2:
        raise ValueError(f"values must have shape [out_features, in_features * n / m], got {tuple(values.shape)}")
    if m not in (2, 4, 8, 16) or not 1 <= n < m:
        raise ValueError(f"need m in (2, 4, 8, 16) and 1 <= n < m, got n={n}, m={m}")
    return values.shape[0], values.shape[1] // n * m
