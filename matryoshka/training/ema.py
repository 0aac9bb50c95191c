"""Exponential moving average of the weights (the model that is sampled from)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps a copy of ``model`` whose parameters trail the trained ones.

    With ``warmup`` the decay after n updates is min(decay, (1 + n) / (10 + n)), so the
    average is not dominated by the random initialisation early in training.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        averaged = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = averaged[name]
            if value.dtype.is_floating_point:
                target.lerp_(value.detach().to(target.dtype), 1.0 - decay)
            else:
                target.copy_(value)
        self.updates += 1
