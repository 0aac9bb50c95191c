"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", Eq. 2).

Every prediction is pushed away from a weaker model's: ``weak + w (strong - weak)``. Unlike
classifier-free guidance it needs no condition, so it improves unconditional models too; the
weak model is the same network with less training (an earlier EMA snapshot of the run).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class Autoguided(nn.Module):
    """A pyramid model (``PyramidModel``) whose outputs are ``weak + weight (strong - weak)`` per level.

    The combination is taken on the raw outputs, which every parameterisation maps affinely to x0 at
    a fixed z, so it is the same as guiding x0, eps or v. A weak model with fewer levels (a snapshot
    from before the run grew) sees the innermost levels; the outer ones keep the strong model's output.
    """

    def __init__(self, strong: nn.Module, weak: nn.Module, weight: float) -> None:
        super().__init__()
        if weak.config.num_levels > strong.config.num_levels:
            raise ValueError(
                f"the guide has {weak.config.num_levels} levels, more than the model it guides "
                f"({strong.config.num_levels})"
            )
        self.strong, self.weak, self.weight = strong, weak, float(weight)

    @property
    def config(self):
        return self.strong.config

    def forward(self, z: list[Tensor], t: Tensor, cond: Any = None, **extra: Any) -> list[Tensor]:
        strong = list(self.strong(z, t, cond, **extra))
        outer = len(z) - self.weak.config.num_levels
        inner_extra = {key: list(value)[outer:] for key, value in extra.items() if value is not None}
        weak = self.weak(list(z)[outer:], t, cond, **inner_extra)
        return strong[:outer] + [w + self.weight * (s - w) for s, w in zip(strong[outer:], weak)]
