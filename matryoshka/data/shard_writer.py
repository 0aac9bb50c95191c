"""Write any map-style dataset as WebDataset shards (``mdm data shards``), for the ``shards`` source.

An image or video folder keeps its original files (any size and length, no re-encoding);
other sources are written as PNGs of their decoded images at the dataset's resolution, or,
for clips (``emoji-motion``), as H.264 mp4s of their frames. Each sample is ``<key>.<ext>``
plus ``<key>.txt`` (caption, if any) and ``<key>.cls`` (label, if any).
Shards are written with the ``webdataset`` library's ``ShardWriter``.
"""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from ..utils.video import clip_frames, encode_mp4
from .base import ImageDataset
from .imagefolder import ImageFolderDataset
from .videofolder import VideoFolderDataset

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


def dataset_records(dataset: ImageDataset, fps: float = 8.0) -> Iterator[dict[str, Any]]:
    """One ``ShardWriter`` record per usable item, in dataset order (``fps``: of encoded clips)."""
    for i in range(len(dataset)):
        if isinstance(dataset, ImageFolderDataset):
            path = Path(dataset.path(i))
            _, label, caption = dataset.items[i]
            image = {_EXTENSIONS[path.suffix.lower()]: path.read_bytes()}
        elif isinstance(dataset, VideoFolderDataset):
            # the whole video, not one clip of it: the reader picks clips (start, stride) itself
            path = dataset.video_path(i)
            label, caption = dataset.items[i][1], dataset.caption(path)
            image = {path.suffix.lower()[1:]: path.read_bytes()}
        else:
            sample = dataset[(i, 0)]
            if int(sample["index"]) != i:  # failed to decode: the loader substituted another item
                continue
            label, caption = int(sample["label"]), sample["caption"]
            pixels = sample["image"]
            image = {"mp4": encode_mp4(clip_frames(pixels), fps)} if pixels.ndim == 4 else {"png": _png(pixels)}
        record: dict[str, Any] = {"__key__": f"{i:09d}", **image}
        if caption:
            record["txt"] = caption
        if label >= 0:
            record["cls"] = str(label)
        yield record


def write_shards(
    dataset: ImageDataset, out: str | Path, per_shard: int, count: int | None = None, fps: float = 8.0
) -> dict[str, Any]:
    """Write ``dataset`` (its first ``count`` usable items, or all) into ``out/shard-000000.tar, ...``
    with ``per_shard`` samples each; clips that are not files already are mp4s at ``fps``.

    Also writes ``out/info.json`` (count, shard pattern, class names). Returns that summary."""
    import webdataset

    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    written = 0
    with webdataset.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for record in itertools.islice(dataset_records(dataset, fps), count):
            sink.write(record)
            written += 1
        shards = sink.shard
    pattern = str(out / f"shard-{{000000..{max(shards - 1, 0):06d}}}.tar")
    summary = {
        "count": written,
        "shards": shards,
        "pattern": pattern,
        "class_names": list(dataset.class_names),
        "seconds": round(time.perf_counter() - start, 3),
    }
    (out / "info.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
