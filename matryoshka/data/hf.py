"""Hugging Face data: the ``hf`` source (a local ``datasets`` data set, map-style) and
row streaming of Parquet shards for the ``shards`` source.

``hf``: ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
(the ``train`` split is used), or ``.parquet`` / ``.arrow`` files (brace or glob patterns, a
folder of them, several joined with ``::``), loaded with the ``datasets`` library.

Columns, for both: the image is the first column with the ``datasets.Image`` feature, else the
first of ``image img jpg png webp`` (image bytes or ``{"bytes", "path"}``); the caption is ``text``
or ``caption``; ``label="cls"`` reads ``label`` (class names from a ``ClassLabel`` feature).
"""

from __future__ import annotations

import glob
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import ImageDataset
from .config import DataConfig
from .images import BadImage, load_image, verify_image
from .tars import expand_braces

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp")
CAPTION_COLUMNS = ("text", "caption")
# Video cells: raw bytes or {"bytes", "path"} (the layout of an encoded video column).
VIDEO_COLUMNS = ("video", "mp4", "webm", "avi", "mkv", "mov", "m4v")


def _files(spec: str) -> list[str]:
    files: list[str] = []
    for part in (p.strip() for p in spec.split("::") if p.strip()):
        part = str(Path(part).expanduser())
        if Path(part).is_dir():
            files += sorted(glob.glob(str(Path(part, "*.parquet"))) + glob.glob(str(Path(part, "*.arrow"))))
            continue
        for name in expand_braces(part):
            files += sorted(glob.glob(name)) if glob.has_magic(name) else [name]
    return files


def load_hf(spec: str):
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder or Parquet/Arrow files."""
    import datasets

    folder = Path(spec).expanduser()
    if folder.is_dir() and any((folder / n).exists() for n in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"hf: {spec!r} holds the splits {list(loaded)} but no 'train' split (data.path)")
            loaded = loaded["train"]
        return loaded
    files = _files(spec)
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise FileNotFoundError(f"hf: {spec!r}: no such data set folder or file {missing[:3] or ''} (data.path)")
    kinds = {Path(f).suffix for f in files}
    if kinds - {".parquet", ".arrow"} or len(kinds) > 1:
        raise ValueError(f"hf: {spec!r} must name .parquet or .arrow files (one kind), got {sorted(kinds)} (data.path)")
    return datasets.load_dataset(kinds.pop()[1:], data_files=files, split="train")


def image_column(features: dict[str, Any]) -> str | None:
    import datasets

    named = [n for n, f in features.items() if isinstance(f, datasets.Image)]
    return (named or [n for n in IMAGE_COLUMNS if n in features] or [None])[0]


def cell_bytes(value: Any) -> bytes:
    """Bytes of an image or video cell: raw bytes, or ``{"bytes", "path"}`` as the ``Image`` and
    ``Video`` features store it."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        return b""
    return bytes(value) if value is not None else b""


class HFDataset(ImageDataset):
    source = "hf"

    def __init__(self, cfg: DataConfig):
        import datasets

        super().__init__(cfg)
        table = load_hf(cfg.path or "")
        self.image_column = image_column(table.features)
        if self.image_column is None:
            raise ValueError(f"hf: {cfg.path!r} has no image column (columns: {list(table.features)}) (data.path)")
        if isinstance(table.features[self.image_column], datasets.Image):
            table = table.cast_column(self.image_column, datasets.Image(decode=False))  # decode ourselves
        self.table = table
        labels = [-1] * len(table)
        if cfg.label == "cls":
            if "label" not in table.features:
                raise ValueError(
                    f"hf: data.label='cls' needs a 'label' column; {cfg.path!r} has {list(table.features)}"
                )
            feature = table.features["label"]
            labels = [-1 if v is None else int(v) for v in table["label"]]
            top = max(labels, default=-1)
            names = getattr(feature, "names", None)
            self.class_names = list(names) if names else [str(k) for k in range(top + 1)]
        column = next((c for c in CAPTION_COLUMNS if c in table.features), None) if cfg.captions else None
        captions = [(c or "").strip() if isinstance(c, str) else "" for c in table[column]] if column else None
        self.items: list[tuple[int, int, str]] = []  # (row, label, caption)
        for row, label in enumerate(labels):
            if cfg.label == "cls" and label < 0:
                self.skip_log.add("missing_label", f"row {row}")
                continue
            if cfg.verify:
                try:
                    verify_image(self._bytes(row), cfg.max_image_pixels)
                except BadImage as bad:
                    self.skip_log.add_bad(bad, f"row {row}")
                    continue
                except OSError as exc:
                    self.skip_log.add("unreadable", f"row {row}", str(exc))
                    continue
            self.items.append((row, label, captions[row] if captions else ""))
        self._finish_index()

    def _bytes(self, row: int) -> bytes:
        data = cell_bytes(self.table[row][self.image_column])
        if not data:
            raise BadImage("zero_bytes")
        return data

    def _found_summary(self) -> str:
        return f"{len(self.table)} rows with columns {list(self.table.features)}"

    def describe(self, i: int) -> str:
        return f"row {self.items[i][0]}"

    def _load(self, i, rng):
        row, label, caption = self.items[i]
        cfg = self.cfg
        try:
            data = self._bytes(row)
        except OSError as exc:
            raise BadImage("unreadable", str(exc)) from None
        return load_image(data, cfg.resolution, cfg.crop, cfg.hflip, rng, cfg.max_image_pixels), label, caption


def _image_ext(data: bytes) -> str:
    # the shards source picks the image member by extension; the decoder itself sniffs the format
    return "png" if data[:4] == b"\x89PNG" else "webp" if data[8:12] == b"WEBP" else "jpg"


def _video_ext(data: bytes) -> str:
    # a video member's key names its container; FFmpeg probes the bytes themselves when decoding
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1aE\xdf\xa3":
        return "webm"
    if data[:4] == b"RIFF" and data[8:11] == b"AVI":
        return "avi"
    return "gif" if data[:4] == b"GIF8" else "mkv"


def iter_parquet_samples(raw) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(row key, {ext: bytes})`` for the rows of a Parquet file opened as ``raw``, like tar samples: an
    image column, a video column (for ``data.frames > 0``), a caption and a label."""
    import pyarrow.parquet as pq

    if not (hasattr(raw, "seekable") and raw.seekable()):
        raw = io.BytesIO(raw.read())  # Parquet keeps its index at the end: a pipe or HTTP stream is read whole
    parquet = pq.ParquetFile(raw)
    names = parquet.schema_arrow.names
    image = next((n for n in IMAGE_COLUMNS if n in names), None)
    caption = next((c for c in CAPTION_COLUMNS if c in names), None)
    video = next((n for n in VIDEO_COLUMNS if n in names), None)
    row = 0
    for batch in parquet.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            parts: dict[str, bytes] = {}
            data = cell_bytes(record.get(image)) if image else b""
            if data:
                parts[_image_ext(data)] = data
            clip = cell_bytes(record.get(video)) if video else b""
            if clip:
                parts[_video_ext(clip)] = clip
            if caption and isinstance(record.get(caption), str):
                parts["txt"] = record[caption].encode("utf-8")
            if record.get("label") is not None:
                parts["cls"] = str(record["label"]).encode()
            yield f"{row:09d}", parts
            row += 1
