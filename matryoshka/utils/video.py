"""Clips (B, C, F, H, W) in [-1, 1] to files: mp4 (PyAV), gif (Pillow) and PNG strips of frames."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import make_grid, to_uint8


def clip_frames(clip: torch.Tensor) -> np.ndarray:
    """One clip (C, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    return to_uint8(clip.transpose(0, 1))


def encode_mp4(frames: np.ndarray, fps: float = 8.0) -> bytes:
    """(F, H, W, 3) uint8 -> the bytes of an H.264 mp4 (yuv420p; odd sides are padded by one edge
    pixel, as the chroma subsampling needs even ones). MPEG-4 part 2 where FFmpeg lacks libx264."""
    import av

    height, width = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}  # near-lossless: tiny frames show every artefact
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_mp4(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """(F, H, W, 3) uint8 -> an mp4 file (see :func:`encode_mp4`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, fps))
    return path


def write_gif(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """(F, H, W, 3) uint8 -> looping gif."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(pixels) for pixels in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def write_strip(frames: np.ndarray, path: str | Path, padding: int = 1) -> Path:
    """(F, H, W, 3) uint8 -> one PNG with the frames side by side, left to right in time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width, _ = frames.shape
    canvas = np.full((height, count * (width + padding) - padding, 3), 255, np.uint8)
    for index, pixels in enumerate(frames):
        canvas[:, index * (width + padding) : index * (width + padding) + width] = pixels
    Image.fromarray(canvas).save(path)
    return path


def save_clips(clips: torch.Tensor, directory: str | Path, start: int = 0, fps: float = 8.0) -> list[Path]:
    """For each clip: ``NNNN.mp4``, ``NNNN.gif`` and ``NNNN.png`` (its frames in a strip)."""
    directory = Path(directory)
    paths = []
    for index, clip in enumerate(clips, start=start):
        frames = clip_frames(clip)
        paths += [
            write_mp4(frames, directory / f"{index:04d}.mp4", fps),
            write_gif(frames, directory / f"{index:04d}.gif", fps),
            write_strip(frames, directory / f"{index:04d}.png"),
        ]
    return paths


def save_clip_grid(clips: torch.Tensor, path: str | Path) -> Path:
    """One PNG: a row of frames per clip."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = clips.shape[2]
    make_grid(clips.transpose(1, 2).flatten(0, 1), columns=frames).save(path)
    return path
