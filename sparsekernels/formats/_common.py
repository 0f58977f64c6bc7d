"""Helpers shared by the sparse formats: argument checks and index dtype choice."""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from ..layouts import BLOCK_SIZES

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT32_MAX = 2**31 - 1


def index_dtype_for(*largest_values: int) -> torch.dtype:
    """int32 when every index value (and offset) fits in it, else int64."""
    return torch.int32 if max(largest_values) <= INT32_MAX else torch.int64


def is_meta(tensor: Tensor) -> bool:
    """Whether ``tensor`` lives on the meta device: it has shapes and dtypes but no data, so only
    metadata can be checked or built (a pattern's contents are unknown there)."""
    return tensor.device.type == "meta"


def check_shape_pair(shape) -> tuple[int, int]:
    """``(out_features, in_features)`` as ints; TypeError unless ``shape`` is two ints (no bools)."""
    try:
        out_features, in_features = shape
        if isinstance(out_features, bool) or isinstance(in_features, bool):
            raise TypeError
        return operator.index(out_features), operator.index(in_features)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be two ints (out_features, in_features), got {shape!r}") from None


def check_block_size(block_size: int) -> int:
    """TypeError unless ``block_size`` is an int (a float 16.0 or a bool is refused), ValueError
    unless it is one of BLOCK_SIZES."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int in {BLOCK_SIZES}, got {block_size!r}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    return block_size


def check_dense_weight(weight: Tensor, name: str = "weight") -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {weight.dtype}")


def check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in (0, 1], got {density!r}")
    if not 0.0 < float(density) <= 1.0:  # also refuses NaN
        raise ValueError(f"density must be in (0, 1], got {density}")
    return float(density)


def check_mask(mask: Tensor, expected_shapes: tuple[tuple[int, ...], ...], what: str) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) not in expected_shapes:
        shapes = " or ".join(str(list(shape)) for shape in expected_shapes)
        raise ValueError(f"mask must have shape {shapes} ({what}), got {list(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"mask must be a bool (or integer 0/1) tensor, got {mask.dtype}")
        mask = mask != 0
    return mask
