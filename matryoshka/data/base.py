"""Common dataset machinery: the sample format, skip accounting, substitution.

Every dataset returns ``{"image": float32 (3, R, R) in [-1, 1], "label": int
(-1 if none), "caption": str ("" if none), "index": int}``.

Bad items are never silent:

* index time: files found unusable while the dataset is built (zero bytes,
  failed ``verify``, unreadable shard ...) are left out and recorded in a
  :class:`SkipLog`;
* load time: an item that fails to decode in ``__getitem__`` is replaced by the
  next usable item and its reason code is written into a small shared-memory
  tensor (one int8 per item), so failures seen inside DataLoader worker
  processes are visible from the main process too.

``dataset.skipped`` merges both into one summary and ``dataset.skip_report()``
formats it as a single line.
"""

from __future__ import annotations

import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image
from torch.utils.data import Dataset

from .config import DataConfig
from .images import REASONS, BadImage

# How many following items are tried before __getitem__ gives up.
MAX_SUBSTITUTIONS = 64


class EmptyDatasetError(RuntimeError):
    """A dataset has no usable item; raised while building it, before training."""


class SkipLog:
    """Counts of skipped items by reason, with a few example locations each."""

    def __init__(self, max_examples: int = 5):
        self.max_examples = max_examples
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.warnings: Counter = Counter()
        self.warning_examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{where} ({detail})" if detail else where)

    def add_bad(self, bad: BadImage, where: str) -> None:
        self.add(bad.reason, where, bad.detail)

    def warn(self, kind: str, where: str) -> None:
        """Something odd but usable (e.g. a caption that is not valid UTF-8)."""
        self.warnings[kind] += 1
        ex = self.warning_examples.setdefault(kind, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def absolute(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, made absolute and ``..`` removed lexically.

    Like ``os.path.abspath``; ``Path.resolve`` would also follow symlinks, which would
    change the paths shown in reports and the keys captions are matched by.
    """
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


def _short(where: str, limit: int = 80) -> str:
    return where if len(where) <= limit else "..." + where[-(limit - 3) :]


ItemKey = int | tuple[int, int]


class ImageDataset(Dataset):
    """Base class. Subclasses set ``self.items`` (any per-item records), call
    :meth:`_finish_index` at the end of ``__init__`` and implement :meth:`_load`.
    """

    source: str = "?"

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.resolution = cfg.resolution
        self.location = cfg.path or ""
        self.skip_log = SkipLog()
        self.class_names: list[str] = []
        self._load_fail: torch.Tensor | None = None
        if Image.MAX_IMAGE_PIXELS is not None and cfg.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            # let Pillow's own bomb check follow the (larger) configured limit
            Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels

    # --------------------------------------------------------------- subclass API
    def __len__(self) -> int:
        return len(self.items)

    def _load(self, i: int, rng: random.Random) -> tuple[torch.Tensor, int, str]:
        """Return (image, label, caption) for item ``i``; raise BadImage if unusable."""
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Human-readable location of item ``i`` (used in skip reports)."""
        return f"item {i}"

    def _found_summary(self) -> str:
        """What was found while indexing, for the empty-dataset error."""
        return ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------------ internals
    def _finish_index(self) -> None:
        n = len(self)
        if n == 0:
            found = self._found_summary()
            msg = f"{self.source} dataset at {self.location!r} has no usable images"
            if found:
                msg += f"; found {found}"
            if self.skip_log.total:
                msg += f"; skipped {self._reason_text(self.skip_log.counts)}"
                first = next(iter(self.skip_log.examples.values()))
                msg += f" (e.g. {first[0]})"
            raise EmptyDatasetError(msg)
        fail = torch.zeros(n, dtype=torch.int8)
        try:
            fail.share_memory_()
        except (RuntimeError, OSError):  # pragma: no cover - no /dev/shm: per-process counts
            pass
        self._load_fail = fail

    @staticmethod
    def _reason_text(counts: dict[str, int]) -> str:
        return ", ".join(f"{r}={c}" for r, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        """``key`` is an index, or ``(index, seed)`` for reproducible augmentation."""
        if isinstance(key, (tuple, list)):
            i, seed = int(key[0]), int(key[1])
            rng = random.Random(seed)
        else:
            i = int(key)
            rng = random.Random()
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for dataset of size {n}")
        fail = self._load_fail
        for step in range(min(n, MAX_SUBSTITUTIONS)):
            j = (i + step) % n
            if fail is not None and int(fail[j]) != 0:
                continue
            try:
                image, label, caption = self._load(j, rng)
            except BadImage as bad:
                if fail is not None:
                    fail[j] = REASONS.index(bad.reason) + 1
                continue
            return {"image": image, "label": int(label), "caption": caption, "index": j}
        raise RuntimeError(
            f"{self.source} dataset at {self.location!r}: {MAX_SUBSTITUTIONS} consecutive items "
            f"starting at index {i} could not be loaded; {self.skip_report()}"
        )

    # ------------------------------------------------------------------ reporting
    @property
    def skipped(self) -> dict[str, Any]:
        """Summary of everything left out.

        ``{"total", "index_time", "load_time", "by_reason": {reason: n},
        "examples": {reason: [where, ...]}, "warnings": {kind: n},
        "warning_examples": {kind: [where, ...]}}``. Load-time failures are
        included even when they happened in DataLoader worker processes.
        """
        by_reason: Counter = Counter(self.skip_log.counts)
        examples = {r: list(v) for r, v in self.skip_log.examples.items()}
        load_time = 0
        if self._load_fail is not None:
            codes = self._load_fail
            bad = torch.nonzero(codes).flatten().tolist()
            load_time = len(bad)
            for j in bad:
                reason = REASONS[int(codes[j]) - 1]
                by_reason[reason] += 1
                ex = examples.setdefault(reason, [])
                if len(ex) < self.skip_log.max_examples:
                    ex.append(self.describe(j) + " (at load time)")
        return {
            "total": sum(by_reason.values()),
            "index_time": self.skip_log.total,
            "load_time": load_time,
            "by_reason": dict(by_reason),
            "examples": examples,
            "warnings": dict(self.skip_log.warnings),
            "warning_examples": {k: list(v) for k, v in self.skip_log.warning_examples.items()},
        }

    @property
    def num_usable(self) -> int:
        """Items not (yet) found bad at load time."""
        if self._load_fail is None:
            return len(self)
        return len(self) - int(torch.count_nonzero(self._load_fail))

    def skip_report(self) -> str:
        """One line: ``<source> '<path>': N items, K skipped (reason=n, ...; e.g. ...)``."""
        s = self.skipped
        line = f"{self.source} {self.location!r}: {len(self)} items"
        if s["load_time"]:
            line += f" ({self.num_usable} usable)"
        if s["total"]:
            line += f", {s['total']} skipped ({self._reason_text(s['by_reason'])}"
            eg = [_short(v[0]) for v in s["examples"].values() if v][:3]
            line += f"; e.g. {', '.join(eg)})" if eg else ")"
        else:
            line += ", 0 skipped"
        if s["warnings"]:
            line += f"; warnings: {self._reason_text(s['warnings'])}"
        return line

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.skip_report()}>"


def skip_report(dataset: ImageDataset) -> str:
    """The dataset's one-line skip report."""
    return dataset.skip_report()


def print_skip_report(dataset: ImageDataset, file: TextIO | None = None) -> str:
    """Print the one-line skip report (to stderr by default) and return it."""
    line = dataset.skip_report()
    print(line, file=file if file is not None else sys.stderr)
    return line
