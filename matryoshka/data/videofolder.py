"""``videofolder`` source: a directory tree of video files, read as clips through PyAV.

* videos: ``.mp4 .webm .avi .gif .mkv .mov .m4v`` (any case) anywhere under the root;
  hidden files and folders are ignored;
* a clip is ``data.frames`` frames taken every ``data.frame_stride``-th decoded frame,
  from a random start with ``crop=random`` (reproducible: the item's seed) or the middle
  of the video, resized and cropped like an image (:mod:`.clips`, shared with ``shards``);
* label="folder": class = first-level folder; captions: a sidecar ``<stem>.txt``;
* with ``verify`` every video is decoded once while indexing: unreadable files are
  skipped as ``corrupt`` (``zero_bytes`` when empty), videos with fewer frames than a clip
  needs as ``too_short``; without it, such files are skipped (and counted) when loaded.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .base import ImageDataset, absolute
from .clips import VIDEO_EXTENSIONS, clip_span, count_frames, read_clip
from .config import DataConfig
from .images import BadImage, decode_text


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
        self.span = clip_span(cfg)
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
        count = count_frames(path, max_pixels=self.cfg.max_image_pixels)
        if count < self.span:
            raise BadImage("too_short", f"{count} frames, a clip needs {self.span}")
        return count

    def _found_summary(self) -> str:
        return ", ".join(f"{count} {kind}" for kind, count in self._found.items()) or "no files"

    def video_path(self, i: int) -> Path:
        return self.root / self.items[i][0]

    def describe(self, i: int) -> str:
        return str(self.video_path(i))

    def caption(self, path: Path) -> str:
        """The sidecar caption of the video at ``path`` ("" without one or with captions off)."""
        sidecar = path.with_suffix(".txt")
        if not self.cfg.captions or not sidecar.is_file():
            return ""
        text, valid = decode_text(sidecar.read_bytes())
        if not valid:
            self.skip_log.warn("caption_not_utf8", str(sidecar))
        return text

    def _load(self, i, rng):
        _, label, known = self.items[i]
        path = self.video_path(i)
        # With the length known from indexing only the frames up to the clip's end are decoded.
        return read_clip(path, self.cfg, rng, known or None), label, self.caption(path)
