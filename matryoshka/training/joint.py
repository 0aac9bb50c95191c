"""Joint image and video training: still images mixed into a video run's batches as one-frame clips.

A batch tensor has one frame count, so a (micro-)batch of a video run with ``data.image_source``
is two forward/backward passes: ``round(data.image_fraction x B)`` images as clips of one frame
(every level of their pyramid one frame), then the rest of the batch as clips. Each pass's loss
weighs as its share of the batch, so the step's gradient is the mean over all B samples. The
temporal layers skip one-frame clips (``models/temporal.py``): images train the spatial layers
only, as in Ho et al. 2022 ("Video Diffusion Models", joint training) and MDM's video model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config.run import RunConfig
from ..data import build_dataset
from ..data.config import image_batch_size
from ..data.loader import mix_seed
from ..diffusion.process import MatryoshkaDiffusion
from ..pipeline import build_process
from .batches import IMAGES_SEED, one_frame_clips

Part = tuple[dict, MatryoshkaDiffusion, int]
"""What one forward/backward pass of a step trains on: a batch, its process, its seed."""


class ImageMix:
    """The images of a video run (``data.image_source``): their dataset, process and resumable loader."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.dataset = build_dataset(config.data.image_config())
        self.state: dict[str, Any] = {}
        """The image loader's ``state_dict()`` from the checkpoint resumed (a stream's shard sizes)."""
        self.process: MatryoshkaDiffusion | None = None
        self.batches = None

    def check_classes(self, clip_classes: list[str]) -> None:
        """Class-conditional runs need one class list: an image's label must mean what a clip's does."""
        names = list(getattr(self.dataset, "class_names", []) or [])
        if self.config.data.label != "none" and names != clip_classes:
            raise ValueError(
                f"data.label={self.config.data.label!r}: the images (data.image_source) have the classes "
                f"{names[:5]}..., the clips {clip_classes[:5]}...; both need the same classes in the same order"
            )

    def batch_size(self, batch_size: int) -> int:
        """Images in a batch of ``batch_size`` samples (the rest are clips)."""
        return image_batch_size(batch_size, self.config.data.image_fraction)

    def configure(self, levels: int, mixed_ratio: float | None) -> None:
        """The process of the stage's model on one-frame clips; the loader is remade for the stage's batch."""
        self.process = build_process(self.config, levels, one_frame=True)
        self.process.mixed_ratio = mixed_ratio
        self.state = self.state_dict()
        self.batches = None

    def start(self, make_loader: Callable[..., Any], batch_size: int, clip_seed: int) -> None:
        """``make_loader(dataset, batch_size, seed, state)`` as the clips' loader, with a seed of its own."""
        images = self.batch_size(batch_size)
        self.batches = make_loader(self.dataset, images, mix_seed(clip_seed, IMAGES_SEED), self.state)

    def next_part(self, train_seed: int) -> Part:
        """The next image batch as one-frame clips; its noise and dropout never repeat the clips' draws."""
        return one_frame_clips(next(self.batches)), self.process, mix_seed(train_seed, IMAGES_SEED)

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict() if self.batches is not None else self.state
