"""Exponential moving average of the weights (the model that is sampled from)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


def warmup_decay(updates: int, decay: float, span: float = 10.0, floor: float = 0.0) -> float:
    """min(decay, max(floor, (1 + n) / (span + n))) after n updates: roughly the last n / (span - 1)
    steps; a floor 1 - 1/h holds the initial weights for about h steps first."""
    return min(decay, max(floor, (1 + updates) / (span + updates)))


class EMA:
    """Keeps a copy of ``model`` whose parameters trail the trained ones.

    With ``warmup`` the decay of a tensor averaged for n updates is min(decay, (1 + n) / (10 + n)),
    so the average is not dominated by the random initialisation early in training. A level grown
    in a later stage (``restart``) starts its own count, with its decay kept at least
    1 - 1/``grown_hold_steps``: its average then holds its initial weights, a level that returns
    the upsampled inner image, for about that many steps, in which a fresh level's own output is
    mostly speckle (docs/benchmarks.md, ninth round), and follows the warm-up after.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, grown_hold_steps: int = 0) -> None:
        self.decay = decay
        self.warmup = warmup
        self.grown_floor = 1 - 1 / grown_hold_steps if grown_hold_steps else 0.0
        self.updates = 0
        self.started: dict[str, int] = {}
        """Update count at which a tensor joined the average (absent: 0)."""
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self, started: int = 0) -> float:
        """The decay of a tensor that joined the average at update ``started`` (0: from the start)."""
        if not self.warmup:
            return self.decay
        return warmup_decay(self.updates - started, self.decay, floor=self.grown_floor if started else 0.0)

    def restart(self, names: Iterable[str]) -> None:
        """Average these tensors from now on as if training had just begun."""
        for name in names:
            self.started[name] = self.updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = averaged[name]
            if value.dtype.is_floating_point:
                decay = self.current_decay(self.started.get(name, 0))
                target.lerp_(value.detach().to(target.dtype), 1.0 - decay)
            else:
                target.copy_(value)
        self.updates += 1
