"""Small synthetic files for the data tests: images in awkward modes, broken
images, and writers for the tar / TSV layouts the sources read."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image


def solid_image(mode: str, size: tuple[int, int] = (40, 30), value=None) -> Image.Image:
    """A one-colour image in ``mode`` (RGB, RGBA, LA, L, P, CMYK, I;16, ...)."""
    w, h = size
    if mode == "I;16":
        v = 65535 if value is None else value
        return Image.fromarray(np.full((h, w), v, dtype=np.uint16))
    if mode == "P":
        im = Image.new("P", size, 1)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
        return im
    default = {"RGB": (255, 0, 0), "RGBA": (255, 0, 0, 0), "LA": (0, 0), "L": 128, "CMYK": (0, 255, 255, 0), "1": 1}
    return Image.new(mode, size, default.get(mode, 0) if value is None else value)


def gradient_image(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """An RGB image whose red channel increases left to right and green top to bottom."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None].repeat(w, 1)
    arr = np.stack([x, y, np.full_like(x, 64)], -1).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def truncated_png(size: tuple[int, int] = (64, 64)) -> bytes:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), "PNG")
    return data[: len(data) // 2]


def corrupt_bytes(n: int = 200) -> bytes:
    """Bytes that no image decoder recognises."""
    return b"this is not an image " * (n // 21 + 1)


def _parent_made(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write(path: str | os.PathLike, data: bytes | str | Image.Image, fmt: str | None = None) -> str:
    path = _parent_made(path)
    if isinstance(data, Image.Image):
        data.save(path, format=fmt)
    else:
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)


def write_tar(path: str | os.PathLike, members: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> str:
    """Write a plain tar with the given ``name -> bytes`` members (in order)."""
    path = _parent_made(path)
    items = members.items() if isinstance(members, Mapping) else members
    with tarfile.open(path, "w") as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def write_tsv(path: str | os.PathLike, header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    path = _parent_made(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quotechar='"', lineterminator="\n")
        w.writerow(list(header))
        for row in rows:
            w.writerow(list(row))
    return str(path)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> str:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return write(path, lines)
