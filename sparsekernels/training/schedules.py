"""Schedules: the cubic density ramp of gradual pruning and the cosine decay of RigL's drop fraction."""

from __future__ import annotations

import math

__all__ = ["cubic_density", "cosine_decay"]


def _check_finite(name: str, value: float) -> None:
    # NaN passes every comparison a caller might make (0 < nan <= 1 is False, but so is nan > 1),
    # and would then reach a pruning threshold or a drop count as NaN: refuse it here.
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def cubic_density(step: int, initial: float, final: float, start_step: int, end_step: int) -> float:
    """Zhu and Gupta's schedule, written for density: ``final + (initial - final) * (1 - p) ** 3``.

    ``p = (step - start_step) / (end_step - start_step)`` clipped to [0, 1]: the density is
    ``initial`` up to start_step, falls fast at first and slowly near the end, and is ``final``
    from end_step on.
    """
    _check_finite("initial", initial)
    _check_finite("final", final)
    if end_step <= start_step:
        raise ValueError(f"end_step must be > start_step, got start_step={start_step}, end_step={end_step}")
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def cosine_decay(step: int, initial: float, end_step: int) -> float:
    """``initial / 2 * (1 + cos(pi * step / end_step))``, and 0 from end_step on (RigL's drop fraction)."""
    _check_finite("initial", initial)
    if end_step <= 0:
        raise ValueError(f"end_step must be positive, got {end_step}")
    if step >= end_step:
        return 0.0
    return initial / 2.0 * (1.0 + math.cos(math.pi * step / end_step))
