"""Dynamic sparse training: RigL (Evci et al., 2020) and SET (Mocanu et al., 2018).

Every ``update_every`` steps, until ``end_step``, each sparse layer drops the kept blocks (or, for
N:M layers, kept positions) of smallest magnitude and grows as many new ones: where the dense
weight gradient is largest (RigL) or at random (SET). The fraction dropped decays from
``drop_fraction`` to 0 on a cosine. What stays fixed, by construction:

* the number of kept weights, so ``values`` keeps its shape and identity (updated in place, as are
  the index buffers): optimizer state sizes, DDP buckets and captured CUDA graphs stay valid;
* regrown weights start at 0 and their optimizer state (Adam moments, momentum) is zeroed; weights
  that stay keep their value and state (moved to their new slot);
* a just-dropped block is never regrown in the same update (growth picks among the blocks that
  were not kept before it), so every update with something to drop changes the mask.

Layers with a transposable N:M layout (``NM(n, m, transposable=True)``) are refused with a
ValueError naming them: drop-and-grow per row group would break the column condition.

The dense gradient ``dW = grad_output^T @ input`` is never formed on ordinary steps: hooks that
capture it are installed only for the forward/backward that precedes an update, and removed after.
Under DDP the captured gradients are summed over ranks and rank 0's new mask is broadcast, so every
rank holds the same pattern (magnitudes already agree, since DDP keeps weights identical).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..layouts import NM, BlockSparse
from ..nn import SparseLinear
from ..pruning import block_scores
from ._common import all_reduce_, broadcast_mask, check_step_args, sparse_layers
from .optim import remap_optimizer_state
from .schedules import cosine_decay

__all__ = ["RigL", "SET"]


class RigL:
    """Drop-and-grow for every SparseLinear of ``model``; call ``.step()`` after each optimizer step.

    Args:
        model: holds SparseLinear layers (block-sparse and/or N:M); may be wrapped in DDP.
        optimizer: its per-weight state is moved with the weights and zeroed for regrown ones (None:
            no optimizer state to fix).
        update_every: steps between mask updates.
        drop_fraction: fraction of kept blocks/positions dropped at step 0, decayed on a cosine.
        end_step: no updates from this step on.
        filter_fn: ``(layer, fqn) -> bool`` selects layers (default: all).
        seed: seeds random growth (SET) identically on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        update_every: int = 100,
        drop_fraction: float = 0.3,
        end_step: int = 10_000,
        *,
        filter_fn: Optional[Callable] = None,
        seed: int = 0,
    ) -> None:
        check_step_args(update_every=update_every, end_step=end_step, seed=seed)
        if update_every == 0:
            raise ValueError("update_every must be >= 1")
        if end_step == 0:
            raise ValueError("end_step must be >= 1")
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not (
            0.0 <= drop_fraction <= 1.0
        ):
            raise ValueError(f"drop_fraction must be a float in [0, 1], got {drop_fraction!r}")
        self.layers = sparse_layers(model, filter_fn=filter_fn)
        if not self.layers:
            raise ValueError("model has no SparseLinear layers")
        transposable = [fqn for fqn, layer in self.layers if isinstance(layer.layout, NM) and layer.layout.transposable]
        if transposable:
            # Drop-and-grow refills each row group on its own; keeping n per column group as well is
            # a matching problem per tile that it does not solve, so it refuses rather than break the mask.
            raise ValueError(
                f"{type(self).__name__} does not keep N:M masks transposable; these layers have a transposable "
                f"layout: {', '.join(transposable)}. Exclude them with filter_fn"
            )
        self.optimizer = optimizer
        self.update_every, self.drop_fraction, self.end_step = update_every, float(drop_fraction), end_step
        self.seed = seed
        self.step_count = 0
        self._dense_grads: dict[str, Tensor] = {}
        self._hooks: list = []
        self._arm_if_next_is_update()

    # ------------------------------------------------------------------ schedule
    def is_update_step(self, step: int) -> bool:
        return step > 0 and step % self.update_every == 0 and step < self.end_step

    @property
    def capturing(self) -> bool:
        """True when the next forward/backward must run in eager mode to capture the dense gradient.

        RigL's hooks do not run inside a ``torch.compile``d graph (hooks added after compilation are
        not traced), so with a compiled model call the plain module on these steps::

            output = (model if rigl.capturing else compiled)(input)
        """
        return bool(self._hooks)

    def drop_fraction_at(self, step: int) -> float:
        return cosine_decay(step, self.drop_fraction, self.end_step)

    # ------------------------------------------------------------------ gradient capture
    def _arm_if_next_is_update(self) -> None:
        if self.is_update_step(self.step_count + 1) and not self._hooks and self._needs_gradient():
            for fqn, layer in self.layers:
                self._hooks.append(layer.register_forward_hook(self._capture_hook(fqn)))

    def _needs_gradient(self) -> bool:
        return True

    def _capture_hook(self, fqn: str):
        def hook(module: SparseLinear, args, output: Tensor) -> None:
            if not output.requires_grad:
                return
            input = args[0].detach()

            def on_grad(grad_output: Tensor) -> None:
                dense = grad_output.reshape(-1, grad_output.shape[-1]).float().T @ input.reshape(
                    -1, input.shape[-1]
                ).float()
                if fqn in self._dense_grads:
                    self._dense_grads[fqn] += dense
                else:
                    self._dense_grads[fqn] = dense

            output.register_hook(on_grad)

        return hook

    def _disarm(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ update
    def _grow_scores(self, fqn: str, layer: SparseLinear) -> Tensor:
        """Score ``[out, in]`` of every weight for growth (RigL: |dense gradient|)."""
        grad = self._dense_grads.get(fqn)
        if grad is None:
            raise RuntimeError(
                f"{fqn}: no gradient was captured before the RigL update at step {self.step_count}; "
                "call rigl.step() once after every optimizer.step(), with a backward pass in between, "
                "and run the uncompiled model while rigl.capturing is True (hooks do not run in compiled graphs)"
            )
        return all_reduce_(grad).abs()

    @torch.no_grad()
    def step(self) -> bool:
        """Count one training step; update masks if it is an update step. Returns True if it updated."""
        self.step_count += 1
        updated = False
        if self.is_update_step(self.step_count):
            self._disarm()
            fraction = self.drop_fraction_at(self.step_count)
            for fqn, layer in self.layers:
                grow = self._grow_scores(fqn, layer)
                if isinstance(layer.layout, BlockSparse):
                    new_mask = _drop_and_grow_blocks(layer, grow, fraction)
                else:
                    new_mask = _drop_and_grow_nm(layer, grow, fraction)
                new_mask = broadcast_mask(new_mask)
                source = layer.set_pattern(new_mask)
                remap_optimizer_state(self.optimizer, layer.values, layer.values, source)
            self._dense_grads.clear()
            updated = True
        self._arm_if_next_is_update()
        return updated

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self._disarm()
        self._dense_grads.clear()
        self.step_count, self.seed = int(state["step_count"]), int(state["seed"])
        self._arm_if_next_is_update()


class SET(RigL):
    """Like RigL, but grows at random (uniform over the positions not kept), with no gradient needed.

    The random choice is seeded by ``(seed, step)``, so every rank and every resumed run grows the
    same positions.
    """

    def _needs_gradient(self) -> bool:
        return False

    def _grow_scores(self, fqn: str, layer: SparseLinear) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step_count * 7919 + _stable_hash(fqn))
        scores = torch.rand(layer.out_features, layer.in_features, generator=generator)
        return scores.to(layer.values.device)


def _stable_hash(text: str) -> int:
    value = 0
    for char in text:
        value = (value * 131 + ord(char)) % 1_000_000_007
    return value


def _lowest(scores: Tensor, eligible: Tensor, count: int) -> Tensor:
    """Bool mask of the ``count`` lowest scores among ``eligible`` (ties to the earlier position)."""
    masked = torch.where(eligible, scores, torch.full_like(scores, float("inf"))).flatten()
    order = torch.argsort(masked, stable=True)[:count]
    chosen = torch.zeros(masked.shape[0], dtype=torch.bool, device=scores.device)
    chosen[order] = True
    return chosen.reshape(scores.shape) & eligible


def _drop_and_grow_blocks(layer: SparseLinear, grow_scores: Tensor, fraction: float) -> Tensor:
    b = layer.layout.block_size
    kept = layer.matrix.block_mask()
    nnz, total = int(kept.sum()), kept.numel()
    count = min(int(round(fraction * nnz)), total - nnz)
    if count <= 0:
        return kept
    magnitude = block_scores(layer.dense_weight().abs(), b)
    drop = _lowest(magnitude, kept, count)
    grow = _lowest(-block_scores(grow_scores, b), ~kept, count)
    return (kept & ~drop) | grow


def _drop_and_grow_nm(layer: SparseLinear, grow_scores: Tensor, fraction: float) -> Tensor:
    """Drop the lowest-magnitude kept positions layer-wide, then refill each group it touched.

    A group can give up at most ``m - n`` positions (it has only that many to grow into), so the
    kept positions of rank >= m - n inside their group (by ascending magnitude) are not candidates.
    """
    n, m = layer.layout.n, layer.layout.m
    rows, cols = layer.out_features, layer.in_features
    kept = layer.dense_mask().reshape(rows, cols // m, m)
    nnz = rows * cols // m * n
    count = int(round(fraction * nnz))
    if count <= 0:
        return kept.reshape(rows, cols)
    magnitude = layer.dense_weight().abs().float().reshape(rows, cols // m, m)
    kept_magnitude = torch.where(kept, magnitude, torch.full_like(magnitude, float("inf")))
    rank_in_group = torch.argsort(torch.argsort(kept_magnitude, dim=-1, stable=True), dim=-1)
    drop = _lowest(magnitude, kept & (rank_in_group < m - n), count)
    dropped_per_group = drop.sum(dim=-1, keepdim=True)
    growable = torch.where(~kept, grow_scores.float().reshape(rows, cols // m, m), torch.full_like(magnitude, -1.0))
    grow_rank = torch.argsort(torch.argsort(growable, dim=-1, descending=True, stable=True), dim=-1)
    grow = ~kept & (grow_rank < dropped_per_group)
    return ((kept & ~drop) | grow).reshape(rows, cols)
