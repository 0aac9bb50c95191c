"""The decoded emoji set: every bitmap of the font at one resolution, named and labelled.

Each bitmap glyph is named through ``emoji-test.txt``; the name, group and
subgroup come from the first entry (fully-qualified first) that reaches the
glyph. Bitmaps (136x128 RGBA) are composited on white, padded to a centred white
square, and resized to the requested resolution with Lanczos. The decoded set is
cached as a ``.npy`` uint8 array (memory-mapped on later loads) plus a ``.json``
file of names and labels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .emoji_font import EmojiEntry, check_resources, glyph_for_sequence, parse_emoji_test, read_font

# Part of the cache key: bump it when the cached arrays or metadata change meaning.
CACHE_VERSION = 1
# Which emoji-test.txt entry names a glyph that several sequences reach (lowest first).
_STATUS_RANK = {"fully-qualified": 0, "component": 1, "minimally-qualified": 2, "unqualified": 3}


def default_cache_dir() -> Path:
    """``$MATRYOSHKA_CACHE``, else ``$XDG_CACHE_HOME/matryoshka``, else ``~/.cache/matryoshka``."""
    env = os.environ.get("MATRYOSHKA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "matryoshka"


@dataclass
class EmojiTable:
    """All bitmaps of the font at one resolution, named ones first (emoji-test order)."""

    images: np.ndarray  # (N, R, R, 3) uint8 (memory-mapped when read from cache)
    glyphs: list[str]
    names: list[str]  # "" when unnamed
    codepoints: list[str]  # e.g. "1F600" or "1F468 200D 1F4BB"; "" when unnamed
    group: np.ndarray  # (N,) int64 index into group_names, -1 when unnamed
    subgroup: np.ndarray  # (N,) int64 index into subgroup_names, -1 when unnamed
    group_names: list[str]
    subgroup_names: list[str]
    resolution: int
    from_cache: bool = False
    seconds: float = 0.0
    cache_path: str | None = None
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def num_named(self) -> int:
        return int((self.group >= 0).sum())


def spread_evenly(rows: np.ndarray, count: int) -> np.ndarray:
    """``count`` of ``rows`` spread evenly over them (``data.sprites``: a smaller emoji vocabulary); 0: all."""
    if not count:
        return rows
    if count > len(rows):
        raise ValueError(f"data.sprites={count}, but the emoji set has only {len(rows)} emoji")
    return rows[np.linspace(0, len(rows) - 1, count).round().astype(int)]


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
        st = Path(p).stat()
        h.update(f"|{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def build_emoji_table(
    resolution: int,
    font_path: str | None = None,
    emoji_test_path: str | None = None,
    threads: int | None = None,
) -> EmojiTable:
    """Decode every bitmap of the font (no cache involved)."""
    font_path, emoji_test_path = check_resources(font_path, emoji_test_path)
    t0 = time.perf_counter()
    entries, group_names, subgroup_names = parse_emoji_test(emoji_test_path)
    bitmaps, cmap, ligatures = read_font(font_path)
    gidx = {g: i for i, g in enumerate(group_names)}
    sidx = {s: i for i, s in enumerate(subgroup_names)}

    best: dict[str, tuple[int, int, EmojiEntry]] = {}  # glyph -> (status rank, order, entry)
    unmapped = 0
    for order, e in enumerate(entries):
        g = glyph_for_sequence(e.codepoints, cmap, ligatures)
        if g is None or g not in bitmaps:
            unmapped += 1
            continue
        cand = (_STATUS_RANK.get(e.status, 9), order, e)
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
    cache_dir: str | None = None,
    use_cache: bool = True,
    font_path: str | None = None,
    emoji_test_path: str | None = None,
) -> EmojiTable:
    """Decoded emoji set at ``resolution``, from the cache when possible.

    The cache (``emoji-<R>px-<key>.npy`` + ``.json`` under ``<cache_dir>/emoji``)
    is keyed by resolution, the font and emoji-test.txt (path, size, mtime).
    An unwritable cache directory only costs speed.
    """
    font_path, emoji_test_path = check_resources(font_path, emoji_test_path)
    if not use_cache:
        return build_emoji_table(resolution, font_path, emoji_test_path)
    t0 = time.perf_counter()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    stem = root / "emoji" / f"emoji-{resolution}px-{_file_key(font_path, emoji_test_path)}"
    npy, meta_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    cached = _read_cache(npy, meta_path, resolution)
    if cached is not None:
        cached.seconds = time.perf_counter() - t0
        return cached
    table = build_emoji_table(resolution, font_path, emoji_test_path)
    meta = {
        "version": CACHE_VERSION,
        "resolution": resolution,
        "font": str(Path(font_path).resolve()),
        "emoji_test": str(Path(emoji_test_path).resolve()),
        "glyphs": table.glyphs,
        "names": table.names,
        "codepoints": table.codepoints,
        "group": table.group.tolist(),
        "subgroup": table.subgroup.tolist(),
        "group_names": table.group_names,
        "subgroup_names": table.subgroup_names,
        "stats": table.stats,
    }
    try:
        npy.parent.mkdir(parents=True, exist_ok=True)
        # write under temporary names, then rename: a reader never sees half a file
        tmp_npy = npy.with_name(npy.name + f".tmp{os.getpid()}.npy")
        tmp_meta = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
        np.save(tmp_npy, table.images)
        tmp_meta.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        tmp_npy.replace(npy)
        tmp_meta.replace(meta_path)
        table.cache_path = str(npy)
    except OSError:
        pass
    return table


def _read_cache(npy: Path, meta_path: Path, resolution: int) -> EmojiTable | None:
    """The cached table, or None when it is missing, unreadable or stale."""
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        images = np.load(npy, mmap_mode="r")
        n = len(meta["glyphs"])
        if meta.get("version") != CACHE_VERSION or images.shape != (n, resolution, resolution, 3):
            return None
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
            cache_path=str(npy),
            stats=meta.get("stats", {}),
        )
    except (OSError, ValueError, KeyError):
        return None
