"""How the model runs over several processes: DDP replicas or FSDP2 shards (and torch.compile)."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..models import NestedUNet
from ..models.layers import Stage
from .distributed import DistContext


def shard(model: NestedUNet, bf16_params: bool) -> None:
    """FSDP2: each Stage is its own shard unit, then the rest of the model."""
    policy = MixedPrecisionPolicy()
    if bf16_params:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, Stage):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def wrap(model: NestedUNet, dist: DistContext, sharded: bool, compile: bool) -> torch.nn.Module:
    """The module the training step calls: DDP around unsharded replicas, compiled if asked."""
    network: torch.nn.Module = model
    if dist.enabled and not sharded:
        device = next(model.parameters()).device
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        network = torch.compile(network)
    return network
