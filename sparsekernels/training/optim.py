"""Optimizer state that follows a sparse layer's pattern changes.

A pattern change moves kept weights between slots of ``values`` (slots are in row-major order of
the pattern) and brings in new ones. ``SparseLinear.set_pattern`` returns ``source``, the old slot
of every new slot (-1 for a new weight); this module applies the same move to every per-weight
optimizer tensor (Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer``, ...) and zeroes
the entries of new weights, so a regrown weight starts from a clean state. Scalar state (Adam's
``step``) is left alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..nn import _gather_slots

__all__ = ["remap_optimizer_state"]


@torch.no_grad()
def remap_optimizer_state(
    optimizer: Optional[torch.optim.Optimizer], old_param: nn.Parameter, new_param: nn.Parameter, source: Tensor
) -> None:
    """Move ``optimizer``'s state for ``old_param`` to ``new_param`` following ``source``.

    ``new_param`` may be ``old_param`` itself (same number of kept weights: state tensors are
    rewritten in place, so fused/foreach optimizers and captured graphs keep their pointers) or the
    Parameter a re-compression created (it replaces ``old_param`` in the param groups and gets
    resized state). A None optimizer is a no-op.
    """
    if optimizer is None:
        return
    if not isinstance(source, Tensor) or source.dtype != torch.int64 or source.dim() != 1:
        raise TypeError(f"source must be the 1-D int64 tensor set_pattern returns, got {source!r:.80}")
    if new_param is not old_param:
        found = False
        for group in optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                if param is old_param:
                    group["params"][index] = new_param
                    found = True
        if not found:
            raise ValueError("old_param is not among the optimizer's parameters")
    state = optimizer.state.pop(old_param, None) if new_param is not old_param else optimizer.state.get(old_param)
    if not state:
        return
    for key, value in list(state.items()):
        if not isinstance(value, Tensor) or value.shape != old_param.shape or value.dim() == 0:
            continue
        moved = _gather_slots(value, source)
        if moved.shape == value.shape:
            value.copy_(moved)
        else:
            state[key] = moved
    optimizer.state[new_param] = state
