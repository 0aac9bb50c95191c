"""Write any map-style dataset as WebDataset shards (``mdm data shards``), for the ``shards`` source.

An image folder keeps its original files (any size, no re-encoding); other sources are
written as PNGs of their decoded images at the dataset's resolution. Each sample is
``<key>.<ext>`` plus ``<key>.txt`` (caption, if any) and ``<key>.cls`` (label, if any).
Shards are written with the ``webdataset`` library's ``ShardWriter``.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from .base import ImageDataset
from .imagefolder import ImageFolderDataset

# image folders may hold these; the shards source reads all of them
_EXTENSIONS = {
    ".jpg": "jpg",
    ".jpeg": "jpg",
    ".png": "png",
    ".webp": "webp",
    ".bmp": "bmp",
    ".gif": "gif",
    ".tif": "tif",
    ".tiff": "tif",
}


def _png(image) -> bytes:
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def dataset_records(dataset: ImageDataset) -> Iterator[dict[str, Any]]:
    """One ``ShardWriter`` record per usable item, in dataset order."""
    for i in range(len(dataset)):
        if isinstance(dataset, ImageFolderDataset):
            path = Path(dataset.path(i))
            _, label, caption = dataset.items[i]
            image = {_EXTENSIONS[path.suffix.lower()]: path.read_bytes()}
        else:
            sample = dataset[(i, 0)]
            if int(sample["index"]) != i:  # failed to decode: the loader substituted another item
                continue
            label, caption = int(sample["label"]), sample["caption"]
            image = {"png": _png(sample["image"])}
        record: dict[str, Any] = {"__key__": f"{i:09d}", **image}
        if caption:
            record["txt"] = caption
        if label >= 0:
            record["cls"] = str(label)
        yield record


def write_shards(dataset: ImageDataset, out: str | Path, per_shard: int) -> dict[str, Any]:
    """Write ``dataset`` into ``out/shard-000000.tar, ...`` with ``per_shard`` samples each.

    Also writes ``out/info.json`` (count, shard pattern, class names). Returns that summary."""
    import webdataset

    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    count = 0
    with webdataset.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for record in dataset_records(dataset):
            sink.write(record)
            count += 1
        shards = sink.shard
    pattern = str(out / f"shard-{{000000..{max(shards - 1, 0):06d}}}.tar")
    summary = {
        "count": count,
        "shards": shards,
        "pattern": pattern,
        "class_names": list(dataset.class_names),
        "seconds": round(time.perf_counter() - start, 3),
    }
    (out / "info.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
