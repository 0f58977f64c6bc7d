"""Shared helpers of the training tools: finding sparse layers, distributed agreement."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layouts import NM, BlockSparse
from ..nn import SparseLinear


def sparse_layers(
    model: nn.Module, kinds: tuple[type, ...] = (BlockSparse, NM), filter_fn: Optional[Callable] = None
) -> list[tuple[str, SparseLinear]]:
    """``(fqn, layer)`` of every SparseLinear in ``model`` whose layout is one of ``kinds``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [
        (fqn, module) for fqn, module in model.named_modules()
        if isinstance(module, SparseLinear) and isinstance(module.layout, kinds)
        and (filter_fn is None or filter_fn(module, fqn))
    ]
    for fqn, layer in layers:
        if type(layer.values).__name__ == "DTensor" or hasattr(layer.values, "device_mesh"):
            raise NotImplementedError(
                f"{fqn}: pattern updates on FSDP-sharded values are not supported; "
                "use DDP or static sparsity with fully_shard"
            )
    return layers


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (no-op outside a process group)."""
    if distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast_mask(mask: Tensor) -> Tensor:
    """Rank 0's ``mask`` on every rank (no-op outside a process group): one decision everywhere."""
    if not distributed():
        return mask
    as_bytes = mask.to(torch.uint8).contiguous()
    dist.broadcast(as_bytes, src=0)
    return as_bytes.bool()


def check_step_args(**steps: int) -> None:
    for name, value in steps.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
