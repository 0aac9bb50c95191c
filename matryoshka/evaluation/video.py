"""Evaluation of video runs: clips as frames for the feature network, the space-time reference
pyramid, and the temporal measures (docs/video.md#evaluation).

* **Per-frame metrics.** Every frame of every clip at a level is one image: FD, KID,
  precision/recall and the CLIP score compare the frames of generated clips with the frames
  of reference clips, pooled the same way. They say nothing about motion.
* **Temporal measures**, at every level with at least two frames, for the generated clips and
  the reference clips side by side (closer to the reference is better; 0 means static):

  - ``frame_diff``: the mean over clips, consecutive frame pairs, pixels and channels of
    ``|x[f+1] - x[f]|`` in 8-bit levels, divided by 255 (1: every value jumps between 0 and
    255 from each frame to the next);
  - ``frame_dist_<feature>``: the mean over clips and consecutive frame pairs of
    ``1 - cos(phi(x[f+1]), phi(x[f]))``, phi the feature network (a change of content rather
    than of pixels).

Neither is FVD, which needs the I3D video network from a file the user supplies (:mod:`.fvd`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from .errors import EvaluationError
from .features import quantize


@dataclass(frozen=True)
class ClipLayout:
    """What a video model's levels hold: the training clips' length and each level's frames (highest first)."""

    clip_frames: int
    level_frames: tuple[int, ...]

    def stride(self, level: int) -> int:
        """Frames of the training clip per frame of ``level`` (the pyramid keeps every stride-th frame)."""
        return self.clip_frames // self.level_frames[level]


def clip_layout(pipeline) -> ClipLayout | None:
    """The layout of a pipeline's model (None for an image model)."""
    frames = pipeline.process.frames
    return None if frames is None else ClipLayout(pipeline.config.data.frames, tuple(frames))


def run_clip_layout(config, levels: int) -> ClipLayout | None:
    """The layout of a run's innermost ``levels`` levels, from its config alone (no weights)."""
    frames = config.model.frames[:levels][::-1]
    return ClipLayout(config.data.frames, tuple(frames)) if frames else None


def level_name(size: int, frames: int = 0) -> str:
    """``SxS`` for an image level, ``FxSxS`` for a clip level (as the training losses name them)."""
    return f"{frames}x{size}x{size}" if frames else f"{size}x{size}"


def frames_of(clips: Tensor) -> Tensor:
    """(B, C, F, H, W) -> (B·F, C, H, W), clip by clip: the frames of clip 0 first."""
    return clips.transpose(1, 2).flatten(0, 1)


def clip_rows(rows: np.ndarray, frames: int) -> np.ndarray:
    """Rows of :func:`frames_of` holding the frames of the clips at ``rows``."""
    return (np.asarray(rows)[:, None] * frames + np.arange(frames)).reshape(-1)


def pool_clip_levels(clips: Tensor, sizes: Sequence[int], layout: ClipLayout) -> list[Tensor]:
    """The space-time pyramid of training clips (B, C, F, R, R), as the diffusion process makes it:
    level i keeps every ``layout.stride(i)``-th frame from frame 0 and average-pools space to its side."""
    if clips.ndim != 5 or clips.shape[2] != layout.clip_frames:
        raise EvaluationError(f"expected clips of {layout.clip_frames} frames, got shape {tuple(clips.shape)}")
    side = clips.shape[-1]
    levels = []
    for index, size in enumerate(sizes):
        if side % size:
            raise ValueError(f"level side {size} does not divide the clip side {side}")
        kept = clips[:, :, :: layout.stride(index)]
        levels.append(kept if size == side else F.avg_pool3d(kept, (1, side // size, side // size)))
    return levels


@dataclass
class TemporalStats:
    """Running sums of the temporal measures (module docstring) over the clips of one level."""

    frames: int
    clips: int = 0
    diff_sum: float = 0.0
    dist_sum: float = 0.0

    def update(self, clips: Tensor, features: np.ndarray | None = None) -> None:
        """``clips`` (B, C, F, H, W) in [-1, 1]; ``features`` (B·F, dim) of :func:`frames_of` them."""
        count = len(clips)
        if self.frames > 1:
            pixels = quantize(clips)  # the 8-bit values a saved clip holds, as the features see them
            # a step of 2 in [-1, 1] is 255 levels: |difference| / 2 is the fraction of the 8-bit range
            self.diff_sum += float((pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4)).sum()) / 2
            if features is not None:
                vectors = features.astype(np.float64).reshape(count, self.frames, -1)
                vectors /= np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
                cosine = (vectors[:, 1:] * vectors[:, :-1]).sum(-1)
                self.dist_sum += float((1 - cosine).mean(axis=1).sum())
        self.clips += count

    @property
    def frame_diff(self) -> float | None:
        return self.diff_sum / self.clips if self.frames > 1 and self.clips else None

    @property
    def frame_dist(self) -> float | None:
        return self.dist_sum / self.clips if self.frames > 1 and self.clips else None


def video_summary(layout: ClipLayout, reference_clips: int | None) -> dict:
    """The ``video`` section of a report: what the per-frame and temporal numbers are (FVD: ``fvd/<level>``)."""
    return {
        "clip_frames": layout.clip_frames,
        "level_frames": list(layout.level_frames),
        "reference_clips": reference_clips,
        "per_frame": "fd/kid/precision/recall/clip_score over every frame of the clips at each level (not FVD)",
        "frame_diff": "mean |x[f+1] - x[f]| over clips, consecutive frames, pixels, channels; 8-bit values / 255",
        "frame_dist": "mean 1 - cos(phi(x[f+1]), phi(x[f])) over clips and consecutive frames; phi: the features",
    }


def reference_clip_config(spec: str, resolution: int, layout: ClipLayout, run_data=None):
    """The data config of reference clips named by ``spec``: ``train`` (the run's own data),
    ``emoji-motion`` (built in) or a folder of videos, at ``resolution`` without augmentation."""
    from ..data import DataConfig

    if spec == "train":
        return dataclasses.replace(run_data, resolution=resolution, hflip=False, crop="center", shuffle=False)
    if spec == "emoji-motion":  # the sprites a run trained on, if it trained on emoji-motion
        sprites = run_data.sprites if run_data is not None and run_data.source == "emoji-motion" else 0
        return DataConfig(
            source="emoji-motion", resolution=resolution, frames=layout.clip_frames, shuffle=False, sprites=sprites
        )
    if spec == "emoji":
        raise EvaluationError(
            "reference 'emoji' holds images; a video model is measured against clips: 'emoji-motion', 'train', "
            "a folder of videos, or statistics from `mdm eval-stats --run VIDEO_RUN`"
        )
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"reference {spec!r}: no such folder or statistics file")
    if not path.is_dir():
        raise EvaluationError(
            f"reference {spec!r} is neither a folder of videos, a .npz from `mdm eval-stats`, "
            "'emoji-motion' nor 'train'"
        )
    # the run's frame stride (videofolder, video shards): reference clips at the training clips' frame rate
    stride = run_data.frame_stride if run_data is not None else 1
    return DataConfig(
        source="videofolder",
        path=str(path),
        resolution=resolution,
        frames=layout.clip_frames,
        frame_stride=stride,
        shuffle=False,
    )
