"""Learning-rate schedules as a multiplier of the base rate, counted in optimizer steps."""

from __future__ import annotations

import math


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, schedule: str = "constant", min_ratio: float = 0.1
) -> float:
    """Linear warm-up to 1, then constant or cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule '{schedule}'; choose constant or cosine")
