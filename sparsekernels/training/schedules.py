"""Schedules: the cubic density ramp of gradual pruning and the cosine decay of RigL's drop fraction."""

from __future__ import annotations

import math

__all__ = ["cubic_density", "cosine_decay"]


def cubic_density(step: int, initial: float, final: float, start_step: int, end_step: int) -> float:
    """Zhu and Gupta's schedule, written for density: ``final + (initial - final) * (1 - p) ** 3``.

    ``p = (step - start_step) / (end_step - start_step)`` clipped to [0, 1]: the density is
    ``initial`` up to start_step, falls fast at first and slowly near the end, and is ``final``
    from end_step on.
    """
    if end_step <= start_step:
        raise ValueError(f"end_step must be > start_step, got start_step={start_step}, end_step={end_step}")
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def cosine_decay(step: int, initial: float, end_step: int) -> float:
    """``initial / 2 * (1 + cos(pi * step / end_step))``, and 0 from end_step on (RigL's drop fraction)."""
    if end_step <= 0:
        raise ValueError(f"end_step must be positive, got {end_step}")
    if step >= end_step:
        return 0.0
    return initial / 2.0 * (1.0 + math.cos(math.pi * step / end_step))
