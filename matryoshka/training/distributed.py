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
        device = check_device(requested)
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
        return bool(self.max(float(flag), device))

    def max(self, value: float, device: torch.device) -> float:
        """The largest of the ranks' values, on every rank (e.g. the exit code of a failed rank)."""
        if not self.enabled:
            return value
        packed = torch.tensor([float(value)], device=device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        return float(packed.item())

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` (any picklable object) on every rank, e.g. its refusal message."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.rank0_work_group)
        return box[0]


def check_device(requested: str) -> torch.device:
    """``train.device`` as a device that exists here, or a ValueError saying why not."""
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(
            f"train.device={requested!r} is not a device name (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(
                f"train.device={requested!r}: no CUDA device is available here; use train.device=auto or cpu"
            )
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"train.device={requested!r}: there are only {count} CUDA devices here (cuda:0 to cuda:{count - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device={requested!r}: MPS is not available here; use train.device=auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"train.device={requested!r}: training runs on cpu, cuda or mps")
    return device


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
