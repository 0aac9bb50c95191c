"""The two inputs of the built-in emoji set: ``emoji-test.txt`` and the Noto Color Emoji font.

The PNG bitmaps embedded in the font's CBDT table are read directly with
fontTools (no text rendering). An emoji-test.txt sequence is mapped to the glyph
that draws it with the cmap table (single code points) and the GSUB ligature
lookups (ZWJ sequences, skin tones, flags, keycaps).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_PATH = "/usr/share/unicode/emoji/emoji-test.txt"
INSTALL_HINT = (
    "install the Debian packages `fonts-noto-color-emoji` and `unicode-data` "
    "(apt-get install fonts-noto-color-emoji unicode-data)"
)
# The font's cmap has no glyph for the variation selectors, so sequences are looked up without them.
_VARIATION_SELECTORS = (0xFE0E, 0xFE0F)

Ligatures = dict[tuple[str, ...], str]


class EmojiResourceError(FileNotFoundError):
    """The emoji font or emoji-test.txt is missing."""


def resource_paths(font_path: str | None = None, emoji_test_path: str | None = None) -> tuple[str, str]:
    """Font and emoji-test.txt paths: the arguments, else ``$MATRYOSHKA_EMOJI_FONT`` /
    ``$MATRYOSHKA_EMOJI_TEST``, else the Debian locations."""
    font = font_path or os.environ.get("MATRYOSHKA_EMOJI_FONT") or FONT_PATH
    test = emoji_test_path or os.environ.get("MATRYOSHKA_EMOJI_TEST") or EMOJI_TEST_PATH
    return font, test


def check_resources(font_path: str | None = None, emoji_test_path: str | None = None) -> tuple[str, str]:
    """:func:`resource_paths`, raising :class:`EmojiResourceError` when either file is missing."""
    font_path, emoji_test_path = resource_paths(font_path, emoji_test_path)
    missing = [p for p in (font_path, emoji_test_path) if not Path(p).is_file()]
    if missing:
        raise EmojiResourceError(f"emoji data not found ({', '.join(missing)}): {INSTALL_HINT}")
    return font_path, emoji_test_path


# ----------------------------------------------------------------- emoji-test.txt
@dataclass
class EmojiEntry:
    codepoints: tuple[int, ...]
    status: str
    name: str
    group: str
    subgroup: str


def parse_emoji_test(path: str = EMOJI_TEST_PATH) -> tuple[list[EmojiEntry], list[str], list[str]]:
    """Parse emoji-test.txt -> (entries in file order, group names, subgroup names)."""
    entries: list[EmojiEntry] = []
    groups: list[str] = []
    subgroups: list[str] = []
    group = subgroup = ""
    version = re.compile(r"^E\d+(\.\d+)?\s+")
    with Path(path).open(encoding="utf-8") as f:
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
def read_font(font_path: str = FONT_PATH) -> tuple[dict[str, bytes], dict[int, str], Ligatures]:
    """Return (bitmaps {glyph: png bytes} in font order, cmap {cp: glyph},
    ligatures {(glyph, ...): glyph})."""
    # imported here: fontTools is only needed to build the table, not to load it from the cache
    from fontTools.ttLib import TTFont

    font = TTFont(font_path, lazy=True)
    try:
        if "CBDT" not in font:
            raise EmojiResourceError(f"{font_path} has no CBDT colour bitmaps: {INSTALL_HINT}")
        strikes = font["CBDT"].strikeData
        # the largest strike (Noto ships one, 136x128 at 109 ppem)
        best = max(strikes, key=len)
        bitmaps: dict[str, bytes] = {}
        for glyph, bmp in best.items():
            if not hasattr(bmp, "imageData"):
                bmp.decompile()
            data = getattr(bmp, "imageData", b"")
            if data[:8] == b"\x89PNG\r\n\x1a\n":
                bitmaps[glyph] = bytes(data)
        cmap = dict(font.getBestCmap() or {})
        ligatures: Ligatures = {}
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


def glyph_for_sequence(cps: Sequence[int], cmap: dict[int, str], ligatures: Ligatures) -> str | None:
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
