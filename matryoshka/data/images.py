"""Image decoding and preprocessing shared by every source.

Pipeline: open with PIL (size checked against a pixel limit first) -> any mode
to RGB (alpha composited on white, 16-bit scaled to 8-bit) -> resize the
shortest side to ``resolution`` (Lanczos) -> centre or random crop -> optional
horizontal flip -> float32 tensor (3, H, W) in [-1, 1].

Every failure is reported as :class:`BadImage` with a short ``reason`` code so
datasets can skip and count it.
"""

from __future__ import annotations

import io
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .config import DEFAULT_MAX_IMAGE_PIXELS

# Never decode a truncated file into a partly grey image: it must be skipped.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# A sane global limit in case Pillow's default was switched off elsewhere; the
# per-dataset ``max_image_pixels`` check below is applied in any case.
if Image.MAX_IMAGE_PIXELS is None:
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Reason codes used in skip summaries (index time and load time).
REASONS = (
    "missing_file",  # path listed but not on disk
    "zero_bytes",  # empty file / member
    "unreadable",  # permission or I/O error
    "not_an_image",  # PIL cannot identify the format
    "truncated",  # file ends early
    "corrupt",  # anything else PIL rejects while decoding
    "decompression_bomb",  # more pixels than max_image_pixels
    "unsupported_mode",  # a pixel mode that cannot be turned into RGB
    "unreadable_shard",  # a tar shard / shard TSV that cannot be opened
    "truncated_shard",  # a tar shard cut short: the complete members are kept
    "missing_member",  # a TSV row names a member that is not in its tar
    "bad_row",  # a malformed TSV row
    "no_image",  # a webdataset sample with no image member
    "missing_label",  # a label was requested but the item has none
    "too_short",  # a video with fewer frames than a clip needs
    "no_video",  # a video shard sample with no video member
)

BytesOrPath = str | os.PathLike | bytes | bytearray | memoryview


class BadImage(Exception):
    """An item that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _classify(exc: BaseException) -> BadImage:
    if isinstance(exc, BadImage):
        return exc
    text = str(exc)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return BadImage("decompression_bomb", text)
    if isinstance(exc, UnidentifiedImageError):
        return BadImage("not_an_image", "unrecognised image format")
    if isinstance(exc, FileNotFoundError):
        return BadImage("missing_file", text)
    if isinstance(exc, (PermissionError, IsADirectoryError)):
        return BadImage("unreadable", text)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return BadImage("truncated", text or type(exc).__name__)
    return BadImage("corrupt", f"{type(exc).__name__}: {text}")


def _as_file(src: BytesOrPath):
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise BadImage("zero_bytes", "empty data")
        return io.BytesIO(bytes(src))
    try:
        data = Path(src).read_bytes()
    except FileNotFoundError as exc:
        raise BadImage("missing_file", str(exc)) from None
    except OSError as exc:
        raise BadImage("unreadable", str(exc)) from None
    if len(data) == 0:
        raise BadImage("zero_bytes", "file is empty")
    return io.BytesIO(data)


def _open_checked(src: BytesOrPath, max_pixels: int) -> Image.Image:
    """``Image.open`` with the pixel-count check; only the header is read."""
    fp = _as_file(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(fp)
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadImage("corrupt", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise BadImage("decompression_bomb", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    return im


def verify_image(src: BytesOrPath, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Cheap decodability check (header, pixel limit, ``PIL.Image.verify``).

    Raises :class:`BadImage`. ``verify`` checks PNG chunk CRCs and structure
    without decoding pixels; truncated JPEGs usually pass and are caught at
    load time instead.
    """
    try:
        im = _open_checked(src, max_pixels)
        try:
            im.verify()
        finally:
            im.close()
    except BadImage:
        raise
    except Exception as exc:
        raise _classify(exc) from None


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16BS", "I;16LS")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode == "F":
            top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
            arr = arr * (255.0 / top)
        elif mode in _SIXTEEN_BIT or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        arr = np.nan_to_num(np.clip(np.rint(arr), 0, 255)).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise BadImage("unsupported_mode", f"mode {mode}: {exc}") from None


def resize_crop_flip(
    im: Image.Image,
    resolution: int,
    crop: str = "center",
    hflip: bool = False,
    rng: random.Random | None = None,
) -> Image.Image:
    """Resize the shortest side to ``resolution`` (Lanczos), crop a square, maybe flip."""
    rng = rng or random
    w, h = im.size
    scale = resolution / min(w, h)
    nw = max(resolution, round(w * scale))
    nh = max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.LANCZOS, reducing_gap=3.0)
    if crop == "random":
        left = rng.randint(0, nw - resolution)
        top = rng.randint(0, nh - resolution)
    else:
        left = (nw - resolution) // 2
        top = (nh - resolution) // 2
    if (left, top, nw, nh) != (0, 0, resolution, resolution):
        im = im.crop((left, top, left + resolution, top + resolution))
    if hflip and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return im


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> float32 (3, H, W) tensor in [-1, 1]."""
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32)
    return t.div_(127.5).sub_(1.0)


def decode_rgb(src: BytesOrPath, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_side: int = 0) -> Image.Image:
    """Decode a file path or bytes into an RGB PIL image (raises :class:`BadImage`).

    ``min_side`` lets JPEG decoding use draft mode (DCT scaling) while keeping
    the shortest side at least that large.
    """
    try:
        im = _open_checked(src, max_pixels)
        if min_side and im.format == "JPEG":
            w, h = im.size
            s = min_side / min(w, h)
            if s < 0.5:
                im.draft(im.mode, (int(w * s) + 1, int(h * s) + 1))
        im = ImageOps.exif_transpose(im) if _has_orientation(im) else im
        im.load()
        return to_rgb(im)
    except BadImage:
        raise
    except Exception as exc:
        raise _classify(exc) from None


def _has_orientation(im: Image.Image) -> bool:
    try:
        return im.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:
        return False


def load_image(
    src: BytesOrPath,
    resolution: int,
    crop: str = "center",
    hflip: bool = False,
    rng: random.Random | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """Full pipeline: file/bytes -> float32 (3, resolution, resolution) in [-1, 1]."""
    im = decode_rgb(src, max_pixels=max_pixels, min_side=resolution)
    try:
        im = resize_crop_flip(im, resolution, crop, hflip, rng)
        arr = np.array(im, dtype=np.uint8)
    except Exception as exc:
        raise _classify(exc) from None
    return uint8_to_tensor(arr)


def decode_text(data: bytes) -> tuple[str, bool]:
    """UTF-8 (BOM allowed) with replacement; returns (text, was_valid_utf8)."""
    try:
        return data.decode("utf-8-sig").strip(), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace").strip(), False
