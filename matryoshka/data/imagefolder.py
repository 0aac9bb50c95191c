"""``imagefolder`` source: a directory tree of image files.

* images: ``.jpg .jpeg .png .webp .bmp .gif .tif .tiff`` (any case) anywhere
  under the root; hidden files and folders (name starting with ".") are ignored;
* label="folder": class = first-level folder, class names sorted; images
  directly in the root are skipped (reason ``missing_label``);
* captions: a sidecar ``<stem>.txt`` next to the image (UTF-8; anything else
  is decoded with replacement characters and counted as a warning), else a
  ``metadata.jsonl`` line ``{"file_name": ..., "text": ...}`` (a
  metadata.jsonl file may sit in any folder; ``file_name`` is relative to it).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .base import ImageDataset, absolute
from .config import DataConfig
from .images import IMAGE_EXTENSIONS, BadImage, decode_text, load_image, verify_image


class ImageFolderDataset(ImageDataset):
    source = "imagefolder"

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        root = absolute(cfg.path or "")
        self.root = str(root)
        self.location = self.root
        if not root.exists():
            raise FileNotFoundError(f"imagefolder: path {self.root!r} does not exist (data.path)")
        if not root.is_dir():
            raise NotADirectoryError(f"imagefolder: data.path {self.root!r} is a file, not a folder of images")

        self._found: Counter = Counter()
        candidates: list[Path] = []  # relative to root
        metadata_files: list[Path] = []
        # Symlinked folders are followed, but each real folder only once: a link to an ancestor
        # would otherwise be walked until the path is too long, and its images trained on each time.
        seen = {_identity(root)}
        # os.walk, not Path.walk: the latter needs Python 3.12
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and self._first_visit(dirpath, d, seen)]
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                full = Path(dirpath, fn)
                ext = full.suffix.lower()
                if fn == "metadata.jsonl":
                    metadata_files.append(full)
                elif ext in IMAGE_EXTENSIONS:
                    candidates.append(full.relative_to(root))
                    self._found["image files"] += 1
                elif ext == ".txt":
                    self._found["caption .txt files"] += 1
                else:
                    self._found[f"other files ({ext or 'no extension'})"] += 1

        # classes come from the candidate list, so a corrupt file never shifts labels
        if cfg.label == "folder":
            self.class_names = sorted({rel.parts[0] for rel in candidates if len(rel.parts) > 1})
        class_index = {c: k for k, c in enumerate(self.class_names)}

        jsonl_captions: dict[Path, str] = {}
        if cfg.captions:
            for mf in metadata_files:
                jsonl_captions.update(self._read_metadata(mf))

        self.items: list[tuple[str, int, str]] = []  # (relative path, label, caption)
        for rel in candidates:
            full = root / rel
            label = -1
            if cfg.label == "folder":
                if len(rel.parts) == 1:
                    self.skip_log.add("missing_label", str(rel), "image outside any class folder")
                    continue
                label = class_index[rel.parts[0]]
            if cfg.verify:
                try:
                    verify_image(full, cfg.max_image_pixels)
                except BadImage as bad:
                    self.skip_log.add_bad(bad, str(rel))
                    continue
            else:
                try:
                    if full.stat().st_size == 0:
                        self.skip_log.add("zero_bytes", str(rel))
                        continue
                except OSError as exc:
                    self.skip_log.add("unreadable", str(rel), str(exc))
                    continue
            caption = ""
            if cfg.captions:
                caption = self._sidecar_caption(full)
                if caption is None:
                    caption = jsonl_captions.get(full, "")
            self.items.append((str(rel), label, caption))
        self._finish_index()

    # ------------------------------------------------------------------ helpers
    def _first_visit(self, parent: str, name: str, seen: set[tuple[int, int]]) -> bool:
        try:
            identity = _identity(Path(parent, name))
        except OSError:  # a dangling link: nothing to read there
            return False
        if identity in seen:
            self._found["folders seen before (symlinks)"] += 1
            return False
        seen.add(identity)
        return True

    def _sidecar_caption(self, image: Path) -> str | None:
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            return None
        rel = str(txt.relative_to(self.root))
        try:
            data = txt.read_bytes()
        except OSError:
            self.skip_log.warn("caption_unreadable", rel)
            return None
        text, ok = decode_text(data)
        if not ok:
            self.skip_log.warn("caption_not_utf8", rel)
        return text

    def _read_metadata(self, path: Path) -> dict[Path, str]:
        out: dict[Path, str] = {}
        rel_meta = str(path.relative_to(self.root))
        text, ok = decode_text(path.read_bytes())
        if not ok:
            self.skip_log.warn("caption_not_utf8", rel_meta)
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                name = rec["file_name"]
                caption = rec.get("text", rec.get("caption", ""))
                if not isinstance(name, str) or not isinstance(caption, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError, AttributeError):
                self.skip_log.warn("bad_metadata_line", f"{rel_meta}:{lineno}")
                continue
            out[absolute(path.parent / name)] = caption.strip()
        return out

    def _found_summary(self) -> str:
        if not self._found:
            return "an empty directory"
        return ", ".join(f"{n} {k}" for k, n in sorted(self._found.items()))

    def describe(self, i: int) -> str:
        return self.items[i][0]

    def path(self, i: int) -> str:
        return str(Path(self.root, self.items[i][0]))

    def _load(self, i, rng):
        rel, label, caption = self.items[i]
        cfg = self.cfg
        image = load_image(Path(self.root, rel), cfg.resolution, cfg.crop, cfg.hflip, rng, cfg.max_image_pixels)
        return image, label, caption


def _identity(path: Path) -> tuple[int, int]:
    """The real folder behind a path, however it is linked to."""
    info = path.stat()
    return info.st_dev, info.st_ino
