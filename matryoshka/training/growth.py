"""Growing a nested model outward (progressive training, paper §3.4, SPEC §6).

In a model with L levels, the innermost n levels live under the parameter prefix
``inner_unet.`` repeated L - n times. Growing builds the larger model (its new outer
level has zero-initialised adapters, so it starts as the old model plus an outer UNet
whose features do not disturb the inner one) and copies the old weights, EMA and
optimizer moments into that prefix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..checkpoints import CheckpointError, load_into


def inner_prefix(total_levels: int, inner_levels: int) -> str:
    if not 1 <= inner_levels <= total_levels:
        raise ValueError(f"cannot place a {inner_levels}-level model inside a {total_levels}-level one")
    return "inner_unet." * (total_levels - inner_levels)


def inner_module(model: nn.Module, total_levels: int, inner_levels: int) -> nn.Module:
    for _ in range(total_levels - inner_levels):
        model = model.inner_unet
    return model


def load_inner(
    model: nn.Module,
    total_levels: int,
    tensors: dict[str, torch.Tensor],
    inner_levels: int,
    source: str,
    optional: Callable[[str], bool] | None = None,
) -> None:
    """Load a smaller model's weights into the innermost ``inner_levels`` levels of ``model``
    (``optional``: names that may be missing, see ``load_into``)."""
    try:
        load_into(inner_module(model, total_levels, inner_levels), tensors, source, optional)
    except CheckpointError as error:
        prefix = inner_prefix(total_levels, inner_levels)
        where = f" (its tensors go under '{prefix}')" if prefix else ""
        raise CheckpointError(f"{error}\ncannot initialise the inner {inner_levels} level(s){where}") from None


def carry_optimizer_state(
    old_optimizer: torch.optim.Optimizer,
    old_model: nn.Module,
    new_optimizer: torch.optim.Optimizer,
    new_model: nn.Module,
    prefix: str,
) -> int:
    """Copy Adam moments of every kept parameter to its place in the grown model; returns the count."""
    new_parameters = dict(new_model.named_parameters())
    carried = 0
    for name, parameter in old_model.named_parameters():
        state = old_optimizer.state.get(parameter)
        if not state:
            continue
        target = new_parameters[prefix + name]
        new_optimizer.state[target] = {
            key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()
        }
        carried += 1
    return carried
