"""Weights and optimizer state of a model that may be sharded by FSDP2, as full CPU tensors.

Checkpoints always hold full, unsharded tensors keyed by parameter name, so a run saved
under one strategy and rank count resumes under any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoints import CheckpointError, load_into, load_tensors, load_train_state, resolve_checkpoint
from ..config.presets import load_run_config
from ..models import NestedUNet
from ..models.temporal import is_temporal_parameter
from .growth import load_inner

_FULL = StateDictOptions(full_state_dict=True)
# Gathered to rank 0 only (cpu_offload keeps the full copy off the other ranks).
_FULL_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)


def all_finite(tensors) -> bool:
    """One synchronisation for all tensors (FSDP2 parameters: this rank's shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return bool(torch.stack([torch.isfinite(t.detach()).all() for t in local]).all()) if local else True


def full_weights(module: NestedUNet, sharded: bool) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights; under FSDP a collective whose result only rank 0 holds."""
    if not sharded:
        return {name: value.detach().cpu() for name, value in module.state_dict().items()}
    return get_model_state_dict(module, options=_FULL_ON_MAIN)


def full_model_on_main(module: NestedUNet, sharded: bool, is_main: bool, device: torch.device) -> NestedUNet | None:
    """The whole model on rank 0 (under FSDP an unsharded copy, gathered by a collective every rank
    calls; otherwise ``module`` itself), None on the other ranks."""
    if not sharded:
        return module if is_main else None
    weights = full_weights(module, sharded=True)
    if not is_main:
        return None
    model = NestedUNet(module.config).to(device)
    model.load_state_dict(weights)
    return model


def set_full_weights(module: NestedUNet, tensors: dict[str, torch.Tensor], sharded: bool, source: str | Path) -> None:
    """Load full weights, checked against the model's names and shapes with clear messages."""
    if not sharded:
        load_into(module, tensors, source)
        return
    load_into(NestedUNet(module.config).to("meta"), tensors, source)
    set_model_state_dict(module, tensors, options=_FULL)


def load_weights(module: NestedUNet, path: Path, sharded: bool) -> None:
    set_full_weights(module, load_tensors(path), sharded, path)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name (full tensors, on rank 0 under FSDP)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL_ON_MAIN)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=_FULL)


def init_inner_from(module: NestedUNet, source: str | Path, sharded: bool) -> None:
    """Load another run's EMA weights into the innermost levels of ``module`` (e.g. a 64² model).

    A video model may start from an image run (inflation, paper §4.3): its spatial weights load
    by name and the temporal layers the image model lacks keep their identity initialisation,
    so at step 0 the video model is the image model applied to every frame.
    """
    checkpoint = resolve_checkpoint(source)
    _check_self_condition(module, checkpoint)
    levels = int(load_train_state(checkpoint / "state.pt").get("num_levels", 1))
    tensors = load_tensors(checkpoint / "ema.safetensors")
    optional = is_temporal_parameter if module.config.is_video else None
    if not sharded:
        load_inner(module, module.config.num_levels, tensors, levels, str(checkpoint), optional)
        return
    # Every rank read the file: merge it into a full copy of this model's weights, then reshard.
    merged = NestedUNet(module.config)
    merged.load_state_dict(get_model_state_dict(module, options=_FULL))
    load_inner(merged, module.config.num_levels, tensors, levels, str(checkpoint), optional)
    set_model_state_dict(module, merged.state_dict(), options=_FULL)


def _check_self_condition(module: NestedUNet, checkpoint: Path) -> None:
    """Name the setting behind the first convolutions' shape mismatch between such runs."""
    saved = load_run_config(checkpoint / "config.yaml").model.self_condition
    if saved != module.config.self_condition:
        saved_text, this_text = str(saved).lower(), str(module.config.self_condition).lower()
        raise CheckpointError(
            f"{checkpoint} was trained with model.self_condition={saved_text} and this run has "
            f"model.self_condition={this_text}: each level's first convolution takes a different number of "
            f"channels. Set model.self_condition={saved_text} to start from it."
        )
