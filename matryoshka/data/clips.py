"""Clips from video files or in-memory video bytes, through PyAV: the decoding every video source shares.

A clip is ``cfg.frames`` frames taken every ``cfg.frame_stride``-th decoded frame, so it
spans ``(frames - 1) * frame_stride + 1`` decoded frames. It starts at a random frame with
``crop=random`` (drawn from the item's ``rng``) and in the middle of the video otherwise;
every frame is resized and cropped like an image, with the same crop and flip for the
whole clip. Anything unusable raises :class:`~matryoshka.data.images.BadImage`: ``corrupt``
(FFmpeg cannot read it, or it has no video stream), ``zero_bytes``, ``missing_file``,
``too_short`` (fewer frames than a clip spans) or ``decompression_bomb`` (frames of more
than ``max_image_pixels`` pixels, refused before any is decoded, as for images).
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .images import BadImage, resize_crop_flip, uint8_to_tensor

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".gif", ".mkv", ".mov", ".m4v")

VideoSource = str | Path | bytes | bytearray | memoryview


def clip_span(cfg: DataConfig) -> int:
    """Decoded frames one clip covers."""
    return (cfg.frames - 1) * cfg.frame_stride + 1


def _open(source: VideoSource):
    import av

    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise BadImage("zero_bytes", "empty video")
        return av.open(io.BytesIO(bytes(source)))
    return av.open(str(source))


def _video_frames(
    source: VideoSource, limit: int | None = None, decode: bool = True, max_pixels: int | None = None
) -> Iterator:
    """The first ``limit`` decoded frames (PyAV ``VideoFrame``), or with ``decode=False`` the video
    stream's packets; FFmpeg errors become BadImage, whenever they happen."""
    import av

    count = 0
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise BadImage("corrupt", "no video stream")
            width, height = container.streams.video[0].width, container.streams.video[0].height
            if max_pixels is not None and width * height > max_pixels:
                raise BadImage("decompression_bomb", f"{width}x{height} frames > limit {max_pixels} pixels")
            items = container.decode(video=0) if decode else container.demux(video=0)
            for item in items:
                if not decode and not item.size:  # the demuxer's empty flush packet is no frame
                    continue
                yield item
                count += 1
                if limit is not None and count >= limit:
                    return
    except BadImage:
        raise
    except FileNotFoundError as error:
        raise BadImage("missing_file", str(error)) from None
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise BadImage("corrupt", f"{type(error).__name__}: {error}") from None


def count_frames(source: VideoSource, decode: bool = True, max_pixels: int | None = None) -> int:
    """Frames of a video. ``decode=True`` decodes every frame (a full check that the video is
    readable); ``decode=False`` only counts the video stream's packets, one per frame in the
    usual containers and codecs (mp4/H.264, webm/VP8-9, avi, gif), without decoding any."""
    count = sum(1 for _ in _video_frames(source, decode=decode, max_pixels=max_pixels))
    if not count:
        raise BadImage("corrupt", "no decodable frame" if decode else "no video packet")
    return count


def read_clip(source: VideoSource, cfg: DataConfig, rng: random.Random, count: int | None = None) -> torch.Tensor:
    """One clip (3, cfg.frames, R, R) in [-1, 1] of a video with ``count`` frames (counted from
    its packets when not given). Only the frames up to the clip's end are decoded, and only
    the clip's own are converted to images."""
    span = clip_span(cfg)
    if count is None:
        count = count_frames(source, decode=False, max_pixels=cfg.max_image_pixels)
    if count < span:
        raise BadImage("too_short", f"{count} frames, a clip needs {span}")
    room = count - span
    start = rng.randint(0, room) if cfg.crop == "random" else room // 2
    wanted = range(start, start + span, cfg.frame_stride)
    chosen = [
        frame.to_image().convert("RGB")
        for index, frame in enumerate(_video_frames(source, start + span, max_pixels=cfg.max_image_pixels))
        if index in wanted
    ]
    if len(chosen) < cfg.frames:  # fewer frames decode than were counted (a changed file, odd packets)
        raise BadImage("too_short", f"{count} frames counted, fewer decoded than the {start + span} a clip needs")
    # One seed for the clip: every frame gets the same crop and flip.
    seed = rng.getrandbits(63)
    pixels = [
        np.asarray(resize_crop_flip(frame, cfg.resolution, cfg.crop, cfg.hflip, random.Random(seed)))
        for frame in chosen
    ]
    return torch.stack([uint8_to_tensor(frame) for frame in pixels], dim=1)
