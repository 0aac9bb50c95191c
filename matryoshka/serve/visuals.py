"""Pictures of a run: level grids, the logSNR schedule of every level, the denoising path, the download."""

from __future__ import annotations

import json
import math
import zipfile
from io import BytesIO
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..diffusion import MatryoshkaDiffusion
from ..diffusion.spacetime import level_name as file_level_name
from ..utils.images import make_grid, to_uint8

TILE = 128
"""Smallest on-screen side of one image: small levels are enlarged (nearest neighbour, so
every pixel stays visible) to compare with the top level."""
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
MAX_FRAMES = 60
MAX_VIDEO_WIDTH = 1024


def as_frames(level: Tensor) -> tuple[Tensor, int | None]:
    """A level's images; for a clip batch (B, C, F, H, W) its frames, one grid row per clip (F columns)."""
    if level.dim() == 5:
        return level.transpose(1, 2).flatten(0, 1), level.shape[2]
    return level, None


def level_name(level: Tensor) -> str:
    """``64²`` for images, ``8 frames 32²`` for clips."""
    side = f"{level.shape[-1]}²"
    return f"{level.shape[2]} frames {side}" if level.dim() == 5 else side


def _grid(level: Tensor) -> Image.Image:
    images, columns = as_frames(level)
    return make_grid(images, columns)


def level_grid(images: Tensor) -> Image.Image:
    """One level's batch as a grid, enlarged so that each image is at least TILE pixels wide."""
    grid = _grid(images)
    scale = max(1, math.ceil(TILE / images.shape[-1]))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


def pyramid_items(levels: list[Tensor], what: str) -> list[tuple[Image.Image, str]]:
    """Gallery items, one per level, highest resolution first, captioned with the level's side."""
    return [(level_grid(level), f"{level_name(level)} {what}") for level in levels]


def strip(levels: list[Tensor], gap: int = 8) -> Image.Image:
    """All levels side by side at the top level's enlarged grid size: one frame of the denoising video."""
    grids = [level_grid(levels[0])] + [_grid(level) for level in levels[1:]]
    width, height = grids[0].size
    canvas = Image.new("RGB", (len(grids) * width + (len(grids) - 1) * gap, height), "white")
    for index, grid in enumerate(grids):
        canvas.paste(grid.resize((width, height), Image.NEAREST), (index * (width + gap), 0))
    if canvas.width > MAX_VIDEO_WIDTH:
        canvas = canvas.resize((MAX_VIDEO_WIDTH, round(height * MAX_VIDEO_WIDTH / canvas.width)), Image.BILINEAR)
    return canvas


def keep_frame(step: int, steps: int) -> bool:
    """Whether step (1-based) goes into the video: evenly spread, at most MAX_FRAMES, always the last."""
    stride = math.ceil(steps / MAX_FRAMES)
    return step == steps or step % stride == 0


def denoising_gif(frames: list[Image.Image], path: Path, frame_ms: int = 120, hold_ms: int = 1500) -> Path:
    """The x0 estimates step by step as an animated GIF (PIL; no video codec needed), holding the end."""
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=False)
    return path


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size)


def schedule_plot(
    process: MatryoshkaDiffusion,
    sides: list[int],
    timesteps: list[int] | None = None,
    current: int | None = None,
    size: tuple[int, int] = (480, 300),
) -> Image.Image:
    """Each level's logSNR against t/T; dots where the sampler evaluates, a line at the current step.

    The levels' curves are the base schedule shifted down by p·log(side ratio): at the same t the
    larger levels are noisier, which is how MDM denoises coarse content first."""
    width, height = size
    left, right, top, bottom = 52, 12, 24, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font(11)
    steps = process.num_steps
    curves = [process.schedule_for_level(level).log_snrs[1:].double() for level in range(process.num_levels)]
    low = math.floor(min(float(c.min()) for c in curves))
    high = math.ceil(max(float(c.max()) for c in curves))

    def x(t: float) -> float:
        return left + (width - left - right) * t / steps

    def y(value: float) -> float:
        return top + (height - top - bottom) * (high - value) / max(high - low, 1e-9)

    for value in _ticks(low, high):
        draw.line([(left, y(value)), (width - right, y(value))], fill=(230, 230, 230))
        draw.text((left - 6, y(value)), f"{value:g}", fill="black", font=font, anchor="rm")
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        draw.text((x(fraction * steps), height - bottom + 6), f"{fraction:g}", fill="black", font=font, anchor="mt")
    draw.text(
        ((left + width - right) / 2, height - 14), "t / T  (1 = pure noise)", fill="black", font=font, anchor="mm"
    )
    draw.text((4, 4), "logSNR of each level", fill="black", font=font, anchor="lt")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if current is not None:
        draw.line([(x(current), top), (x(current), height - bottom)], fill=(120, 120, 120), width=2)
    ts = torch.arange(1, steps + 1, dtype=torch.float64)
    for level, curve in enumerate(curves):
        color = COLORS[level % len(COLORS)]
        points = list(zip((x(t) for t in ts.tolist()), (y(v) for v in curve.tolist())))
        draw.line(points, fill=color, width=2)
        for t in [t for t in timesteps or [] if t > 0]:
            cx, cy = x(t), y(float(curve[t - 1]))
            draw.ellipse([cx - 2.5, cy - 2.5, cx + 2.5, cy + 2.5], fill=color)
        draw.text(
            (width - right - 6, top + 6 + 14 * level), f"{sides[level]}px", fill=color, font=_font(12), anchor="rt"
        )
    return image


def _ticks(low: float, high: float) -> list[float]:
    step = max(1, math.ceil((high - low) / 6))
    first = math.ceil(low / step) * step
    return [float(v) for v in range(int(first), int(high) + 1, step)]


def write_download(levels: list[Tensor], summary: dict, path: Path) -> Path:
    """A zip with every image of every level, a grid per level and the settings (with the command)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for level in levels:
            name = f"{file_level_name(level) if level.dim() == 5 else level.shape[-1]}px"
            images, frames = as_frames(level)
            for index, pixels in enumerate(to_uint8(images)):
                file = f"{index // frames:04d}_frame{index % frames:02d}" if frames else f"{index:04d}"
                archive.writestr(f"{name}/{file}.png", _png(Image.fromarray(pixels)))
            archive.writestr(f"grid_{name}.png", _png(_grid(level)))
        archive.writestr("settings.json", json.dumps(summary, indent=2, ensure_ascii=False))
        archive.writestr("command.txt", summary["command"] + "\n")
    return path


def _png(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
