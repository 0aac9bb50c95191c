"""Exponential moving average of the weights (the model that is sampled from)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


def warmup_decay(updates: int, decay: float, span: float = 10.0) -> float:
    """min(decay, (1 + n) / (span + n)) after n updates: roughly the last n / (span - 1) steps."""
    return min(decay, (1 + updates) / (span + updates))


class EMA:
    """Keeps a copy of ``model`` whose parameters trail the trained ones.

    With ``warmup`` the decay of a tensor averaged for n updates is min(decay, (1 + n) / (10 + n)),
    so the average is not dominated by the random initialisation early in training. A level grown
    in a later stage (``restart``) starts its own count, or with ``grown_warmup=False`` is averaged
    at ``decay`` from its first update: its average then holds its initial weights, a level that
    returns the upsampled inner image, for ~1/(1 - decay) steps, in which a fresh level's own
    output is mostly speckle (docs/benchmarks.md, ninth round).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, grown_warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.grown_warmup = grown_warmup
        self.updates = 0
        self.started: dict[str, int] = {}
        """Update count at which a tensor joined the average (absent: 0)."""
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self, started: int = 0) -> float:
        """The decay of a tensor that joined the average at update ``started`` (0: from the start)."""
        if not self.warmup or (started and not self.grown_warmup):
            return self.decay
        return warmup_decay(self.updates - started, self.decay)

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
