"""Gradual magnitude pruning with the cubic schedule of Zhu and Gupta (2017).

Block-sparse ``SparseLinear`` layers start at their current density (1.0 for a layer made with
``BlockSparse(b, 1.0)``, i.e. dense in block form) or ``initial_density``, and every ``every``
steps between ``start_step`` and ``end_step`` keep the top blocks of the schedule's density, chosen
among the blocks they still hold (a pruned block never returns). Each prune re-compresses the layer:
``values`` becomes a smaller Parameter and the kernels skip the pruned blocks from then on, so
training gets cheaper as it goes.

Optimizer handling: pass ``optimizer=`` and the pruner swaps each new Parameter into its param
groups and carries the surviving blocks' state over (``remap_optimizer_state``). Without it, build
the optimizer again after each prune (``pruner.step()`` returns True when it pruned).

Under DDP, the new Parameters are unknown to the DDP wrapper (its gradient buckets hold the old
ones): wrap the module again when ``step()`` returns True,
``ddp = DistributedDataParallel(ddp.module)``. Decisions agree across ranks without communication,
because they depend only on the weights, which DDP keeps identical. FSDP-sharded layers are refused.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..formats import BlockSparseMatrix
from ..layouts import BlockSparse
from ..pruning import block_mask, magnitude_scores, taylor_scores
from ._common import check_step_args, sparse_layers
from .optim import remap_optimizer_state
from .schedules import cubic_density

__all__ = ["GradualPruner"]

_SCORES = ("magnitude", "taylor")


class GradualPruner:
    """Prune block-sparse layers from their initial density to ``final_density`` on a cubic schedule.

    Args:
        model: holds block-sparse SparseLinear layers (e.g. ``sparsify_(model, BlockSparse(32, 1.0))``).
        final_density: in (0, 1].
        start_step, end_step: first and last pruning step (``pruner.step()`` counts steps, one per
            call, after each optimizer step).
        every: prune every this many steps (and at end_step).
        optimizer: optional; its param groups and state follow the re-compressed Parameters.
        initial_density: the schedule's start (default: each layer's density when the pruner is built).
        score: ``"magnitude"`` (block norm of |w|) or ``"taylor"`` (block norm of |w * grad|, needs
            ``values.grad`` at the pruning step).
        filter_fn: ``(layer, fqn) -> bool`` to prune only some layers.
    """

    def __init__(
        self,
        model: nn.Module,
        final_density: float,
        start_step: int,
        end_step: int,
        every: int = 100,
        *,
        optimizer: Optional[torch.optim.Optimizer] = None,
        initial_density: Optional[float] = None,
        score: str = "magnitude",
        filter_fn: Optional[Callable] = None,
    ) -> None:
        check_step_args(start_step=start_step, end_step=end_step, every=every)
        if end_step <= start_step:
            raise ValueError(f"end_step must be > start_step, got start_step={start_step}, end_step={end_step}")
        if every == 0:
            raise ValueError("every must be >= 1")
        if isinstance(final_density, bool) or not isinstance(final_density, (int, float)) or not (
            0.0 < final_density <= 1.0
        ):
            raise ValueError(f"final_density must be a float in (0, 1], got {final_density!r}")
        if initial_density is not None:
            if isinstance(initial_density, bool) or not isinstance(initial_density, (int, float)):
                raise TypeError(f"initial_density must be None or a float in (0, 1], got {initial_density!r}")
            if not 0.0 < initial_density <= 1.0:  # also refuses NaN, which would fail only at a pruning step
                raise ValueError(f"initial_density must be None or a float in (0, 1], got {initial_density!r}")
        if score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
        self.layers = sparse_layers(model, (BlockSparse,), filter_fn)
        if not self.layers:
            raise ValueError("model has no block-sparse SparseLinear layers to prune")
        self.initial_density = {
            fqn: float(initial_density) if initial_density is not None else layer.density for fqn, layer in self.layers
        }
        for fqn, density in self.initial_density.items():
            if density < final_density:
                raise ValueError(f"{fqn}: initial density {density} is below final_density={final_density}")
        self.final_density = float(final_density)
        self.start_step, self.end_step, self.every = start_step, end_step, every
        self.optimizer = optimizer
        self.score = score
        self.step_count = 0

    def density_at(self, step: int, fqn: Optional[str] = None) -> float:
        """The scheduled density at ``step`` (of layer ``fqn``; default: the first layer)."""
        initial = self.initial_density[fqn if fqn is not None else self.layers[0][0]]
        return cubic_density(step, initial, self.final_density, self.start_step, self.end_step)

    def is_pruning_step(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.every == 0 or step == self.end_step

    @torch.no_grad()
    def step(self) -> bool:
        """Count one training step; prune if it is a pruning step. Returns True when any layer shrank."""
        self.step_count += 1
        if not self.is_pruning_step(self.step_count):
            return False
        changed = False
        for fqn, layer in self.layers:
            density = self.density_at(self.step_count, fqn)
            b = layer.layout.block_size
            n_blocks = (layer.out_features // b) * (layer.in_features // b)
            if max(1, round(density * n_blocks)) >= layer.values.shape[0]:
                continue
            weight = layer.dense_weight()
            if self.score == "taylor":
                if layer.values.grad is None:
                    raise RuntimeError(f"{fqn}: score='taylor' needs values.grad at the pruning step")
                pattern = layer.matrix
                grad = BlockSparseMatrix(
                    layer.values.grad, pattern.block_row_offsets, pattern.block_col_indices, pattern.shape,
                    validate=False,
                ).to_dense()
                scores = taylor_scores(weight, grad)
            else:
                scores = magnitude_scores(weight)
            mask = block_mask(scores, b, density, allowed=layer.matrix.block_mask())
            old_param = layer.values
            source = layer.set_pattern(mask)
            remap_optimizer_state(self.optimizer, old_param, layer.values, source)
            changed = True
        return changed

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "initial_density": dict(self.initial_density)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.initial_density.update(state["initial_density"])
