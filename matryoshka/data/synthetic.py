"""Small synthetic files for tests and smoke runs: images in awkward modes,
broken images, and writers for the tar / TSV layouts the sources read."""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import numpy as np
from PIL import Image


def solid_image(mode: str, size: Tuple[int, int] = (40, 30), value=None) -> Image.Image:
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


def gradient_image(size: Tuple[int, int] = (48, 32)) -> Image.Image:
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


def truncated_png(size: Tuple[int, int] = (64, 64)) -> bytes:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), "PNG")
    return data[: len(data) // 2]


def corrupt_bytes(n: int = 200) -> bytes:
    """Bytes that no image decoder recognises."""
    return b"this is not an image " * (n // 21 + 1)


def write(path: Union[str, os.PathLike], data: Union[bytes, str, Image.Image], fmt: Optional[str] = None) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if isinstance(data, Image.Image):
        data.save(path, format=fmt)
    else:
        with open(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def write_tar(path: Union[str, os.PathLike], members: Union[Mapping[str, bytes], Iterable[Tuple[str, bytes]]]) -> str:
    """Write a plain tar with the given ``name -> bytes`` members (in order)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    items = members.items() if isinstance(members, Mapping) else members
    with tarfile.open(path, "w") as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return path


def write_tsv(path: Union[str, os.PathLike], header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    import csv

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quotechar='"', lineterminator="\n")
        w.writerow(list(header))
        for row in rows:
            w.writerow(list(row))
    return path


def write_jsonl(path: Union[str, os.PathLike], records: Iterable[Dict]) -> str:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return write(path, lines)
