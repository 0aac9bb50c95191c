"""Refuse a model that cannot fit before allocating it (an absurd width would take the machine down)."""

from __future__ import annotations

import os

import torch

from ..models.config import ModelConfig

BYTES_PER_PARAMETER = 5 * 4
"""fp32 weights, EMA weights, gradients and AdamW's two moments: a lower bound without activations."""


def device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def min_parameters(config: ModelConfig) -> int:
    """A lower bound of the parameter count: the two 3x3 convolutions of each residual block.

    Counted from the config, because building even a shape-only (meta) model costs seconds.
    """
    return sum(
        2 * 9 * width * width * blocks
        for level in config.levels
        for width, blocks in zip(level.channels, level.res_blocks, strict=False)
    )


def check_model_fits(config: ModelConfig, device: torch.device, world_size: int = 1, sharded: bool = False) -> None:
    """A ValueError when the training state alone is larger than the device's memory."""
    parameters = min_parameters(config)
    needed = parameters * BYTES_PER_PARAMETER // (world_size if sharded else 1)
    available = device_memory(device)
    if available is not None and needed > available:
        raise ValueError(
            f"the model has over {parameters / 1e9:.1f}G parameters: training it needs at least "
            f"{needed / 2**30:.0f} GiB per process (weights, EMA, gradients, AdamW moments) "
            f"but {device} has {available / 2**30:.0f} GiB; "
            "use smaller model.levels.*.channels"
        )
