"""``emoji-motion``: a built-in, offline video set of emoji sprites moving on plain backgrounds.

Item i is fully determined by i (no randomness): emoji ``i // len(MOTIONS)`` of the named
emoji (the ``emoji`` set's order) does motion ``i % len(MOTIONS)`` on one of a few plain
backgrounds, and the caption says what happens: "red heart moving left", "cat face growing".
A sprite is the emoji bitmap at the clip's resolution with its outer white made transparent
(flood fill from the border, so white inside the emoji, e.g. eyes, stays), drawn at half the
clip's side (growing: from a quarter to almost the whole side).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import ImageDataset
from .config import DataConfig
from .emoji_font import resource_paths
from .emoji_table import EmojiTable, load_emoji_table, spread_evenly
from .images import uint8_to_tensor

MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "rotating", "growing")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (255, 246, 204), (214, 234, 255), (220, 245, 220), (255, 225, 235))
"""Plain, light backgrounds: the sprites' anti-aliased edges were composited on white."""
WHITE_LEVEL = 240
"""Pixels with every channel at least this bright count as the bitmap's white surround."""


def sprite_alpha(rgb: np.ndarray) -> np.ndarray:
    """(R, R) uint8 alpha: 0 on the near-white region connected to the border, 255 elsewhere."""
    white = (rgb >= WHITE_LEVEL).all(-1)
    outside = np.zeros_like(white)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        outside[edge] = white[edge]
    while True:  # grow through 4-connected white pixels until nothing changes
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= white
        if np.array_equal(grown, outside):
            return np.where(outside, 0, 255).astype(np.uint8)
        outside = grown


def render_clip(rgb: np.ndarray, motion: str, background: tuple[int, int, int], frames: int) -> np.ndarray:
    """(F, R, R, 3) uint8 frames of the sprite ``rgb`` (R, R, 3) doing ``motion``."""
    side = rgb.shape[0]
    sprite = Image.fromarray(np.dstack([rgb, sprite_alpha(rgb)]), "RGBA")
    half = side // 2
    out = np.empty((frames, side, side, 3), np.uint8)
    for index in range(frames):
        progress = index / (frames - 1) if frames > 1 else 0.0
        size, angle = half, 0.0
        x = y = (side - half) / 2
        travel = (side - half) * progress
        if motion == "moving left":
            x = side - half - travel
        elif motion == "moving right":
            x = travel
        elif motion == "moving up":
            y = side - half - travel
        elif motion == "moving down":
            y = travel
        elif motion == "bouncing":  # falls to the floor and back up, twice per clip
            y = (side - half) * abs(math.sin(2 * math.pi * progress))
        elif motion == "rotating":  # anticlockwise, one turn over the clip's frames and one more
            angle = 360.0 * index / frames
        elif motion == "growing":
            size = round(side / 4 + (side - 2 - side / 4) * progress)
            x = y = (side - size) / 2
        else:
            raise ValueError(f"unknown motion {motion!r}; valid: {', '.join(MOTIONS)}")
        drawn = sprite.resize((size, size), Image.LANCZOS)
        if angle:
            drawn = drawn.rotate(angle, resample=Image.BICUBIC)
        canvas = Image.new("RGB", (side, side), background)
        canvas.paste(drawn, (round(x), round(y)), drawn)
        out[index] = np.asarray(canvas)
    return out


class EmojiMotionDataset(ImageDataset):
    """Clips (3, frames, R, R) in [-1, 1]; captions "<emoji name> <motion>" when ``captions``."""

    source = "emoji-motion"

    def __init__(self, cfg: DataConfig, font_path: str | None = None, emoji_test_path: str | None = None) -> None:
        super().__init__(cfg)
        self.location = resource_paths(font_path, emoji_test_path)[0]
        self.table: EmojiTable = load_emoji_table(cfg.resolution, cfg.cache_dir, True, font_path, emoji_test_path)
        self.rows = spread_evenly(np.nonzero(self.table.group >= 0)[0], cfg.sprites)
        self.items = np.arange(len(self.rows) * len(MOTIONS))
        self._finish_index()

    def clip(self, i: int) -> tuple[np.ndarray, str]:
        """Frames (F, R, R, 3) uint8 and the caption of item ``i``."""
        row = int(self.rows[i // len(MOTIONS)])
        motion = MOTIONS[i % len(MOTIONS)]
        background = BACKGROUNDS[(i // len(MOTIONS)) % len(BACKGROUNDS)]
        frames = render_clip(np.asarray(self.table.images[row]), motion, background, self.cfg.frames)
        return frames, f"{self.table.names[row]} {motion}"

    def describe(self, i: int) -> str:
        return f"clip {i}: {self.clip(i)[1]!r}"

    def _load(self, i, rng):
        # No augmentation: a flip would contradict "moving left", and the set is already varied.
        frames, caption = self.clip(i)
        clip = torch.stack([uint8_to_tensor(frame) for frame in frames], dim=1)
        return clip, -1, caption if self.cfg.captions else ""


def export_emoji_motion(
    out_dir: str | Path, size: int = 32, frames: int = 8, fps: float = 8.0, count: int | None = None
) -> dict[str, object]:
    """Write the first ``count`` clips (all by default) as ``NNNNNN.mp4`` with a ``.txt`` caption
    each: a folder the ``videofolder`` source reads. Returns ``{"out_dir", "count", "seconds"}``."""
    from ..utils.video import write_mp4

    start = time.perf_counter()
    dataset = EmojiMotionDataset(DataConfig(source="emoji-motion", resolution=size, frames=frames, captions=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(dataset) if count is None else min(count, len(dataset))
    for index in range(total):
        pixels, caption = dataset.clip(index)
        write_mp4(pixels, out / f"{index:06d}.mp4", fps)
        (out / f"{index:06d}.txt").write_text(caption + "\n", encoding="utf-8")
    return {"out_dir": str(out), "count": total, "seconds": time.perf_counter() - start}
