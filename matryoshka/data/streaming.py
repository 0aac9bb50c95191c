"""``shards`` source: WebDataset tar shards streamed in order, with no up-front index.

Shards may be local files, ``http(s)://`` URLs and ``pipe:`` commands (opened with the
``webdataset`` library's ``gopen``), or any other fsspec URL (``s3://``, ``gs://``, ...; the
matching fsspec backend must be installed). ``.tar`` and compressed ``.tar.gz`` / ``.tgz``
both work; so do ``.parquet`` files of rows in the Hugging Face layout (see :mod:`.hf`).
Only the shard names are expanded when the dataset is made; a shard is opened when a
worker reaches it.

The stream
----------
There are ``G = world_size * max(num_workers, 1)`` slots; slot ``g = rank * workers + w``.
Epoch ``e`` orders the shards with ``randperm`` seeded by ``mix(seed, e)`` and slot ``g`` reads
positions ``g, g + G, ...`` of that order, so within an epoch every shard is read by exactly
one slot. Each slot reads its epochs back to back as one endless stream of *raw samples*
(groups of members sharing a key). Sample shuffling is a window of ``shuffle_buffer`` raw
samples permuted with a seed of ``(seed, slot, window)``; a window never needs more than its
own samples, so a position in the emitted stream is cheap to reach again.

A batch is ``batch_size`` consecutive emitted samples of one slot; DataLoader workers take
turns, so global step ``k`` is batch ``k // workers`` of worker ``k % workers``. Resuming at
step ``k`` therefore only needs arithmetic plus skipping: whole shards are skipped without
opening them when their sample count is known (counts are learned as shards are read and
kept in the loader's ``state_dict``), otherwise their members are read but not decoded.

Shards are read with the standard ``tarfile`` module in stream mode
(:func:`~matryoshka.data.tars.iter_tar_stream`), which needs no seeking and no member index.

With ``data.frames > 0`` the shards hold videos: a sample's video member (``mp4``, ``webm``,
``avi``, ``gif``, ``mkv``, ``mov``, ``m4v``) becomes a clip (3, frames, R, R) exactly as the
``videofolder`` source makes one from a file (:mod:`.clips`), seeded per sample like an image's crop.

A sample that cannot be used (no image or video, bad label, undecodable or too short) keeps its place in
the stream and is replaced by the slot's previous good sample, so positions never shift;
it is counted. A slot stops with an error once more than half of what it tried failed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import random
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .base import SkipLog
from .clips import VIDEO_EXTENSIONS, read_clip
from .config import DataConfig
from .images import BadImage, decode_text, load_image
from .loader import collate, mix_seed
from .tars import expand_braces, iter_tar_stream

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# A gif is an image in image shards and a video in video shards (data.frames > 0).
VIDEO_KEYS = tuple(suffix[1:] for suffix in VIDEO_EXTENSIONS)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".parquet")
# Sample ids: shard number in the expanded list << SAMPLE_BITS | sample number in the shard.
SAMPLE_BITS = 24
# A slot gives up when failures outnumber successes, but only after this many tries,
# so one bad shard at the very start is not mistaken for a broken data set.
MIN_TRIES_FOR_FAILURE_CHECK = 16
_GOPEN_SCHEMES = ("", "file", "pipe", "http", "https")

Parts = dict[str, bytes]


class DataFailureError(RuntimeError):
    """Most of what a streaming slot tried to read failed: the data or the network is broken."""


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def shard_urls(spec: str) -> list[str]:
    """Shard names from ``spec``: brace patterns, URLs, ``pipe:`` commands, local globs or a
    local folder (its ``*.tar``, ``*.tar.gz``, ``*.tgz``, ``*.parquet``), joined with ``::``. Only names are
    made: nothing is opened, and a brace pattern is not checked against the disk."""
    urls: list[str] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            continue
        if is_remote(part):
            urls.extend(expand_braces(part))
            continue
        part = str(Path(part).expanduser())
        if Path(part).is_dir():
            names = (glob.glob(str(Path(part, "*" + suffix))) for suffix in SHARD_SUFFIXES)
            urls.extend(sorted(n for group in names for n in group))
            continue
        for name in expand_braces(part):
            urls.extend(sorted(glob.glob(name)) if glob.has_magic(name) else [name])
    return urls


def open_shard(url: str):
    """A readable binary stream of ``url``."""
    if urlparse(url).scheme in _GOPEN_SCHEMES or url.startswith("pipe:"):
        from webdataset import gopen

        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def iter_samples(url: str) -> Iterator[tuple[str, Parts]]:
    """Samples of one shard: a tar (plain or gzip), or a Parquet file of rows (Hugging Face layout)."""
    raw = open_shard(url)
    try:
        if urlparse(url).path.endswith(".parquet"):
            from .hf import iter_parquet_samples

            yield from iter_parquet_samples(raw)
        else:
            yield from iter_tar_stream(raw)
    finally:
        # Closing a pipe (curl, pipe:) that was not read to the end reports the SIGPIPE exit as an
        # error; a real failure has already shown up while reading (content checks, read errors).
        with contextlib.suppress(OSError):
            raw.close()


def parse_sample(parts: Parts, cfg: DataConfig, num_classes: int) -> tuple[str, int, str]:
    """(image or video extension, label, caption) of a sample; raises BadImage when it is unusable."""
    keys, missing = (VIDEO_KEYS, "no_video") if cfg.frames else (IMAGE_KEYS, "no_image")
    ext = next((e for e in keys if e in parts), None)
    if ext is None:
        raise BadImage(missing, "members: " + ",".join(sorted(parts)))
    label = -1
    if cfg.label == "cls":
        try:
            label = int(parts["cls"].decode("utf-8").strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            raise BadImage("missing_label", "no valid .cls member") from None
        if not 0 <= label < num_classes:
            raise BadImage("missing_label", f".cls {label} outside 0..{num_classes - 1} (data.num_classes)")
    caption = ""
    if cfg.captions:
        if "txt" in parts:
            caption = decode_text(parts["txt"])[0]
        elif "json" in parts:
            try:
                rec = json.loads(decode_text(parts["json"])[0])
            except ValueError:
                rec = {}
            cap = rec.get("caption", rec.get("text", "")) if isinstance(rec, dict) else ""
            caption = cap.strip() if isinstance(cap, str) else ""
    return ext, label, caption


class StreamingShards(IterableDataset):
    """The ``shards`` source (see the module docstring). Iterate it through
    :func:`matryoshka.data.make_loader`, which sets the slot layout and start position."""

    source = "shards"
    streaming = True

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.resolution = cfg.resolution
        self.location = cfg.path or ""
        self.urls = shard_urls(self.location)
        if not self.urls:
            raise FileNotFoundError(f"shards: {cfg.path!r} names no shard (data.path)")
        self.class_names = [str(k) for k in range(cfg.num_classes)] if cfg.label == "cls" else []
        self.skip_log = SkipLog()
        self.samples_read = 0
        # set by the loader before iterating
        self.layout: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        raise TypeError("a streaming shards dataset has no length: its samples are only counted as they are read")

    def describe(self, index: int) -> str:
        return f"{self.urls[index >> SAMPLE_BITS]}#{index & ((1 << SAMPLE_BITS) - 1)}"

    # ------------------------------------------------------------------ reporting
    @property
    def skipped(self) -> dict[str, Any]:
        log = self.skip_log
        return {
            "total": log.total,
            "index_time": 0,
            "load_time": log.total,
            "by_reason": dict(log.counts),
            "examples": {r: list(v) for r, v in log.examples.items()},
            "warnings": dict(log.warnings),
            "warning_examples": {k: list(v) for k, v in log.warning_examples.items()},
        }

    def skip_report(self) -> str:
        log = self.skip_log
        line = f"{self.source} {self.location!r}: {len(self.urls)} shards, {self.samples_read} samples read"
        if log.total:
            counts = ", ".join(f"{r}={c}" for r, c in sorted(log.counts.items(), key=lambda kv: (-kv[1], kv[0])))
            eg = [v[0] for v in log.examples.values() if v][:3]
            line += f", {log.total} skipped ({counts}; e.g. {', '.join(eg)})"
        else:
            line += ", 0 skipped"
        return line

    def first_captions(self, num: int) -> list[str]:
        """Captions of the first ``num`` usable samples in shard-list order (e.g. for sample prompts)."""
        out: list[str] = []
        for url in self.urls:
            try:
                for _, parts in iter_samples(url):
                    try:
                        out.append(parse_sample(parts, self.cfg, self.num_classes)[2])
                    except BadImage:
                        continue
                    if len(out) == num:
                        return out
            except (OSError, tarfile.TarError, ValueError, EOFError):
                continue
        return out + [""] * (num - len(out))

    # ------------------------------------------------------------------ the stream
    def shard_order(self, epoch: int) -> list[int]:
        if not self.layout.get("shuffle", True):
            return list(range(len(self.urls)))
        g = torch.Generator()
        g.manual_seed(mix_seed(self.layout.get("seed", 0), epoch, 0x5A4D))
        return torch.randperm(len(self.urls), generator=g).tolist()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lay = self.layout
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = lay.get("start_step", 0)
        # Workers take turns and the DataLoader asks worker 0 first, so after a restart at
        # step k worker 0 must play the reader that step k belongs to.
        reader = (worker + start) % workers
        slot = lay.get("rank", 0) * workers + reader
        slots = lay.get("world_size", 1) * workers
        done = max(0, -(-(start - reader) // workers))  # batches this reader made before step k
        return _SlotStream(self, slot, slots, dict(lay.get("counts", {}))).batches(done * lay["batch_size"])


class _SlotStream:
    """One slot's endless stream of batches; runs in a DataLoader worker (or the main process)."""

    def __init__(self, ds: StreamingShards, slot: int, slots: int, counts: dict[str, int]):
        if slots > len(ds.urls):
            raise ValueError(
                f"shards: {len(ds.urls)} shard(s) for {slots} readers (ranks x workers); every reader needs at least "
                "one shard: use fewer data.num_workers or write more, smaller shards (mdm data shards --per-shard)"
            )
        self.ds, self.cfg, self.slot, self.slots = ds, ds.cfg, slot, slots
        self.seed = ds.layout.get("seed", 0)
        self.window = max(1, self.cfg.shuffle_buffer) if ds.layout.get("shuffle", True) else 1
        self.counts = counts
        self.new_counts: dict[str, int] = {}
        self.log = SkipLog()  # since the last batch: sent to the main process with each batch
        self.all_failures = SkipLog()  # for the error message when most of the data fails
        self.ok = self.failed = 0
        self.where: dict[str, Any] = {}

    # raw samples ---------------------------------------------------------------
    def _check_failures(self) -> None:
        if self.failed > self.ok and self.failed + self.ok >= MIN_TRIES_FOR_FAILURE_CHECK:
            counts = ", ".join(f"{r}={c}" for r, c in self.all_failures.counts.items())
            eg = "; ".join(v[0] for v in self.all_failures.examples.values() if v)
            raise DataFailureError(
                f"shards {self.ds.location!r}: reader {self.slot} failed on {self.failed} of {self.failed + self.ok} "
                f"shards/samples ({counts}), e.g. {eg}: stopping rather than training on a fraction of the data"
            )

    def _fail(self, reason: str, where: str, detail: str = "") -> None:
        self.failed += 1
        self.log.add(reason, where, detail)
        self.all_failures.add(reason, where, detail)
        self._check_failures()

    def _read_shard(self, sn: int, skip: int) -> Iterator[tuple[int, Parts]]:
        """Samples ``skip, skip+1, ...`` of shard ``sn``; records its sample count when it is reliable."""
        url = self.ds.urls[sn]
        remote = is_remote(url)
        attempts = self.cfg.retries + 1 if remote else 1
        got = 0  # samples of this shard seen so far (yielded or skipped)
        for attempt in range(attempts):
            try:
                for j, (_, parts) in enumerate(iter_samples(url)):
                    if j >= got:
                        got = j + 1
                        if j >= skip:
                            yield j, parts
                self.ok += 1
                self.counts[url] = self.new_counts[url] = got
                return
            except (OSError, tarfile.TarError, ValueError, EOFError) as exc:
                detail = f"{type(exc).__name__}: {exc}"
                if not remote and got == 0 and not Path(url).exists():
                    self._fail("unreadable_shard", url, "file not found")
                    self.counts[url] = 0
                    return
                if attempt + 1 < attempts:
                    time.sleep(self.cfg.retry_delay * 2**attempt)  # back off: the server may be overloaded
                    continue
                if got:  # the damage is past the complete samples, which are kept
                    self._fail("truncated_shard", url, detail)
                    if not remote:  # a local file is cut the same way every time: its count is reliable
                        self.counts[url] = self.new_counts[url] = got
                    return
                self._fail("unreadable_shard", url, detail)

    def _raw(self, start: int) -> Iterator[tuple[int, int, Parts]]:
        """(epoch, sample id, parts) of raw samples ``start, start+1, ...`` of this slot."""
        epoch, pos = 0, 0
        while True:
            mine = self.ds.shard_order(epoch)[self.slot :: self.slots]
            read_any = False
            for sn in mine:
                url = self.ds.urls[sn]
                known = self.counts.get(url)
                if known is not None and pos + known <= start:
                    pos, read_any = pos + known, read_any or known > 0
                    continue
                self.where = {"epoch": epoch, "shard": url}
                for j, parts in self._read_shard(sn, max(0, start - pos)):
                    self.where["sample"] = j + 1
                    yield epoch, (sn << SAMPLE_BITS) | j, parts
                n = self.counts.get(url, 0)  # unknown (unreadable remote shard): it held nothing this time
                pos += n
                read_any = read_any or n > 0
            if not read_any:
                raise DataFailureError(
                    f"shards {self.ds.location!r}: reader {self.slot} found no readable sample in any of its "
                    f"{len(mine)} shards in epoch {epoch}; {self.all_failures.total} failures, e.g. "
                    + "; ".join(v[0] for v in self.all_failures.examples.values() if v)
                )
            epoch += 1

    def _shuffled(self, start: int) -> Iterator[tuple[int, int, Parts]]:
        """Raw samples permuted within windows of ``self.window``, from emitted position ``start``."""
        w = self.window
        index, offset = divmod(start, w)
        raw = self._raw(index * w)
        while True:
            chunk = [next(raw) for _ in range(w)]
            if w > 1:
                seed = mix_seed(self.seed, self.slot, index, 0x5B0F)
                self.where["window_seed"] = seed
                chunk = [chunk[i] for i in torch.randperm(w, generator=torch.Generator().manual_seed(seed)).tolist()]
            yield from chunk[offset:]
            index, offset = index + 1, 0

    # samples and batches -------------------------------------------------------
    def _decode(self, epoch: int, sid: int, parts: Parts) -> dict[str, Any]:
        cfg = self.cfg
        ext, label, caption = parse_sample(parts, cfg, self.ds.num_classes)
        if not parts[ext]:
            raise BadImage("zero_bytes")
        rng = random.Random(mix_seed(self.seed, epoch, sid, 0xA06))
        if cfg.frames:
            image = read_clip(parts[ext], cfg, rng)
        else:
            image = load_image(parts[ext], cfg.resolution, cfg.crop, cfg.hflip, rng, cfg.max_image_pixels)
        return {"image": image, "label": label, "caption": caption, "index": sid}

    def batches(self, start: int) -> Iterator[dict[str, Any]]:
        bs = self.ds.layout["batch_size"]
        last: dict[str, Any] | None = None
        owed = 0  # failures before the first good sample: filled with it once there is one
        batch: list[dict[str, Any]] = []
        read = 0
        for epoch, sid, parts in self._shuffled(start):
            read += 1
            try:
                last = self._decode(epoch, sid, parts)
                self.ok += 1
                batch.extend([last] * (owed + 1))
                owed = 0
            except BadImage as bad:
                self._fail(bad.reason, self.ds.describe(sid), bad.detail)
                if last is None:
                    owed += 1
                else:
                    batch.append(last)
            while len(batch) >= bs:
                out = collate(batch[:bs])
                batch = batch[bs:]
                out["_stream"] = {
                    "slot": self.slot,
                    "position": dict(self.where),
                    "counts": self.new_counts,
                    "skips": self.log,
                    "read": read,
                }
                self.new_counts, self.log, read = {}, SkipLog(), 0
                yield out
