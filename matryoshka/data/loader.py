"""Deterministic, sharded, resumable infinite batch iterator.

Sample order
------------
For epoch ``e`` the dataset order is ``randperm(N)`` drawn from a generator
seeded with ``mix(seed, e)`` (or ``arange(N)`` without shuffling). The
permutation is padded by wrapping around to ``P = ceil(N / world_size) *
world_size`` entries and rank ``r`` takes positions ``r, r + W, r + 2W, ...``:
every rank gets ``P / W`` samples per epoch, ranks never overlap except for the
``P - N`` wrapped padding entries, and their union is the whole dataset.

Each rank reads its epochs back to back as one endless stream; batch ``k`` is
stream positions ``[k * B, (k + 1) * B)``. Nothing is dropped: a batch may span
the end of one epoch and the start of the next. So the position of batch ``k``
is ``epoch = k * B // (P / W)``, ``offset = k * B % (P / W)``, and resuming at
any global step jumps straight there without touching the data.

Augmentation (random crop / flip) is seeded per sample from ``(seed, epoch,
index)``, so a resumed run sees exactly the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64 rounds)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


class ShardPlan:
    """Which dataset indices rank ``rank`` reads, epoch by epoch."""

    def __init__(self, dataset_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if dataset_size <= 0:
            raise ValueError(f"dataset is empty (size {dataset_size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset_size = dataset_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.per_rank = math.ceil(dataset_size / world_size)
        self.padding = self.per_rank * world_size - dataset_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """The full (unpadded) order of epoch ``epoch``."""
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        g = torch.Generator()
        g.manual_seed(mix_seed(self.seed, epoch, 0x5EED))
        return torch.randperm(self.dataset_size, generator=g)

    def rank_indices(self, epoch: int, rank: int | None = None) -> torch.Tensor:
        """Indices read by ``rank`` (default: this plan's rank) in ``epoch``; length ``per_rank``."""
        perm = self.permutation(epoch)
        if self.padding:
            reps = math.ceil(self.padding / self.dataset_size)
            perm = torch.cat([perm] + [perm] * reps)[: self.per_rank * self.world_size]
        r = self.rank if rank is None else rank
        return perm[r :: self.world_size]

    def position(self, sample: int) -> tuple[int, int]:
        """(epoch, offset within this rank's epoch) of stream position ``sample``."""
        return divmod(sample, self.per_rank)

    def augment_seed(self, epoch: int, index: int) -> int:
        return mix_seed(self.seed, epoch, index, 0xA06)


class ResumableSampler(Sampler):
    """Endless sampler yielding ``(index, augmentation seed)`` from a stream position."""

    def __init__(self, plan: ShardPlan, start_sample: int = 0):
        self.plan = plan
        self.start_sample = int(start_sample)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = self.plan.position(self.start_sample)
        while True:
            idx = self.plan.rank_indices(epoch).tolist()
            for i in idx[offset:]:
                yield (i, self.plan.augment_seed(epoch, i))
            epoch, offset = epoch + 1, 0


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """List of sample dicts -> {"image": (B,3,H,W), "label": (B,), "caption": [str], "index": (B,)}."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
        "caption": [s["caption"] for s in samples],
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),
    }


def check_loader_args(batch_size: int, start_step: int, num_workers: int) -> None:
    """The arguments every loader (map-style or streaming) refuses the same way."""
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(start_step) < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


class ResumableLoader:
    """Infinite iterator of collated batches (see module docstring).

    ``step`` is the global step of the next batch; ``position`` is its
    ``(epoch, offset)`` where ``offset`` counts samples into this rank's share of
    the epoch. Save ``state_dict()`` (or just the step) in checkpoints and pass
    ``start_step`` to :func:`make_loader` to resume.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        check_loader_args(batch_size, start_step, num_workers)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.plan = ShardPlan(len(dataset), seed, rank, world_size, shuffle)
        self.start_step = int(start_step)
        self.step = int(start_step)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self._iter: Iterator | None = None
        self._loader: DataLoader | None = None

    # ------------------------------------------------------------------ position
    @property
    def steps_per_epoch(self) -> float:
        """Batches per epoch for this rank (fractional: batches may span epochs)."""
        return self.plan.per_rank / self.batch_size

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, sample offset in this rank's epoch) of the next batch."""
        return self.plan.position(self.step * self.batch_size)

    @property
    def epoch(self) -> int:
        return self.position[0]

    @property
    def offset(self) -> int:
        return self.position[1]

    def state_dict(self) -> dict[str, int]:
        epoch, offset = self.position
        return {
            "step": self.step,
            "epoch": epoch,
            "offset": offset,
            "batch_size": self.batch_size,
            "seed": self.plan.seed,
            "rank": self.plan.rank,
            "world_size": self.plan.world_size,
            "dataset_size": self.plan.dataset_size,
        }

    def indices_for_step(self, step: int) -> list[int]:
        """Dataset indices of the batch at global ``step`` (before bad-item substitution)."""
        out: list[int] = []
        pos = step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = self.plan.position(pos)
            take = self.plan.rank_indices(epoch)[offset : offset + self.batch_size - len(out)].tolist()
            out += take
            pos += len(take)
        return out

    # ----------------------------------------------------------------- iteration
    def _start(self) -> None:
        sampler = ResumableSampler(self.plan, self.step * self.batch_size)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = False
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        self._loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            **kwargs,
        )
        self._iter = iter(self._loader)

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._start()
        batch = next(self._iter)
        self.step += 1
        return batch

    def close(self) -> None:
        """Stop worker processes (a later ``next`` restarts from the current step)."""
        it, self._iter, self._loader = self._iter, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def make_loader(
    dataset,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    num_workers: int = 0,
    shuffle: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    state: dict[str, Any] | None = None,
):
    """Infinite, deterministic, sharded, resumable batch iterator over ``dataset``.

    Batches are dicts ``{"image": float32 (B,3,H,W), "label": int64 (B,),
    "caption": list[str], "index": int64 (B,)}``. ``start_step`` resumes exactly
    at that global step (no data is read to get there). A streaming dataset gets a
    :class:`~matryoshka.data.stream_loader.StreamLoader`; ``state`` (its earlier
    ``state_dict()``) lets it skip shards it already knows the size of.
    """
    if getattr(dataset, "streaming", False):
        from .stream_loader import StreamLoader

        return StreamLoader(
            dataset,
            batch_size,
            seed,
            rank=rank,
            world_size=world_size,
            start_step=start_step,
            num_workers=num_workers,
            shuffle=shuffle,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            state=state,
        )
    return ResumableLoader(
        dataset,
        batch_size,
        seed,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        num_workers=num_workers,
        shuffle=shuffle,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
    )
