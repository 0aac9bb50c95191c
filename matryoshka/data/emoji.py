"""The built-in emoji image set: colour bitmaps of Noto Color Emoji, as a dataset and as an image folder.

Reading the font and emoji-test.txt is in :mod:`.emoji_font`, decoding and caching
the bitmaps in :mod:`.emoji_table`; their public names are re-exported here.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .base import ImageDataset
from .colour_words import colour_caption
from .config import DataConfig
from .emoji_font import (
    EMOJI_TEST_PATH,
    FONT_PATH,
    EmojiEntry,
    EmojiResourceError,
    parse_emoji_test,
    resource_paths,
)
from .emoji_table import EmojiTable, build_emoji_table, default_cache_dir, load_emoji_table, spread_evenly
from .images import uint8_to_tensor

__all__ = [
    "EMOJI_TEST_PATH",
    "FONT_PATH",
    "EmojiDataset",
    "EmojiEntry",
    "EmojiResourceError",
    "EmojiTable",
    "build_emoji_table",
    "default_cache_dir",
    "export_emoji",
    "load_emoji_table",
    "parse_emoji_test",
    "resource_paths",
]


# ------------------------------------------------------------------- the dataset
class EmojiDataset(ImageDataset):
    """Noto Color Emoji bitmaps as a dataset.

    ``label``: "none" (-1), "group" (10 classes) or "subgroup" (one class per
    emoji-test.txt subgroup). ``captions``: the emoji name ("grinning face"), with its main colours if
    ``colour_captions`` ("grinning face, yellow").
    ``crop`` has no effect (the images are already square at the resolution);
    ``hflip`` flips with probability 0.5.
    """

    source = "emoji"

    def __init__(
        self,
        cfg: DataConfig | None = None,
        font_path: str | None = None,
        emoji_test_path: str | None = None,
    ):
        cfg = cfg or DataConfig()
        super().__init__(cfg)
        self.location = resource_paths(font_path, emoji_test_path)[0]
        self.table = load_emoji_table(cfg.resolution, cfg.cache_dir, True, font_path, emoji_test_path)
        t = self.table
        keep = np.arange(len(t.glyphs)) if cfg.emoji_keep_unnamed else np.nonzero(t.group >= 0)[0]
        self.items = spread_evenly(keep.astype(np.int64), cfg.sprites)
        self._colour_captions: dict[int, str] = {}  # per row: naming the colours reads every pixel
        if cfg.label == "group":
            self.class_names = list(t.group_names)
            self._labels = t.group
        elif cfg.label == "subgroup":
            self.class_names = list(t.subgroup_names)
            self._labels = t.subgroup
        else:
            self.class_names = []
            self._labels = np.full(len(t.glyphs), -1, dtype=np.int64)
        self._finish_index()

    @property
    def labels(self) -> np.ndarray:
        """Every item's class label, in item order (-1 where the dataset has none)."""
        return self._labels[self.items]

    def _found_summary(self) -> str:
        return f"{len(self.table.glyphs)} bitmaps, {self.table.num_named} named"

    def describe(self, i: int) -> str:
        row = int(self.items[i])
        return f"{self.table.glyphs[row]} {self.table.names[row]!r}"

    def name(self, i: int) -> str:
        return self.table.names[int(self.items[i])]

    def _load(self, i, rng):
        row = int(self.items[i])
        arr = self.table.images[row]
        if self.cfg.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return uint8_to_tensor(arr), int(self._labels[row]), self.caption(i)

    def caption(self, i: int) -> str:
        """Item i's caption: its name, with its main colours if ``colour_captions`` ("" without captions)."""
        if not self.cfg.captions:
            return ""
        row = int(self.items[i])
        name = self.table.names[row]
        if not self.cfg.colour_captions:
            return name
        if row not in self._colour_captions:
            self._colour_captions[row] = colour_caption(name, self.table.images[row])
        return self._colour_captions[row]


# ------------------------------------------------------------------- the export
def _slug(text: str, limit: int = 60) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-")) or "x"


def export_emoji(
    out_dir: str,
    size: int = 64,
    label: str = "group",
    keep_unnamed: bool = False,
    cache_dir: str | None = None,
    font_path: str | None = None,
    emoji_test_path: str | None = None,
    colour_captions: bool = False,
) -> dict[str, object]:
    """Write the emoji set as an image folder readable by the ``imagefolder`` source.

    Layout: ``<out_dir>/<NN>-<class-slug>/<NNNNN>-<name-slug>.png`` with a
    caption sidecar ``.txt`` next to each PNG and ``<out_dir>/metadata.jsonl``
    (``file_name``, ``text``, ``label``, ``group``, ``subgroup``,
    ``codepoints``). Class folders are numbered so that their sorted order
    equals the emoji dataset's label order. ``label="none"`` writes all files
    directly into ``out_dir``. ``colour_captions``: captions name the main colours too, as
    ``data.colour_captions`` does ("red heart, red"). Returns ``{"out_dir", "count",
    "class_names", "seconds"}``.
    """
    if label not in ("group", "subgroup", "none"):
        raise ValueError(f"export_emoji: label must be 'group', 'subgroup' or 'none', got {label!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"export_emoji: size must be an integer >= 8, got {size!r}")
    t0 = time.perf_counter()
    table = load_emoji_table(size, cache_dir, True, font_path, emoji_test_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if label == "group":
        class_names, labels = table.group_names, table.group
    elif label == "subgroup":
        class_names, labels = table.subgroup_names, table.subgroup
    else:
        class_names, labels = [], np.full(len(table.glyphs), -1, dtype=np.int64)
    width = max(2, len(str(len(class_names))))
    folders = [f"{k:0{width}d}-{_slug(c)}" for k, c in enumerate(class_names)]
    rows = [r for r in range(len(table.glyphs)) if keep_unnamed or table.group[r] >= 0]
    count = 0
    with (out / "metadata.jsonl").open("w", encoding="utf-8") as meta:
        for r in rows:
            name = table.names[r]
            stem = f"{r:05d}-{_slug(name) if name else _slug(table.glyphs[r])}"
            lab = int(labels[r])
            if label != "none":
                folder = folders[lab] if lab >= 0 else "unnamed"
                rel = f"{folder}/{stem}.png"
            else:
                rel = f"{stem}.png"
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(table.images[r])).save(target, format="PNG", compress_level=3)
            text = colour_caption(name, table.images[r]) if colour_captions else name
            target.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
            rec = {
                "file_name": rel,
                "text": text,
                "label": lab,
                "group": table.group_names[table.group[r]] if table.group[r] >= 0 else "",
                "subgroup": table.subgroup_names[table.subgroup[r]] if table.subgroup[r] >= 0 else "",
                "codepoints": table.codepoints[r],
            }
            meta.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count += 1
    return {
        "out_dir": str(out),
        "count": count,
        "class_names": list(class_names),
        "seconds": time.perf_counter() - t0,
    }
