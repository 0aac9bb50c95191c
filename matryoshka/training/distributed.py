"""Process-group setup for runs launched by torchrun (DDP or FSDP2), and rank-0 helpers."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# Sampling grids or evaluating thousands of images at 256² on rank 0 can take far longer than the
# collective timeout that catches a dead rank; the other ranks wait for it in a gloo group with this one.
RANK0_WORK_TIMEOUT = timedelta(hours=12)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    rank0_work_group: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str) -> torch.device:
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def run_on_main(self, work: Callable[[], T]) -> T | None:
        """Run ``work`` on rank 0 while the other ranks wait as long as it takes (None on them)."""
        try:
            return work() if self.is_main else None
        finally:
            if self.enabled:  # also when rank 0 failed, so the others are released and see the failure
                dist.barrier(group=self.rank0_work_group)

    def mean(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Average scalars over ranks (for logging)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        return {k: float(v) / self.world_size for k, v in zip(keys, packed.tolist())}

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on any (e.g. a stop signal seen by one rank)."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def init_distributed(device: str = "auto", timeout_minutes: float = 10.0) -> DistContext:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    context = DistContext(rank, world_size, local_rank)
    use_cuda = context.device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
            **({"device_id": torch.device("cuda", local_rank)} if use_cuda else {}),
        )
    context.rank0_work_group = dist.new_group(backend="gloo", timeout=RANK0_WORK_TIMEOUT)
    return context


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
