"""Learning-rate schedules as a multiplier of the base rate."""

from __future__ import annotations

import math


def lr_factor(
    step: int,
    warmup_steps: int,
    progress: float,
    schedule: str = "constant",
    min_ratio: float = 0.1,
    cooldown: float = 0.2,
) -> float:
    """Linear warm-up over ``warmup_steps``, then constant, or a cosine or linear decay to ``min_ratio``,
    or ("cooldown") constant until the last ``cooldown`` of the budget and a linear decay over it.

    ``progress`` in [0, 1] is how far the stage is through its budget after the warm-up: the
    larger of its fraction of steps and, for a time-limited stage or run, of its minutes, so a
    run stopped by ``train.max_minutes`` ends its decay at the deadline instead of never.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max(0.0, progress))
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if schedule == "cooldown":
        remaining = min(1.0, (1 - progress) / cooldown) if cooldown else 1.0
        return min_ratio + (1 - min_ratio) * remaining
    raise ValueError(f"unknown lr schedule '{schedule}'; choose constant, cosine, linear or cooldown")
