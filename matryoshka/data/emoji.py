"""The built-in emoji image set: colour bitmaps of Noto Color Emoji.

The PNG bitmaps embedded in the font's CBDT table are read directly with
fontTools (no text rendering). Each bitmap glyph is named through
``emoji-test.txt``: a sequence's code points (variation selectors FE0E/FE0F
removed, since the font's cmap has no glyph for them) are mapped to glyphs
with the cmap table, and multi-code-point sequences (ZWJ sequences, skin
tones, flags, keycaps) to their ligature glyph with the GSUB ligature
lookups. The name, group and subgroup come from the first emoji-test.txt
entry (fully-qualified first) that reaches the glyph.

Bitmaps (136x128 RGBA) are composited on white, padded to a centred white
square, and resized to the requested resolution with Lanczos. The decoded set
is cached as a ``.npy`` uint8 array (memory-mapped on later loads) plus a
``.json`` file of names and labels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .base import ImageDataset
from .config import DataConfig
from .images import uint8_to_tensor

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_PATH = "/usr/share/unicode/emoji/emoji-test.txt"
INSTALL_HINT = (
    "install the Debian packages `fonts-noto-color-emoji` and `unicode-data` "
    "(apt-get install fonts-noto-color-emoji unicode-data)"
)
CACHE_VERSION = 1
_VARIATION_SELECTORS = (0xFE0E, 0xFE0F)


class EmojiResourceError(FileNotFoundError):
    """The emoji font or emoji-test.txt is missing."""


def default_cache_dir() -> Path:
    """``$MATRYOSHKA_CACHE``, else ``$XDG_CACHE_HOME/matryoshka``, else ``~/.cache/matryoshka``."""
    env = os.environ.get("MATRYOSHKA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "matryoshka"


def resource_paths(font_path: Optional[str] = None, emoji_test_path: Optional[str] = None) -> Tuple[str, str]:
    """Font and emoji-test.txt paths: the arguments, else ``$MATRYOSHKA_EMOJI_FONT`` /
    ``$MATRYOSHKA_EMOJI_TEST``, else the Debian locations."""
    font = font_path or os.environ.get("MATRYOSHKA_EMOJI_FONT") or FONT_PATH
    test = emoji_test_path or os.environ.get("MATRYOSHKA_EMOJI_TEST") or EMOJI_TEST_PATH
    return font, test


def _check_resources(font_path: str, emoji_test_path: str) -> Tuple[str, str]:
    font_path, emoji_test_path = resource_paths(font_path, emoji_test_path)
    missing = [p for p in (font_path, emoji_test_path) if not os.path.isfile(p)]
    if missing:
        raise EmojiResourceError(f"emoji data not found ({', '.join(missing)}): {INSTALL_HINT}")
    return font_path, emoji_test_path


# ----------------------------------------------------------------- emoji-test.txt
@dataclass
class EmojiEntry:
    codepoints: Tuple[int, ...]
    status: str
    name: str
    group: str
    subgroup: str


def parse_emoji_test(path: str = EMOJI_TEST_PATH) -> Tuple[List[EmojiEntry], List[str], List[str]]:
    """Parse emoji-test.txt -> (entries in file order, group names, subgroup names)."""
    entries: List[EmojiEntry] = []
    groups: List[str] = []
    subgroups: List[str] = []
    group = subgroup = ""
    version = re.compile(r"^E\d+(\.\d+)?\s+")
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                body = line[1:].strip()
                if body.startswith("group:"):
                    group = body.split(":", 1)[1].strip()
                    groups.append(group)
                elif body.startswith("subgroup:"):
                    subgroup = body.split(":", 1)[1].strip()
                    if subgroup not in subgroups:
                        subgroups.append(subgroup)
                continue
            if ";" not in line or "#" not in line:
                continue
            cps_text, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            # comment: "<emoji> E1.0 grinning face"
            parts = comment.strip().split(" ", 1)
            name = version.sub("", parts[1]).strip() if len(parts) > 1 else ""
            try:
                cps = tuple(int(c, 16) for c in cps_text.split())
            except ValueError:
                continue
            entries.append(EmojiEntry(cps, status.strip(), name, group, subgroup))
    return entries, groups, subgroups


# ---------------------------------------------------------------------- the font
def read_font(font_path: str = FONT_PATH):
    """Return (bitmaps {glyph: png bytes} in font order, cmap {cp: glyph},
    ligatures {(glyph, ...): glyph})."""
    from fontTools.ttLib import TTFont

    font = TTFont(font_path, lazy=True)
    try:
        if "CBDT" not in font:
            raise EmojiResourceError(f"{font_path} has no CBDT colour bitmaps: {INSTALL_HINT}")
        strikes = font["CBDT"].strikeData
        # the largest strike (Noto ships one, 136x128 at 109 ppem)
        best: Dict[str, object] = max(strikes, key=len)
        bitmaps: Dict[str, bytes] = {}
        for glyph, bmp in best.items():
            if not hasattr(bmp, "imageData"):
                bmp.decompile()
            data = getattr(bmp, "imageData", b"")
            if data[:8] == b"\x89PNG\r\n\x1a\n":
                bitmaps[glyph] = bytes(data)
        cmap = dict(font.getBestCmap() or {})
        ligatures: Dict[Tuple[str, ...], str] = {}
        if "GSUB" in font:
            for lookup in font["GSUB"].table.LookupList.Lookup:
                for sub in lookup.SubTable:
                    sub = getattr(sub, "ExtSubTable", sub)  # unwrap extension lookups
                    if not hasattr(sub, "ligatures"):  # only ligature substitutions
                        continue
                    for first, ligs in sub.ligatures.items():
                        for lig in ligs:
                            ligatures.setdefault((first, *lig.Component), lig.LigGlyph)
    finally:
        font.close()
    return bitmaps, cmap, ligatures


def glyph_for_sequence(cps: Sequence[int], cmap: Dict[int, str], ligatures: Dict[Tuple[str, ...], str]) -> Optional[str]:
    """Glyph drawn for a code point sequence, or None."""
    key = [c for c in cps if c not in _VARIATION_SELECTORS]
    if not key:
        return None
    glyphs = [cmap.get(c) for c in key]
    if any(g is None for g in glyphs):
        return None
    if len(glyphs) == 1:
        return glyphs[0]
    return ligatures.get(tuple(glyphs))


# ------------------------------------------------------------------- the table
@dataclass
class EmojiTable:
    """All bitmaps of the font at one resolution, named ones first (emoji-test order)."""

    images: np.ndarray  # (N, R, R, 3) uint8 (memory-mapped when read from cache)
    glyphs: List[str]
    names: List[str]  # "" when unnamed
    codepoints: List[str]  # e.g. "1F600" or "1F468 200D 1F4BB"; "" when unnamed
    group: np.ndarray  # (N,) int64 index into group_names, -1 when unnamed
    subgroup: np.ndarray  # (N,) int64 index into subgroup_names, -1 when unnamed
    group_names: List[str]
    subgroup_names: List[str]
    resolution: int
    from_cache: bool = False
    seconds: float = 0.0
    cache_path: Optional[str] = None
    stats: Dict[str, int] = field(default_factory=dict)

    @property
    def num_named(self) -> int:
        return int((self.group >= 0).sum())


def _bitmap_to_square(png: bytes, resolution: int) -> np.ndarray:
    im = Image.open(io.BytesIO(png))
    im.load()
    rgba = im.convert("RGBA")
    w, h = rgba.size
    side = max(w, h)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, dest=((side - w) // 2, (side - h) // 2))
    rgb = canvas.convert("RGB")
    if side != resolution:
        rgb = rgb.resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def _file_key(*paths: str) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"|{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def build_emoji_table(
    resolution: int,
    font_path: Optional[str] = None,
    emoji_test_path: Optional[str] = None,
    threads: Optional[int] = None,
) -> EmojiTable:
    """Decode every bitmap of the font (no cache involved)."""
    font_path, emoji_test_path = _check_resources(font_path, emoji_test_path)
    t0 = time.perf_counter()
    entries, group_names, subgroup_names = parse_emoji_test(emoji_test_path)
    bitmaps, cmap, ligatures = read_font(font_path)
    gidx = {g: i for i, g in enumerate(group_names)}
    sidx = {s: i for i, s in enumerate(subgroup_names)}

    rank = {"fully-qualified": 0, "component": 1, "minimally-qualified": 2, "unqualified": 3}
    best: Dict[str, Tuple[int, int, EmojiEntry]] = {}  # glyph -> (status rank, order, entry)
    unmapped = 0
    for order, e in enumerate(entries):
        g = glyph_for_sequence(e.codepoints, cmap, ligatures)
        if g is None or g not in bitmaps:
            unmapped += 1
            continue
        cand = (rank.get(e.status, 9), order, e)
        if g not in best or cand[:2] < best[g][:2]:
            best[g] = cand
    named = sorted(best.items(), key=lambda kv: kv[1][1])
    unnamed = [g for g in bitmaps if g not in best]

    glyphs = [g for g, _ in named] + unnamed
    names = [v[2].name for _, v in named] + [""] * len(unnamed)
    cps = [" ".join(f"{c:04X}" for c in v[2].codepoints) for _, v in named] + [""] * len(unnamed)
    group = np.array([gidx[v[2].group] for _, v in named] + [-1] * len(unnamed), dtype=np.int64)
    subgroup = np.array([sidx[v[2].subgroup] for _, v in named] + [-1] * len(unnamed), dtype=np.int64)

    images = np.empty((len(glyphs), resolution, resolution, 3), dtype=np.uint8)
    workers = threads or min(4, os.cpu_count() or 1)

    def work(k: int) -> None:
        images[k] = _bitmap_to_square(bitmaps[glyphs[k]], resolution)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(len(glyphs)), chunksize=64))
    else:
        for k in range(len(glyphs)):
            work(k)

    return EmojiTable(
        images=images,
        glyphs=glyphs,
        names=names,
        codepoints=cps,
        group=group,
        subgroup=subgroup,
        group_names=group_names,
        subgroup_names=subgroup_names,
        resolution=resolution,
        seconds=time.perf_counter() - t0,
        stats={
            "bitmaps": len(bitmaps),
            "named": len(named),
            "unnamed": len(unnamed),
            "emoji_test_entries": len(entries),
            "emoji_test_entries_without_bitmap": unmapped,
        },
    )


def load_emoji_table(
    resolution: int = 64,
    cache_dir: Optional[str] = None,
    use_cache: bool = True,
    font_path: Optional[str] = None,
    emoji_test_path: Optional[str] = None,
) -> EmojiTable:
    """Decoded emoji set at ``resolution``, from the cache when possible.

    The cache (``emoji-<R>px-<key>.npy`` + ``.json`` under ``<cache_dir>/emoji``)
    is keyed by resolution, the font and emoji-test.txt (path, size, mtime).
    An unwritable cache directory only costs speed.
    """
    font_path, emoji_test_path = _check_resources(font_path, emoji_test_path)
    if not use_cache:
        return build_emoji_table(resolution, font_path, emoji_test_path)
    t0 = time.perf_counter()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    stem = root / "emoji" / f"emoji-{resolution}px-{_file_key(font_path, emoji_test_path)}"
    npy, meta_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if npy.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            images = np.load(npy, mmap_mode="r")
            n = len(meta["glyphs"])
            if meta.get("version") == CACHE_VERSION and images.shape == (n, resolution, resolution, 3):
                return EmojiTable(
                    images=images,
                    glyphs=meta["glyphs"],
                    names=meta["names"],
                    codepoints=meta["codepoints"],
                    group=np.asarray(meta["group"], dtype=np.int64),
                    subgroup=np.asarray(meta["subgroup"], dtype=np.int64),
                    group_names=meta["group_names"],
                    subgroup_names=meta["subgroup_names"],
                    resolution=resolution,
                    from_cache=True,
                    seconds=time.perf_counter() - t0,
                    cache_path=str(npy),
                    stats=meta.get("stats", {}),
                )
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale cache: rebuild below
    table = build_emoji_table(resolution, font_path, emoji_test_path)
    try:
        npy.parent.mkdir(parents=True, exist_ok=True)
        tmp_npy = npy.with_name(npy.name + f".tmp{os.getpid()}.npy")
        tmp_meta = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
        np.save(tmp_npy, table.images)
        meta = {
            "version": CACHE_VERSION,
            "resolution": resolution,
            "font": os.path.realpath(font_path),
            "emoji_test": os.path.realpath(emoji_test_path),
            "glyphs": table.glyphs,
            "names": table.names,
            "codepoints": table.codepoints,
            "group": table.group.tolist(),
            "subgroup": table.subgroup.tolist(),
            "group_names": table.group_names,
            "subgroup_names": table.subgroup_names,
            "stats": table.stats,
        }
        tmp_meta.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp_npy, npy)
        os.replace(tmp_meta, meta_path)
        table.cache_path = str(npy)
    except OSError:
        pass
    return table


# ------------------------------------------------------------------- the dataset
class EmojiDataset(ImageDataset):
    """Noto Color Emoji bitmaps as a dataset.

    ``label``: "none" (-1), "group" (10 classes) or "subgroup" (one class per
    emoji-test.txt subgroup). ``captions``: the emoji name ("grinning face").
    ``crop`` has no effect (the images are already square at the resolution);
    ``hflip`` flips with probability 0.5.
    """

    source = "emoji"

    def __init__(
        self,
        cfg: Optional[DataConfig] = None,
        font_path: Optional[str] = None,
        emoji_test_path: Optional[str] = None,
    ):
        cfg = cfg or DataConfig()
        super().__init__(cfg)
        self.location = resource_paths(font_path, emoji_test_path)[0]
        self.table = load_emoji_table(cfg.resolution, cfg.cache_dir, True, font_path, emoji_test_path)
        t = self.table
        keep = np.arange(len(t.glyphs)) if cfg.emoji_keep_unnamed else np.nonzero(t.group >= 0)[0]
        self.items = keep.astype(np.int64)
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
        caption = self.table.names[row] if self.cfg.captions else ""
        return uint8_to_tensor(arr), int(self._labels[row]), caption


# ------------------------------------------------------------------- the export
def _slug(text: str, limit: int = 60) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-")) or "x"


def export_emoji(
    out_dir: str,
    size: int = 64,
    label: str = "group",
    keep_unnamed: bool = False,
    cache_dir: Optional[str] = None,
    font_path: Optional[str] = None,
    emoji_test_path: Optional[str] = None,
) -> Dict[str, object]:
    """Write the emoji set as an image folder readable by the ``imagefolder`` source.

    Layout: ``<out_dir>/<NN>-<class-slug>/<NNNNN>-<name-slug>.png`` with a
    caption sidecar ``.txt`` next to each PNG and ``<out_dir>/metadata.jsonl``
    (``file_name``, ``text``, ``label``, ``group``, ``subgroup``,
    ``codepoints``). Class folders are numbered so that their sorted order
    equals the emoji dataset's label order. ``label="none"`` writes all files
    directly into ``out_dir``. Returns ``{"out_dir", "count", "class_names",
    "seconds"}``.
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
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
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
            target.with_suffix(".txt").write_text(name + "\n", encoding="utf-8")
            rec = {
                "file_name": rel,
                "text": name,
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
