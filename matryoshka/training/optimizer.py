"""A stage's AdamW: one parameter group, or two when the stage trains the levels it grew at their own
rate (``stages[].grown_lr``): the earlier stage's levels first, then the grown ones."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config.run import StageConfig, TrainConfig
from .growth import inner_module


def grown_parameter_groups(model: nn.Module, total_levels: int, inner_levels: int) -> list[dict[str, Any]]:
    """``model``'s parameters as two optimizer groups: its innermost ``inner_levels`` levels, then the rest."""
    inner = {id(p) for p in inner_module(model, total_levels, inner_levels).parameters()}
    return [
        {"params": [p for p in model.parameters() if id(p) in inner]},
        {"params": [p for p in model.parameters() if id(p) not in inner]},
    ]


def earlier_levels(stages: list[StageConfig], index: int, levels: int) -> int | None:
    """The earlier stage's levels once a ``levels``-level model has grown into stage ``index``; None in the
    first stage, and for a model resumed at the stage's boundary that has not grown yet."""
    return stages[index - 1].levels if index > 0 and levels == stages[index].levels else None


def grown_from(stages: list[StageConfig], index: int, levels: int) -> int | None:
    """The earlier stage's levels if stage ``index``, with a ``levels``-level model, trains the levels it
    grew at a rate of their own (the optimizer's first group); None: one group."""
    stage = stages[index]
    return earlier_levels(stages, index, levels) if stage.grown_lr != stage.lr else None


def build_optimizer(
    model: nn.Module, levels: int, inner_levels: int | None, train: TrainConfig, fused: bool
) -> torch.optim.AdamW:
    """AdamW over ``model`` (``levels`` levels); ``inner_levels``: the earlier stage's, None for one group."""
    params = grown_parameter_groups(model, levels, inner_levels) if inner_levels else model.parameters()
    return torch.optim.AdamW(
        params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay, fused=fused
    )


def set_learning_rates(optimizer: torch.optim.Optimizer, stage: StageConfig, factor: float) -> None:
    """The stage's rates times the schedule's ``factor``: ``lr``, then ``grown_lr`` for a second group."""
    for group, rate in zip(optimizer.param_groups, (stage.lr, stage.grown_lr)):
        group["lr"] = rate * factor
