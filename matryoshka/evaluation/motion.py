"""Which way does a clip's sprite move? A centroid tracker for the motion-direction benchmark.

The clips of ``emoji-motion`` (and what a model trained on them should make) are a sprite on a
plain background. The background colour is the median of the clip's border pixels (a sprite
covers a small part of the border, even where it enters or leaves); the sprite in a frame is
every pixel that differs from it by more than ``threshold`` in some channel, and its position is
their centroid. The net motion is the least-squares slope of the centroid over the frames times
the clip's duration (every frame counts, so one badly drawn frame does not decide it); a clip whose
net motion is shorter than ``min_shift`` of its side, or that shows a sprite in fewer than two
frames, has no direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DIRECTIONS = ("left", "right", "up", "down")
"""The motions of emoji-motion with a direction ("moving left", ...), in image coordinates y grows down."""
THRESHOLD = 0.15
"""A sprite pixel differs from the background by more than this in some channel (values in [0, 1])."""
MIN_SHIFT = 0.125
"""Net motion shorter than this fraction of the side is no motion (emoji-motion's sprites travel 0.5)."""


@dataclass
class Track:
    """A clip's sprite: per-frame centroids (x, y) in pixels (NaN where no sprite), net motion, direction."""

    centroids: np.ndarray
    dx: float
    dy: float
    direction: str | None


def as_frames(clip: torch.Tensor | np.ndarray) -> np.ndarray:
    """(F, H, W, 3) floats in [0, 1] from a (C, F, H, W) tensor in [-1, 1] or (F, H, W, 3) uint8 frames."""
    if isinstance(clip, torch.Tensor):
        if clip.dim() != 4 or clip.shape[0] != 3:
            raise ValueError(f"expected a clip (3, F, H, W) in [-1, 1], got shape {tuple(clip.shape)}")
        return ((clip.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).numpy()
    frames = np.asarray(clip)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames.astype(np.float32) / 255


def background(frames: np.ndarray) -> np.ndarray:
    """(3,) median colour of the border pixels of every frame."""
    border = np.concatenate(
        [frames[:, 0], frames[:, -1], frames[:, 1:-1, 0], frames[:, 1:-1, -1]], axis=1
    )  # (F, 2W + 2(H-2), 3)
    return np.median(border.reshape(-1, 3), axis=0)


def centroids(frames: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """(F, 2) centroid (x, y) of the pixels unlike the background in each frame; NaN where there are none."""
    sprite = np.abs(frames - background(frames)).max(axis=-1) > threshold  # (F, H, W)
    area = sprite.sum(axis=(1, 2)).astype(np.float64)
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (sprite * xs).sum(axis=(1, 2)) / area
        y = (sprite * ys).sum(axis=(1, 2)) / area
    return np.stack([x, y], axis=1)


def direction_of(dx: float, dy: float, side: int, min_shift: float = MIN_SHIFT) -> str | None:
    """The direction nearest to the motion (dx, dy), or None for less than ``min_shift`` of ``side``."""
    if np.hypot(dx, dy) < min_shift * side:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def track(clip: torch.Tensor | np.ndarray, threshold: float = THRESHOLD, min_shift: float = MIN_SHIFT) -> Track:
    """Follow a clip's sprite (see the module docstring)."""
    frames = as_frames(clip)
    points = centroids(frames, threshold)
    seen = ~np.isnan(points[:, 0])
    if seen.sum() < 2:
        return Track(points, 0.0, 0.0, None)
    times = np.flatnonzero(seen).astype(np.float64)
    slope_x, slope_y = np.polyfit(times, points[seen], 1)[0]
    duration = len(frames) - 1
    dx, dy = float(slope_x * duration), float(slope_y * duration)
    return Track(points, dx, dy, direction_of(dx, dy, max(frames.shape[1:3]), min_shift))


def direction_scores(prompted: list[str], detected: list[str | None]) -> dict[str, object]:
    """Per direction and overall: clips, clips that moved the prompted way, their fraction (chance 0.25)."""
    if len(prompted) != len(detected):
        raise ValueError(f"{len(prompted)} prompted directions but {len(detected)} tracks")
    unknown = sorted(set(prompted) - set(DIRECTIONS))
    if unknown:
        raise ValueError(f"unknown directions {unknown}; valid: {', '.join(DIRECTIONS)}")
    per_direction = {}
    for name in DIRECTIONS:
        hits = [want == got for want, got in zip(prompted, detected) if want == name]
        if hits:
            per_direction[name] = {"clips": len(hits), "correct": sum(hits), "fraction": sum(hits) / len(hits)}
    correct = sum(want == got for want, got in zip(prompted, detected))
    return {
        "clips": len(prompted),
        "correct": correct,
        "fraction": correct / len(prompted) if prompted else 0.0,
        "no_motion": sum(got is None for got in detected),
        "per_direction": per_direction,
    }
