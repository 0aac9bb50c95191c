"""``webdataset`` source: local, uncompressed tar shards in WebDataset layout.

Members are grouped into samples by key: the member path up to the first "."
of its file name (``dir/0001.jpg`` and ``dir/0001.txt`` -> key ``dir/0001``).
Per sample:

* image: the first of ``jpg jpeg png webp`` (then ``bmp gif tif tiff``) present;
* label="cls": the integer in the ``.cls`` member (samples without one are skipped);
* captions: the ``.txt`` member, else ``"caption"`` or ``"text"`` of the ``.json`` member.

The shards are indexed once when the dataset is built (map-style dataset).
An unreadable/compressed shard is skipped and counted (``unreadable_shard``);
a truncated shard keeps its complete members and is counted as ``truncated_shard``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .base import ImageDataset
from .config import DataConfig
from .images import BadImage, decode_text, load_image, verify_image
from .tars import expand_shards, read_member, scan_tar, split_key

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

Member = tuple[int, int, int]  # (shard number, offset, size)


class WebDatasetTarDataset(ImageDataset):
    source = "webdataset"

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.shards = expand_shards(cfg.path or "")
        if not self.shards:
            raise FileNotFoundError(f"webdataset: pattern {cfg.path!r} matches no shard (data.path)")
        self._found: Counter = Counter()
        # items: (shard number, key, image member, label, caption)
        self.items: list[tuple[int, str, Member, int, str]] = []
        labels_seen = set()
        for sn, shard in enumerate(self.shards):
            scan = scan_tar(shard)
            if scan.error is not None:
                if not Path(shard).exists():
                    self.skip_log.add("unreadable_shard", shard, "file not found")
                elif scan.members:
                    self.skip_log.add("truncated_shard", shard, scan.error)
                else:
                    self.skip_log.add("unreadable_shard", shard, scan.error)
            if scan.members or scan.error is None:
                self._found["readable shards"] += 1
            samples: dict[str, dict[str, Member]] = {}
            for name, (off, size) in scan.members.items():
                key, ext = split_key(name)
                samples.setdefault(key, {}).setdefault(ext, (sn, off, size))
            self._found["samples"] += len(samples)
            for key, parts in samples.items():
                item = self._make_item(sn, shard, key, parts)
                if item is not None:
                    self.items.append(item)
                    labels_seen.add(item[3])
        if cfg.label == "cls" and self.items:
            top = max(labels_seen)
            self.class_names = [str(k) for k in range(top + 1)]
        self._finish_index()

    def _read(self, member: Member) -> bytes:
        sn, off, size = member
        return read_member(self.shards[sn], off, size)

    def _make_item(self, sn: int, shard: str, key: str, parts: dict[str, Member]):
        cfg = self.cfg
        where = f"{shard}:{key}"
        ext = next((e for e in IMAGE_KEYS if e in parts), None)
        if ext is None:
            self.skip_log.add("no_image", where, "members: " + ",".join(sorted(parts)))
            return None
        image = parts[ext]
        label = -1
        if cfg.label == "cls":
            label = self._read_cls(parts.get("cls"), where)
            if label is None:
                return None
        if image[2] == 0:
            self.skip_log.add("zero_bytes", f"{where}.{ext}")
            return None
        if cfg.verify:
            try:
                verify_image(self._read(image), cfg.max_image_pixels)
            except BadImage as bad:
                self.skip_log.add_bad(bad, f"{where}.{ext}")
                return None
            except OSError as exc:
                self.skip_log.add("unreadable", f"{where}.{ext}", str(exc))
                return None
        caption = self._read_caption(parts, where) if cfg.captions else ""
        return (sn, f"{key}.{ext}", image, label, caption)

    def _read_cls(self, member: Member | None, where: str) -> int | None:
        if member is None:
            self.skip_log.add("missing_label", where, "no .cls member")
            return None
        try:
            value = int(self._read(member).decode("utf-8").strip())
            if value < 0:
                raise ValueError("negative")
            return value
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            self.skip_log.add("missing_label", where, f"bad .cls: {exc}")
            return None

    def _read_caption(self, parts: dict[str, Member], where: str) -> str:
        try:
            if "txt" in parts:
                text, ok = decode_text(self._read(parts["txt"]))
                if not ok:
                    self.skip_log.warn("caption_not_utf8", where + ".txt")
                return text
            if "json" in parts:
                text, ok = decode_text(self._read(parts["json"]))
                if not ok:
                    self.skip_log.warn("caption_not_utf8", where + ".json")
                rec = json.loads(text)
                cap = rec.get("caption", rec.get("text", "")) if isinstance(rec, dict) else ""
                return cap.strip() if isinstance(cap, str) else ""
        except (ValueError, OSError):
            self.skip_log.warn("bad_caption", where)
        return ""

    def _found_summary(self) -> str:
        return (
            f"{len(self.shards)} shard(s) matching {self.cfg.path!r} "
            f"({self._found['readable shards']} readable, {self._found['samples']} samples)"
        )

    def describe(self, i: int) -> str:
        sn, name = self.items[i][0], self.items[i][1]
        return f"{self.shards[sn]}:{name}"

    def _load(self, i, rng):
        _, _, member, label, caption = self.items[i]
        cfg = self.cfg
        try:
            data = self._read(member)
        except OSError as exc:
            raise BadImage("unreadable", str(exc)) from None
        image = load_image(data, cfg.resolution, cfg.crop, cfg.hflip, rng, cfg.max_image_pixels)
        return image, label, caption
