"""``mlmdm-tsv`` source: the TSV layout of Apple's ml-mdm.

Two kinds of tab-separated files (first line is a header, ``"`` quoting):

* an index TSV with the single column ``filename``: one shard TSV per line
  (ml-mdm's ``training_0.tsv`` / ``sample_training_0.tsv``);
* a shard TSV with the columns ``tar``, ``file``, ``caption`` (extra columns,
  e.g. a trailing empty one, are ignored): ``tar`` is a tar file and ``file``
  the member name of the image inside it.

``DataConfig.path`` may name either kind. ml-mdm writes paths relative to the
directory it was run from (e.g. ``tests/test_files/images_00000.tar``); here a
relative path is looked up, in order, relative to the folder of the TSV that
names it, the current directory, the ancestors of that folder (and of the
index TSV's folder), and finally by its base name next to the TSV.

Missing or unreadable shard TSVs and tar files, members not in their tar and
malformed rows are skipped and counted (per row).
"""

from __future__ import annotations

import csv
import io
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .base import ImageDataset, absolute
from .config import DataConfig
from .images import BadImage, decode_text, load_image, verify_image
from .tars import TarScan, read_member, scan_tar

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def resolve_path(name: str, referrer: str, extra_bases: Sequence[str] = ()) -> str | None:
    """Find ``name`` (as written in the TSV ``referrer``) on disk; None if not found."""
    wanted = Path(name.strip()).expanduser()
    if wanted.is_absolute():
        return str(wanted) if wanted.exists() else None
    ref_dir = absolute(referrer).parent
    bases = [ref_dir, Path.cwd(), *ref_dir.parents]
    for extra in map(Path, extra_bases):
        bases += [extra, *extra.parents]
    for base in dict.fromkeys(bases):  # each base once, in order
        cand = absolute(base / wanted)
        if cand.exists():
            return str(cand)
    cand = ref_dir / wanted.name
    return str(cand) if cand.exists() else None


class MLMDMTSVDataset(ImageDataset):
    source = "mlmdm-tsv"

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        index = str(absolute(cfg.path or ""))
        self.index_path = index
        self.location = index
        if not Path(index).is_file():
            raise FileNotFoundError(f"mlmdm-tsv: TSV file {index!r} does not exist (data.path)")
        header, rows = self._read_tsv(index)
        cols = [h.strip().lower() for h in header]
        if "tar" in cols and "file" in cols:
            shard_tsvs = [index]
        elif cols and cols[0] == "filename":
            shard_tsvs = []
            for row in rows:
                if not row or not row[0].strip():
                    continue
                found = resolve_path(row[0], index)
                if found is None:
                    self.skip_log.add("unreadable_shard", row[0].strip(), "shard TSV not found")
                else:
                    shard_tsvs.append(found)
        else:
            raise ValueError(
                f"mlmdm-tsv: {index!r} has header {header!r}; expected an index TSV (column "
                "'filename') or a shard TSV (columns 'tar', 'file', 'caption')"
            )
        self.shard_tsvs = shard_tsvs
        self._tars: dict[str, TarScan] = {}
        self.tar_paths: list[str] = []
        self._tar_ids: dict[str, int] = {}
        self._found: Counter = Counter()
        # items: (tar id, member name, offset, size, caption)
        self.items: list[tuple[int, str, int, int, str]] = []
        for tsv in shard_tsvs:
            self._index_shard(tsv, index)
        self._finish_index()

    def _read_tsv(self, path: str) -> tuple[list[str], list[list[str]]]:
        text, ok = decode_text(Path(path).read_bytes())
        if not ok:
            self.skip_log.warn("caption_not_utf8", path)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quotechar='"')
        rows = list(reader)
        if not rows:
            return [], []
        return rows[0], rows[1:]

    def _index_shard(self, tsv: str, index: str) -> None:
        cfg = self.cfg
        try:
            header, rows = self._read_tsv(tsv)
        except OSError as exc:
            self.skip_log.add("unreadable_shard", tsv, str(exc))
            return
        self._found["shard TSVs"] += 1
        self._found["rows"] += len(rows)
        cols = [h.strip().lower() for h in header]
        if "tar" not in cols or "file" not in cols:
            self.skip_log.add("unreadable_shard", tsv, f"header {header!r} lacks 'tar' and 'file'")
            return
        ti, fi = cols.index("tar"), cols.index("file")
        ci = cols.index("caption") if "caption" in cols else None
        need = max(ti, fi) + 1
        for lineno, row in enumerate(rows, 2):
            if not any(c.strip() for c in row):
                continue
            where = f"{tsv}:{lineno}"
            if len(row) < need or not row[ti].strip() or not row[fi].strip():
                self.skip_log.add("bad_row", where, f"{len(row)} columns")
                continue
            tar_name, member = row[ti].strip(), row[fi].strip()
            tar = resolve_path(tar_name, tsv, [str(Path(index).parent)])
            if tar is None:
                self.skip_log.add("missing_file", f"{tar_name}:{member}", f"tar not found (row {where})")
                continue
            scan = self._scan(tar)
            if member not in scan.members:
                if scan.error is not None and (scan.compressed or not scan.members):
                    self.skip_log.add("unreadable_shard", f"{tar}:{member}", scan.error)
                else:
                    self.skip_log.add("missing_member", f"{tar}:{member}", f"not in tar (row {where})")
                continue
            off, size = scan.members[member]
            if size == 0:
                self.skip_log.add("zero_bytes", f"{tar}:{member}")
                continue
            tid = self._tar_ids[tar]
            if cfg.verify:
                try:
                    verify_image(read_member(tar, off, size), cfg.max_image_pixels)
                except BadImage as bad:
                    self.skip_log.add_bad(bad, f"{tar}:{member}")
                    continue
                except OSError as exc:
                    self.skip_log.add("unreadable", f"{tar}:{member}", str(exc))
                    continue
            caption = row[ci].strip() if (cfg.captions and ci is not None and ci < len(row)) else ""
            self.items.append((tid, member, off, size, caption))

    def _scan(self, tar: str) -> TarScan:
        scan = self._tars.get(tar)
        if scan is None:
            scan = scan_tar(tar)
            self._tars[tar] = scan
            self._tar_ids[tar] = len(self.tar_paths)
            self.tar_paths.append(tar)
            if scan.error is not None and scan.members:
                self.skip_log.warn("truncated_tar", tar)
        return scan

    def _found_summary(self) -> str:
        return f"{len(self.shard_tsvs)} shard TSV(s) with {self._found['rows']} rows, {len(self.tar_paths)} tar file(s)"

    def describe(self, i: int) -> str:
        tid, member = self.items[i][0], self.items[i][1]
        return f"{self.tar_paths[tid]}:{member}"

    def _load(self, i, rng):
        tid, _, off, size, caption = self.items[i]
        cfg = self.cfg
        try:
            data = read_member(self.tar_paths[tid], off, size)
        except OSError as exc:
            raise BadImage("unreadable", str(exc)) from None
        image = load_image(data, cfg.resolution, cfg.crop, cfg.hflip, rng, cfg.max_image_pixels)
        return image, -1, caption
