"""``videofolder`` source: a directory tree of video files, read as clips through PyAV.

* videos: ``.mp4 .webm .avi .gif .mkv .mov .m4v`` (any case) anywhere under the root;
  hidden files and folders are ignored;
* a clip is ``data.frames`` frames taken every ``data.frame_stride``-th decoded frame;
  it starts at a random frame with ``crop=random`` (reproducible: the item's seed), else
  in the middle of the video; every frame is resized and cropped like an image (the same
  crop and flip for the whole clip);
* label="folder": class = first-level folder; captions: a sidecar ``<stem>.txt``;
* with ``verify`` every video is decoded once while indexing: unreadable files are
  skipped as ``corrupt`` (``zero_bytes`` when empty), videos with fewer frames than a clip
  needs as ``too_short``; without it, such files are skipped (and counted) when loaded.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import ImageDataset, absolute
from .config import DataConfig
from .images import BadImage, decode_text, resize_crop_flip, uint8_to_tensor

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".gif", ".mkv", ".mov", ".m4v")


def decode_frames(path: str | Path, limit: int | None = None) -> list[Image.Image]:
    """The first ``limit`` (default: all) frames of a video as RGB images; BadImage if unreadable."""
    import av

    frames: list[Image.Image] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadImage("corrupt", "no video stream")
            for frame in container.decode(video=0):
                frames.append(frame.to_image().convert("RGB"))
                if limit is not None and len(frames) >= limit:
                    break
    except BadImage:
        raise
    except FileNotFoundError as error:
        raise BadImage("missing_file", str(error)) from None
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise BadImage("corrupt", f"{type(error).__name__}: {error}") from None
    if not frames:
        raise BadImage("corrupt", "no decodable frame")
    return frames


class VideoFolderDataset(ImageDataset):
    """Clips (3, frames, R, R) in [-1, 1] from the videos under ``data.path``."""

    source = "videofolder"

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        root = absolute(cfg.path or "")
        self.root = root
        self.location = str(root)
        if not root.is_dir():
            raise FileNotFoundError(f"videofolder: path {self.location!r} is not a directory (data.path)")
        self.span = (cfg.frames - 1) * cfg.frame_stride + 1  # decoded frames one clip covers
        self._found: Counter = Counter()
        videos = self._walk(root)
        if cfg.label == "folder":
            self.class_names = sorted({path.parts[0] for path in videos if len(path.parts) > 1})
        items: list[tuple[Path, int, int]] = []  # (relative path, label, frames or 0 if unknown)
        for path in videos:
            label = -1
            if cfg.label == "folder":
                if len(path.parts) == 1:
                    self.skip_log.add("missing_label", str(path))
                    continue
                label = self.class_names.index(path.parts[0])
            count = 0
            if cfg.verify:
                try:
                    count = self._probe(root / path)
                except BadImage as bad:
                    self.skip_log.add_bad(bad, str(path))
                    continue
            items.append((path, label, count))
        self.items = items
        self._finish_index()

    def _walk(self, root: Path) -> list[Path]:
        videos = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                suffix = Path(name).suffix.lower()
                if name.startswith("."):
                    continue
                if suffix in VIDEO_EXTENSIONS:
                    videos.append(Path(dirpath, name).relative_to(root))
                    self._found["video files"] += 1
                else:
                    self._found["caption .txt files" if suffix == ".txt" else "other files"] += 1
        return videos

    def _probe(self, path: Path) -> int:
        """Decodable frames of the video; BadImage when it cannot give one clip."""
        if path.stat().st_size == 0:
            raise BadImage("zero_bytes")
        count = len(decode_frames(path))
        if count < self.span:
            raise BadImage("too_short", f"{count} frames, a clip needs {self.span}")
        return count

    def _found_summary(self) -> str:
        return ", ".join(f"{count} {kind}" for kind, count in self._found.items()) or "no files"

    def describe(self, i: int) -> str:
        return str(self.root / self.items[i][0])

    def _caption(self, path: Path) -> str:
        sidecar = path.with_suffix(".txt")
        if not self.cfg.captions or not sidecar.is_file():
            return ""
        text, valid = decode_text(sidecar.read_bytes())
        if not valid:
            self.skip_log.warn("caption_not_utf8", str(sidecar))
        return text

    def _load(self, i, rng):
        relative, label, known = self.items[i]
        path = self.root / relative
        # With the length known from indexing, decode only up to the clip's end.
        frames = None if known else decode_frames(path)
        count = known or len(frames)
        if count < self.span:
            raise BadImage("too_short", f"{count} frames, a clip needs {self.span}")
        room = count - self.span
        start = rng.randint(0, room) if self.cfg.crop == "random" else room // 2
        if frames is None:
            frames = decode_frames(path, start + self.span)
        chosen = frames[start : start + self.span : self.cfg.frame_stride]
        if len(chosen) < self.cfg.frames:  # the file changed since it was indexed
            raise BadImage("too_short", f"{len(frames)} frames decoded, a clip needs {self.span}")
        # One seed for the clip: every frame gets the same crop and flip.
        seed = rng.getrandbits(63)
        pixels = [
            np.asarray(resize_crop_flip(frame, self.cfg.resolution, self.cfg.crop, self.cfg.hflip, random.Random(seed)))
            for frame in chosen
        ]
        clip = torch.stack([uint8_to_tensor(frame) for frame in pixels], dim=1)
        return clip, label, self._caption(path)
