"""Typed configuration for the data pipeline.

Only plain field types (str, int, float, bool, Optional[str]) are used so a
generic YAML/dict loader can fill :class:`DataConfig` with ``DataConfig(**d)``
or :meth:`DataConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

SOURCES = ("emoji", "imagefolder", "webdataset", "mlmdm-tsv")
CROPS = ("center", "random")
LABELS = ("none", "group", "subgroup", "folder", "cls")

# Which ``label`` values each source understands.
LABELS_BY_SOURCE = {
    "emoji": ("none", "group", "subgroup"),
    "imagefolder": ("none", "folder"),
    "webdataset": ("none", "cls"),
    "mlmdm-tsv": ("none",),
}

# Pillow's own default (about 89.5 megapixels): anything larger is treated as a
# possible decompression bomb and skipped.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class DataConfigError(ValueError):
    """Raised for an invalid :class:`DataConfig` value; the message names the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"DataConfig.{field}: {message}")


@dataclass
class DataConfig:
    """Where the training images come from and how they are prepared.

    Fields
    ------
    source: "emoji" (built-in Noto Color Emoji bitmaps), "imagefolder",
        "webdataset" (local tar shards) or "mlmdm-tsv" (Apple ml-mdm TSV index).
    path: dataset location; required for every source except "emoji".
    resolution: side of the square top-level image (pixels).
    crop: "center" or "random" crop after resizing the shortest side.
    hflip: random horizontal flip with probability 0.5.
    label: "none", "group"/"subgroup" (emoji), "folder" (imagefolder: first-level
        directory), "cls" (webdataset: the ``.cls`` member).
    captions: read captions (otherwise every caption is "").
    num_workers: DataLoader worker processes.
    shuffle: shuffle with a per-epoch permutation derived from ``seed``.
    seed: base seed of the shuffling permutation and of the augmentations.
    verify: check every image is decodable when the dataset is indexed
        (``PIL.Image.verify``; for tar sources this reads each member once).
    max_image_pixels: images with more pixels are skipped (decompression bombs).
    cache_dir: cache directory for the decoded emoji set; None means
        ``$MATRYOSHKA_CACHE`` or ``$XDG_CACHE_HOME/matryoshka`` or ``~/.cache/matryoshka``.
    emoji_keep_unnamed: keep the font bitmaps that have no emoji-test.txt name
        (regional indicators, keycap parts, internal glyphs); they get label -1
        and an empty caption.
    """

    source: str = "emoji"
    path: Optional[str] = None
    resolution: int = 64
    crop: str = "center"
    hflip: bool = False
    label: str = "none"
    captions: bool = False
    num_workers: int = 0
    shuffle: bool = True
    seed: int = 0
    verify: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    cache_dir: Optional[str] = None
    emoji_keep_unnamed: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> "DataConfig":
        """Check every field; raise :class:`DataConfigError` naming the field."""

        def need_choice(name: str, choices: tuple) -> None:
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise DataConfigError(name, f"must be one of {list(choices)}, got {value!r}")

        def need_bool(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise DataConfigError(name, f"must be true or false, got {value!r}")

        def need_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataConfigError(name, f"must be an integer, got {value!r}")
            if value < minimum:
                raise DataConfigError(name, f"must be >= {minimum}, got {value}")

        def need_opt_str(name: str) -> None:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise DataConfigError(name, f"must be a string or null, got {value!r}")

        need_choice("source", SOURCES)
        need_opt_str("path")
        if self.path is not None and not self.path.strip():
            raise DataConfigError("path", "must not be empty (use null for the built-in emoji set)")
        need_int("resolution", 8)
        need_choice("crop", CROPS)
        need_bool("hflip")
        need_choice("label", LABELS)
        need_bool("captions")
        need_int("num_workers", 0)
        need_bool("shuffle")
        need_int("seed", 0)
        need_bool("verify")
        need_int("max_image_pixels", 1)
        need_opt_str("cache_dir")
        need_bool("emoji_keep_unnamed")

        allowed = LABELS_BY_SOURCE[self.source]
        if self.label not in allowed:
            raise DataConfigError(
                "label",
                f"{self.label!r} is not available for source {self.source!r}; "
                f"choose one of {list(allowed)}",
            )
        if self.source != "emoji" and self.path is None:
            raise DataConfigError("path", f"is required for source {self.source!r}")
        return self

    # ----------------------------------------------------------- conversions
    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "DataConfig":
        """Build from a plain mapping (e.g. parsed YAML); unknown keys are an error."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataConfigError(unknown[0], f"unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
