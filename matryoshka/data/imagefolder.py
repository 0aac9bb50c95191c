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
from typing import Dict, List, Optional, Tuple

from .base import ImageDataset
from .config import DataConfig
from .images import IMAGE_EXTENSIONS, BadImage, decode_text, load_image, verify_image


class ImageFolderDataset(ImageDataset):
    source = "imagefolder"

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        root = os.path.abspath(os.path.expanduser(cfg.path or ""))
        self.root = root
        self.location = root
        if not os.path.exists(root):
            raise FileNotFoundError(f"imagefolder: path {root!r} does not exist (DataConfig.path)")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"imagefolder: path {root!r} is not a directory (DataConfig.path)")

        self._found: Counter = Counter()
        candidates: List[str] = []  # paths relative to root
        metadata_files: List[str] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                full = os.path.join(dirpath, fn)
                rel = os.path.relpath(full, root)
                ext = os.path.splitext(fn)[1].lower()
                if fn == "metadata.jsonl":
                    metadata_files.append(full)
                elif ext in IMAGE_EXTENSIONS:
                    candidates.append(rel)
                    self._found["image files"] += 1
                elif ext == ".txt":
                    self._found["caption .txt files"] += 1
                else:
                    self._found[f"other files ({ext or 'no extension'})"] += 1

        # classes come from the candidate list, so a corrupt file never shifts labels
        if cfg.label == "folder":
            self.class_names = sorted({rel.split(os.sep, 1)[0] for rel in candidates if os.sep in rel})
        class_index = {c: k for k, c in enumerate(self.class_names)}

        jsonl_captions: Dict[str, str] = {}
        if cfg.captions:
            for mf in metadata_files:
                jsonl_captions.update(self._read_metadata(mf))

        self.items: List[Tuple[str, int, str]] = []  # (relative path, label, caption)
        for rel in candidates:
            full = os.path.join(root, rel)
            label = -1
            if cfg.label == "folder":
                if os.sep not in rel:
                    self.skip_log.add("missing_label", rel, "image outside any class folder")
                    continue
                label = class_index[rel.split(os.sep, 1)[0]]
            if cfg.verify:
                try:
                    verify_image(full, cfg.max_image_pixels)
                except BadImage as bad:
                    self.skip_log.add_bad(bad, rel)
                    continue
            else:
                try:
                    if os.path.getsize(full) == 0:
                        self.skip_log.add("zero_bytes", rel)
                        continue
                except OSError as exc:
                    self.skip_log.add("unreadable", rel, str(exc))
                    continue
            caption = ""
            if cfg.captions:
                caption = self._sidecar_caption(full, rel)
                if caption is None:
                    caption = jsonl_captions.get(os.path.normpath(full), "")
            self.items.append((rel, label, caption))
        self._finish_index()

    # ------------------------------------------------------------------ helpers
    def _sidecar_caption(self, full: str, rel: str) -> Optional[str]:
        txt = os.path.splitext(full)[0] + ".txt"
        if not os.path.isfile(txt):
            return None
        try:
            with open(txt, "rb") as f:
                data = f.read()
        except OSError:
            self.skip_log.warn("caption_unreadable", os.path.relpath(txt, self.root))
            return None
        text, ok = decode_text(data)
        if not ok:
            self.skip_log.warn("caption_not_utf8", os.path.relpath(txt, self.root))
        return text

    def _read_metadata(self, path: str) -> Dict[str, str]:
        base = os.path.dirname(path)
        out: Dict[str, str] = {}
        rel_meta = os.path.relpath(path, self.root)
        with open(path, "rb") as f:
            raw = f.read()
        text, ok = decode_text(raw)
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
            out[os.path.normpath(os.path.join(base, name))] = caption.strip()
        return out

    def _found_summary(self) -> str:
        if not self._found:
            return "an empty directory"
        return ", ".join(f"{n} {k}" for k, n in sorted(self._found.items()))

    def describe(self, i: int) -> str:
        return self.items[i][0]

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.items[i][0])

    def _load(self, i, rng):
        rel, label, caption = self.items[i]
        cfg = self.cfg
        image = load_image(
            os.path.join(self.root, rel), cfg.resolution, cfg.crop, cfg.hflip, rng, cfg.max_image_pixels
        )
        return image, label, caption
