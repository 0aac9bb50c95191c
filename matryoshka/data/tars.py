"""Tar shards with the standard ``tarfile``: random access to members of local, uncompressed
tars (the ``webdataset`` source), and streaming any tar (the ``shards`` source).

A shard is scanned once (headers only: ``tarfile`` seeks over member data) to
record ``name -> (offset, size)``; members are then read with ``os.pread`` on
a file descriptor cached per process, so the datasets stay map-style and work
in DataLoader workers.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TarScan:
    path: str
    members: dict[str, tuple[int, int]]  # name -> (data offset, size), in file order
    error: str | None = None  # why the scan stopped early (None: whole shard read)
    compressed: bool = False


def scan_tar(path: str) -> TarScan:
    """Index the regular-file members of a tar. Never raises for a bad shard:
    a missing, unreadable, compressed or truncated shard is reported in ``error``
    (members fully contained in the file before the damage are kept)."""
    members: dict[str, tuple[int, int]] = {}
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        return TarScan(path, members, f"{type(exc).__name__}: {exc}")
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00":
        return TarScan(path, members, "compressed tar shards are not supported (use plain .tar)", compressed=True)
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            while True:
                try:
                    info = tf.next()
                except tarfile.ReadError as exc:
                    return TarScan(path, members, f"ReadError: {exc}")
                if info is None:
                    break
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    return TarScan(path, members, f"member {info.name!r} extends past the end of the file")
                members[info.name] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        return TarScan(path, members, f"{type(exc).__name__}: {exc}")
    return TarScan(path, members)


_FDS: OrderedDict[str, int] = OrderedDict()
_FDS_PID: int | None = None
MAX_OPEN_SHARDS = 64


def read_member(path: str, offset: int, size: int) -> bytes:
    """Read ``size`` bytes at ``offset`` of ``path``.

    Descriptors are cached per process (at most :data:`MAX_OPEN_SHARDS`, least
    recently used closed first); a forked worker opens its own.
    """
    global _FDS_PID
    if os.getpid() != _FDS_PID:  # forked worker: the parent's descriptors are not ours
        _FDS.clear()
        _FDS_PID = os.getpid()
    fd = _FDS.get(path)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        _FDS[path] = fd
        while len(_FDS) > MAX_OPEN_SHARDS:
            _, old = _FDS.popitem(last=False)
            os.close(old)
    else:
        _FDS.move_to_end(path)
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"short read from {path} at {offset}: {len(data)} of {size} bytes")
    return data


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` (zero padding kept), ``{a..e}`` and ``{x,y,z}``; several
    groups multiply out, e.g. ``shard-{0..1}-{a,b}.tar`` gives four names."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?", body)
    if rng:
        a, b = int(rng.group(1)), int(rng.group(2))
        step = int(rng.group(3) or 1) or 1
        padded = rng.group(1).startswith("0") or rng.group(2).startswith("0")
        width = max(len(rng.group(1)), len(rng.group(2))) if padded else 0
        seq = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        options = [str(v).zfill(width) for v in seq]
    elif re.fullmatch(r"[A-Za-z]\.\.[A-Za-z]", body):
        a, b = ord(body[0]), ord(body[-1])
        options = [chr(c) for c in (range(a, b + 1) if a <= b else range(a, b - 1, -1))]
    else:
        options = body.split(",")
    out: list[str] = []
    for opt in options:
        out.extend(expand_braces(head + opt + tail))
    return out


def expand_shards(spec: str) -> list[str]:
    """Shard list from a spec: brace patterns, glob patterns, or a directory
    (all ``*.tar`` in it, sorted). Several specs may be joined with ``::``.
    Names that match nothing are returned as they are (reported as missing later)."""
    shards: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        part = str(Path(part).expanduser())
        if Path(part).is_dir():
            # glob.glob, not Path.glob: only glob.glob leaves out hidden files
            shards.extend(sorted(glob.glob(str(Path(part, "*.tar")))))
            continue
        for name in expand_braces(part):
            if glob.has_magic(name):
                shards.extend(sorted(glob.glob(name)))
            else:
                shards.append(name)
    return shards


def split_key(name: str) -> tuple[str, str]:
    """``a/b/0001.seg.png`` -> (``a/b/0001``, ``seg.png``)."""
    head, sep, base = name.rpartition("/")  # tar member names use "/" on every platform
    stem, _, ext = base.partition(".")
    return head + sep + stem, ext.lower()


class _Tracked:
    """Read-only stream wrapper that counts bytes and keeps the last few, so the end of a tar can be checked."""

    TAIL = 1 << 16

    def __init__(self, raw):
        self.raw, self.total, self.tail = raw, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.TAIL :]
        return data


class _Prefixed:
    """``prefix`` followed by the rest of ``raw`` (to sniff a compression magic number on a stream)."""

    def __init__(self, prefix: bytes, raw):
        self.prefix, self.raw = prefix, raw

    def read(self, n: int = -1) -> bytes:
        if not self.prefix:
            return self.raw.read(n)
        head = self.prefix if n < 0 else self.prefix[:n]
        self.prefix = self.prefix[len(head) :]
        rest = self.raw.read(-1 if n < 0 else n - len(head)) if n < 0 or len(head) < n else b""
        return head + rest


def iter_tar_stream(raw) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for each run of members sharing a key, in the order of the
    tar (plain or gzip-compressed) read from the binary stream ``raw``; nothing is seeked.

    Raises on a damaged stream after yielding the samples completed before the damage
    (the sample being assembled when it happened is dropped). ``tarfile`` in stream mode
    ends quietly when a shard is cut short, so member sizes and the end-of-archive block
    are checked here."""
    magic = raw.read(2)
    stream = _Prefixed(magic, raw)
    tracked = _Tracked(gzip.GzipFile(fileobj=stream) if magic == b"\x1f\x8b" else stream)
    with tarfile.open(fileobj=tracked, mode="r|") as tf:
        key, parts = None, {}
        for info in tf:
            if not info.isreg():
                continue
            data = tf.extractfile(info).read()
            if len(data) != info.size:
                raise tarfile.ReadError(f"member {info.name!r} ends after {len(data)} of {info.size} bytes")
            tf.members = []  # a stream of millions of members: keep no TarInfo list
            k, ext = split_key(info.name)
            if k != key and parts:
                yield key, parts
                parts = {}
            key = k
            parts.setdefault(ext, data)
        while tracked.read(1 << 16):  # the padding after the end-of-archive blocks
            pass
        at = tf.offset - (tracked.total - len(tracked.tail))
        end = tracked.tail[at : at + tarfile.BLOCKSIZE] if at >= 0 else bytes(tarfile.BLOCKSIZE)
        if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"no end-of-archive block after {tf.offset} bytes: the shard is cut short")
        if parts:
            yield key, parts
