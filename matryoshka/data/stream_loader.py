"""Resumable batch iterator over a streaming source (:class:`~matryoshka.data.streaming.StreamingShards`).

Same interface as :class:`~matryoshka.data.loader.ResumableLoader` where it makes sense
(``step``, ``state_dict()``, ``close()``), but positions are per reader: see the
module docstring of :mod:`matryoshka.data.streaming`.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from .loader import check_loader_args


class StreamLoader:
    """Infinite iterator of collated batches from a streaming dataset.

    ``state``: a previous ``state_dict()`` (e.g. from a checkpoint). Only its shard sample
    counts are used, so that whole shards before the start position are skipped without
    being opened; the position itself follows from ``start_step``.
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
        state: dict[str, Any] | None = None,
    ):
        check_loader_args(batch_size, start_step, num_workers)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.shuffle = shuffle
        self.step = int(start_step)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.counts: dict[str, int] = {}
        self.positions: dict[int, dict[str, Any]] = {}
        if state:
            self._check_state(state)
            self.counts.update(state.get("shard_counts", {}))
        self._iter: Iterator | None = None
        self._loader: DataLoader | None = None

    def _check_state(self, state: dict[str, Any]) -> None:
        layout = {
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_workers": max(self.num_workers, 1),
            "seed": self.seed,
        }
        changed = {k: (state[k], v) for k, v in layout.items() if k in state and state[k] != v}
        if changed:
            warnings.warn(
                f"streaming data: {changed} differ from the checkpoint (old, new): the run goes on from step "
                f"{self.step} with the new layout, which reads a different sample order than the old run would have",
                stacklevel=3,
            )

    @property
    def steps_per_epoch(self) -> float | None:
        """Unknown for a stream: epochs end when a reader's shards run out."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Step, layout, each reader's last reported position and every shard sample count learned so far."""
        return {
            "step": self.step,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": max(self.num_workers, 1),
            "positions": copy.deepcopy(self.positions),
            "shard_counts": dict(self.counts),
        }

    def _start(self) -> None:
        self.dataset.layout = {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "start_step": self.step,
            "shuffle": self.shuffle,
            "counts": dict(self.counts),
        }
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        # batch_size=None: each reader makes whole batches, so a batch never mixes readers
        self._loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **kwargs
        )
        self._iter = iter(self._loader)

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._start()
        batch = next(self._iter)
        meta = batch.pop("_stream")
        self.positions[meta["slot"]] = meta["position"]
        self.counts.update(meta["counts"])
        log = self.dataset.skip_log
        for reason, n in meta["skips"].counts.items():
            log.counts[reason] += n
            examples = log.examples.setdefault(reason, [])
            examples.extend(meta["skips"].examples.get(reason, [])[: log.max_examples - len(examples)])
        self.dataset.samples_read += meta["read"]
        self.step += 1
        return batch

    def close(self) -> None:
        """Stop worker processes (a later ``next`` restarts from the current step)."""
        it, self._iter, self._loader = self._iter, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):  # pragma: no cover - best effort
        # at interpreter exit the worker machinery may already be gone
        with contextlib.suppress(Exception):
            self.close()
