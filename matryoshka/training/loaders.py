"""The resumable loaders a stage's steps draw their batches from.

A stage's loader has the stage's batch size and a data order seeded by (data seed, stage),
and starts at the stage's step, so a resumed run reads exactly the batches it would have.
A stream's loader learns its shards' sizes as it reads; that is kept from one stage's loader
to the next and in checkpoints, so a resumed stream skips shards without reading them.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ..config.run import RunConfig
from ..data import make_loader
from ..data.loader import mix_seed
from .distributed import DistContext
from .joint import ImageMix


class StageLoaders:
    """This rank's loader of the run's dataset, and of the images a video run mixes in (``images``)."""

    def __init__(
        self, config: RunConfig, dist: DistContext, dataset, images: ImageMix | None, state: dict[str, Any]
    ) -> None:
        """``state``: the ``data`` entry of the checkpoint resumed (empty for a new run)."""
        self.config, self.dist, self.dataset, self.images = config, dist, dataset, images
        self.state = dict(state)  # a stream's shard sizes: skip, don't read
        if images is not None:
            images.state = self.state.get("images", {})
        self.batches = None
        """The dataset's loader for the current stage; None until its first step."""

    def reset(self) -> None:
        """Drop the loader (the next stage's batch size may differ), keeping what it learned about shards."""
        if self.batches is not None:
            self.state = self.batches.state_dict()
        self.batches = None

    def start(self, stage_index: int, batch_size: int, start_step: int) -> None:
        """The stage's loaders, ``start_step`` loader steps into it; ``batch_size`` counts the mixed-in images."""
        seed = mix_seed(self.config.data.seed, stage_index)
        loader = partial(self._loader, start_step=start_step)
        if self.images is not None:
            self.images.start(loader, batch_size, seed)
            batch_size -= self.images.batch_size(batch_size)
        self.batches = loader(self.dataset, batch_size, seed, self.state)

    def _loader(self, dataset, batch_size: int, seed: int, state: dict[str, Any], start_step: int):
        return make_loader(
            dataset,
            batch_size=batch_size,
            seed=seed,
            shuffle=self.config.data.shuffle,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            start_step=start_step,
            num_workers=self.config.data.num_workers,
            state={"shard_counts": state.get("shard_counts", {})},
        )

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``data`` entry."""
        return {
            **(self.batches.state_dict() if self.batches is not None else self.state),
            **({"images": self.images.state_dict()} if self.images is not None else {}),
        }
