"""Is a result right? Every implementation's output against a dense float32 reference.

The reference multiplies the cell's own inputs and masked weight (already rounded to the cell's
dtype), upcast to float32, with plain ``torch`` matmuls; an implementation that accumulates in
float32 then differs only by summation order and the final rounding to its dtype. The tolerance is
relative to the output's scale (its largest magnitude), per dtype, a few times those rounding
errors: loose enough for any correct kernel, far tighter than a dropped block or a misplaced index.
A result that fails is reported WRONG and never gets a speedup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .cases import Op
from .workloads import Inputs, SparseWeight

# Largest error allowed, as a fraction of max |reference|.
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


@dataclass(frozen=True)
class Verdict:
    correct: bool
    max_abs_error: Optional[float]  # largest |actual - reference| over all outputs; None if non-finite
    max_rel_error: Optional[float]  # the same, each output divided by its own scale; None if non-finite
    tolerance: float  # the bound on max_rel_error


def reference_outputs(op: Op, weight: SparseWeight, inputs: Inputs) -> tuple[Tensor, ...]:
    """What ``op`` must return, in float32, in the canonical form of :mod:`bench.implementations`:
    ``(y,)``, ``(dx,)``, ``(dW,)`` with dW dense and zero off the pattern, or ``(y, dx, dW)``."""
    w = weight.masked_dense.float()
    x, grad_output = inputs.x.float(), inputs.grad_output.float()

    def y() -> Tensor:
        return torch.nn.functional.linear(x, w)

    def grad_x() -> Tensor:
        return grad_output @ w

    def grad_w() -> Tensor:
        return (grad_output.t() @ x).masked_fill_(~weight.mask, 0.0)

    if op is Op.FORWARD:
        return (y(),)
    if op is Op.GRAD_INPUT:
        return (grad_x(),)
    if op is Op.GRAD_WEIGHT:
        return (grad_w(),)
    return y(), grad_x(), grad_w()


def check(actual: tuple[Tensor, ...], expected: tuple[Tensor, ...], dtype: torch.dtype) -> Verdict:
    """Compare outputs pairwise; shapes must match and every error must be within tolerance."""
    tolerance = RELATIVE_TOLERANCE[dtype]
    if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        raise ValueError(
            f"output shapes {[tuple(a.shape) for a in actual]} differ from {[tuple(e.shape) for e in expected]}"
        )
    max_abs, max_rel = 0.0, 0.0
    for output, reference in zip(actual, expected):
        if output.numel() == 0:
            continue
        error = (output.float() - reference).abs().max().item()
        scale = max(reference.abs().max().item(), torch.finfo(torch.float32).tiny)
        if error != error or error == float("inf"):  # NaN or Inf in the output
            return Verdict(False, None, None, tolerance)
        max_abs, max_rel = max(max_abs, error), max(max_rel, error / scale)
    return Verdict(max_rel <= tolerance, max_abs, max_rel, tolerance)
