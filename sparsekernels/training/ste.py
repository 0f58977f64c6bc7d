"""Straight-through N:M training with SR-STE (Zhou et al., 2021, "Learning N:M fine-grained
structured sparse neural networks from scratch").

``SRSTELinear`` keeps a dense weight. Each training forward recomputes the N:M mask from the
current magnitudes (optionally transposable) and multiplies by the masked weight; the backward
passes the gradient straight through to every dense weight and adds the SR-STE term
``decay * (1 - mask) * w``, which pulls pruned weights towards zero so the mask settles. The matmul
is dense (a straight-through gradient needs the dense weight gradient anyway); when training is
done, ``finalize_ste_`` swaps every SRSTELinear for an N:M ``SparseLinear`` that runs the sparse
kernels.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import NMMatrix
from ..layouts import NM
from ..nn import SparseLinear
from ..pruning import nm_mask, transposable_nm_mask

__all__ = ["SRSTELinear", "sparsify_ste_", "finalize_ste_"]


class _MaskedWeightSRSTE(torch.autograd.Function):
    @staticmethod
    def forward(weight: Tensor, mask: Tensor, decay: float) -> Tensor:
        return weight * mask

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        weight, mask, decay = inputs
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * weight * (~mask), None, None


class SRSTELinear(nn.Linear):
    """``nn.Linear`` trained N:M-sparse by SR-STE: dense weight, mask recomputed every forward.

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear.
        n, m: the N:M pattern (along in_features).
        decay: SR-STE's lambda (2e-4 in the paper); 0 gives the plain straight-through estimator.
        transposable: use ``transposable_nm_mask`` (m in {2, 4}; out_features a multiple of m too).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, n: int = 2, m: int = 4,
                 decay: float = 2e-4, transposable: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        layout = NM(n, m)
        layout.check_shape(out_features, in_features)
        if not isinstance(transposable, bool):  # bool("no") would be True
            raise TypeError(f"transposable must be a bool, got {transposable!r}")
        if transposable and out_features % m:
            raise ValueError(f"out_features={out_features} must be a multiple of m={m} for a transposable mask")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < math.inf:
            raise ValueError(f"decay must be a float >= 0 (finite, not NaN), got {decay!r}")
        self.n, self.m, self.decay, self.transposable = n, m, float(decay), bool(transposable)

    @classmethod
    def from_linear(cls, linear: nn.Linear, n: int = 2, m: int = 4, decay: float = 2e-4,
                    transposable: bool = False) -> "SRSTELinear":
        """Wrap an existing ``nn.Linear``'s parameters (shared, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, n=n, m=m, decay=decay,
                    transposable=transposable, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer.train(linear.training)

    def mask(self) -> Tensor:
        """The current N:M mask of the dense weight, by magnitude."""
        with torch.no_grad():
            scores = self.weight.detach().abs()
            if self.transposable:
                return transposable_nm_mask(scores, self.n, self.m)
            return nm_mask(scores, self.n, self.m)

    def forward(self, input: Tensor) -> Tensor:
        weight = _MaskedWeightSRSTE.apply(self.weight, self.mask(), self.decay)
        return F.linear(input, weight, self.bias)

    def to_sparse_linear(self) -> SparseLinear:
        """An N:M SparseLinear holding the masked weight (copied); with a transposable mask, a
        layer of layout ``NM(n, m, transposable=True)`` (its input gradient runs on N:M kernels)."""
        matrix = NMMatrix.from_dense(self.weight.detach().clone(), self.n, self.m, mask=self.mask())
        layer = SparseLinear.from_matrix(matrix, None if self.bias is None else self.bias.detach(),
                                         transposable=self.transposable)
        return layer.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}, m={self.m}, decay={self.decay}, transposable={self.transposable}"


def _swap(model: nn.Module, predicate, convert) -> nn.Module:
    swaps = [(fqn, convert(module)) for fqn, module in model.named_modules() if predicate(module, fqn)]
    for fqn, new in swaps:
        if not fqn:
            raise ValueError("model is itself the layer to convert; convert it directly")
        parent_name, _, child_name = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)
    return model


def sparsify_ste_(model: nn.Module, n: int = 2, m: int = 4, filter_fn: Optional[Callable] = None,
                  decay: float = 2e-4, transposable: bool = False) -> nn.Module:
    """Replace ``nn.Linear`` layers (those ``filter_fn(module, fqn)`` accepts) by SRSTELinear, in place.

    Parameters are shared, so an optimizer built before the swap still trains them.
    """
    def accept(module, fqn):
        return (type(module) is nn.Linear) and (filter_fn is None or filter_fn(module, fqn))

    return _swap(model, accept, lambda linear: SRSTELinear.from_linear(linear, n, m, decay, transposable))


def finalize_ste_(model: nn.Module) -> nn.Module:
    """Replace every SRSTELinear by the N:M SparseLinear of its current mask, in place."""
    return _swap(model, lambda module, fqn: isinstance(module, SRSTELinear), SRSTELinear.to_sparse_linear)
