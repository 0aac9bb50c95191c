"""Tensor <-> image file conversion and sample grids (PIL only; no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> Image.Image:
    """Tile a batch into one white-padded image, ``columns`` wide (default: square-ish)."""
    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), 255, np.uint8)
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        canvas[top : top + height, left : left + width] = image
    return Image.fromarray(canvas)


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, columns).save(path)
    return path


def save_images(images: torch.Tensor, directory: str | Path, prefix: str, start: int = 0) -> list[Path]:
    """One PNG per image, numbered from ``start`` (so batches can be written as they come)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, pixels in enumerate(to_uint8(images), start=start):
        path = directory / f"{prefix}{index:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
