"""Typed configuration for the data pipeline.

Only plain field types (str, int, bool, str | None) are used so a generic
YAML/dict loader can fill :class:`DataConfig` with ``DataConfig(**d)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

SOURCES = ("emoji", "imagefolder", "webdataset", "shards", "hf", "mlmdm-tsv", "emoji-motion", "videofolder")
VIDEO_SOURCES = ("emoji-motion", "videofolder")
PATHLESS_SOURCES = ("emoji", "emoji-motion")
CROPS = ("center", "random")
LABELS = ("none", "group", "subgroup", "folder", "cls")

# Which ``label`` values each source understands.
LABELS_BY_SOURCE = {
    "emoji": ("none", "group", "subgroup"),
    "imagefolder": ("none", "folder"),
    "webdataset": ("none", "cls"),
    "shards": ("none", "cls"),
    "hf": ("none", "cls"),
    "mlmdm-tsv": ("none",),
    "emoji-motion": ("none",),
    "videofolder": ("none", "folder"),
}

# Pillow's own default (about 89.5 megapixels): anything larger is treated as a
# possible decompression bomb and skipped.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_BOOLS = ("hflip", "captions", "colour_captions", "shuffle", "verify", "emoji_keep_unnamed")
# Integer fields and their smallest allowed value.
_INTS = {
    "resolution": 8,
    "num_workers": 0,
    "seed": 0,
    "max_image_pixels": 1,
    "shuffle_buffer": 0,
    "retries": 0,
    "num_classes": 0,
    "frames": 0,
    "sprites": 0,
    "frame_stride": 1,
}


class DataConfigError(ValueError):
    """An invalid :class:`DataConfig` value; the message starts with ``data.<field>``.

    A ValueError, so the generic config loader reports it like any other invalid
    value; a type of its own, so the CLI can tell a bad data setting from a bug.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"data.{field} {message}")


@dataclass
class DataConfig:
    """Where the training images come from and how they are prepared.

    Every field is checked once, when the config is made (``__post_init__``,
    which ``dataclasses.replace`` runs too); raises :class:`DataConfigError`.

    Fields
    ------
    source: "emoji" (built-in Noto Color Emoji bitmaps), "imagefolder",
        "webdataset" (local tar shards, indexed up front), "shards" (WebDataset shards streamed
        from local files, http(s), fsspec URLs or pipe: commands), "hf" (a local Hugging Face
        ``datasets`` folder or Parquet/Arrow files) or "mlmdm-tsv" (Apple ml-mdm TSV index); for
        video "emoji-motion" (built-in moving emoji clips) or "videofolder" (mp4/webm/avi/gif...).
    path: dataset location; required for every source except "emoji" and "emoji-motion".
    resolution: side of the square top-level image (pixels).
    crop: "center" or "random" crop after resizing the shortest side.
    hflip: random horizontal flip with probability 0.5.
    label: "none", "group"/"subgroup" (emoji), "folder" (imagefolder: first-level
        directory), "cls" (webdataset: the ``.cls`` member).
    captions: read captions (otherwise every caption is "").
    colour_captions: "emoji" with captions: each caption also names the emoji's main colours
        ("red heart, red"; ``colour_words.py``), so colour words are learnt from every image.
    num_workers: DataLoader worker processes.
    shuffle: shuffle with a per-epoch permutation derived from ``seed``.
    seed: base seed of the shuffling permutation and of the augmentations.
    verify: check every image is decodable when the dataset is indexed
        (``PIL.Image.verify``; for tar sources this reads each member once).
    max_image_pixels: images with more pixels are skipped (decompression bombs).
    cache_dir: cache directory for the decoded emoji set; None means
        ``$MATRYOSHKA_CACHE`` or ``$XDG_CACHE_HOME/matryoshka`` or ``~/.cache/matryoshka``.
    shuffle_buffer: "shards": samples per reader shuffled together (a window; 0 or 1: shard order only).
    retries: "shards": how often a remote shard is reopened after a read error (with doubling delays).
    retry_delay: "shards": seconds before the first retry.
    num_classes: "shards" with label="cls": the number of classes (a stream cannot be counted up front).
    frames: frames per clip of a video source (items are then (3, frames, R, R)); 0 for images.
        "shards" with frames > 0 reads the video members (mp4, webm, ...) of the shards as clips.
    frame_stride: videofolder and video shards: keep every this-many-th decoded frame (a lower frame rate).
    image_source: video runs: an image source ("emoji", "imagefolder", ...) whose images are mixed into
        training as one-frame clips (joint image and video training, docs/video.md); None: clips only.
    image_path: where ``image_source`` reads (as ``path``; not needed for "emoji").
    image_fraction: the share of each batch taken from ``image_source`` (round(fraction x batch) images,
        the rest clips); 0 without images.
    sprites: "emoji" and "emoji-motion": use this many emoji, spread evenly over the named ones (a
        smaller vocabulary: each emoji is seen more often, so it is learnt sooner); 0: all of them.
    emoji_keep_unnamed: keep the font bitmaps that have no emoji-test.txt name
        (regional indicators, keycap parts, internal glyphs); they get label -1
        and an empty caption.
    """

    source: str = "emoji"
    path: str | None = None
    resolution: int = 64
    crop: str = "center"
    hflip: bool = False
    label: str = "none"
    captions: bool = False
    colour_captions: bool = False
    num_workers: int = 0
    shuffle: bool = True
    seed: int = 0
    verify: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    cache_dir: str | None = None
    emoji_keep_unnamed: bool = False
    shuffle_buffer: int = 1000
    retries: int = 3
    retry_delay: float = 1.0
    num_classes: int = 0
    frames: int = 0
    frame_stride: int = 1
    image_source: str | None = None
    image_path: str | None = None
    image_fraction: float = 0.0
    sprites: int = 0

    def __post_init__(self) -> None:
        _need_choice("source", self.source, SOURCES)
        for name in ("path", "cache_dir", "image_source", "image_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise DataConfigError(name, f"must be a string or null, got {value!r}")
        if self.path is not None and not self.path.strip():
            raise DataConfigError("path", "must not be empty (use null for the built-in emoji set)")
        _need_choice("crop", self.crop, CROPS)
        _need_choice("label", self.label, LABELS)
        for name in _BOOLS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise DataConfigError(name, f"must be true or false, got {value!r}")
        for name, minimum in _INTS.items():
            value = getattr(self, name)
            # bool is an int subclass, but `resolution: true` is a mistake, not 1
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataConfigError(name, f"must be an integer, got {value!r}")
            if value < minimum:
                raise DataConfigError(name, f"must be >= {minimum}, got {value}")
        allowed = LABELS_BY_SOURCE[self.source]
        if self.label not in allowed:
            raise DataConfigError(
                "label", f"must be one of {list(allowed)} for source {self.source!r}, got {self.label!r}"
            )
        # an int is a fine number of seconds; a bool is not
        if (
            isinstance(self.retry_delay, bool)
            or not isinstance(self.retry_delay, (int, float))
            or not (0 <= self.retry_delay < float("inf"))
        ):
            raise DataConfigError("retry_delay", f"must be a number of seconds >= 0, got {self.retry_delay!r}")
        if self.source == "shards" and self.label == "cls" and self.num_classes < 1:
            raise DataConfigError(
                "num_classes",
                "must be >= 1 with source 'shards' and label 'cls' (a stream has no up-front count of its classes)",
            )
        # shards hold either: frames > 0 reads their video members as clips
        if (self.source in VIDEO_SOURCES and self.frames < 1) or (
            self.source not in VIDEO_SOURCES + ("shards",) and self.frames
        ):
            raise DataConfigError(
                "frames",
                f"must be >= 1 for the video sources {list(VIDEO_SOURCES)}, 0 for image sources, and either for "
                f"'shards' (0: image members, F: video members as F-frame clips) (source {self.source!r}, frames "
                f"{self.frames})",
            )
        if self.sprites and self.source not in ("emoji", "emoji-motion"):
            raise DataConfigError(
                "sprites",
                f"only applies to the sources 'emoji' and 'emoji-motion': set data.sprites=0 for {self.source!r}",
            )
        if self.colour_captions and (self.source != "emoji" or not self.captions):
            raise DataConfigError(
                "colour_captions",
                f"needs data.source=emoji and data.captions=true (source {self.source!r}, captions {self.captions})",
            )
        if self.source not in PATHLESS_SOURCES and self.path is None:
            raise DataConfigError("path", f"is required for source {self.source!r}")
        self._check_images()

    def _check_images(self) -> None:
        """Joint image and video training: an image source, a fraction of the batch, and a video source."""
        fraction = self.image_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise DataConfigError("image_fraction", f"must be a number in [0, 1), got {fraction!r}")
        if self.image_source is None:
            if fraction:
                raise DataConfigError("image_source", f"must name an image source for data.image_fraction={fraction}")
            if self.image_path is not None:
                raise DataConfigError("image_path", "is set but data.image_source is not")
            return
        image_sources = [s for s in SOURCES if s not in VIDEO_SOURCES]
        _need_choice("image_source", self.image_source, tuple(image_sources))
        if not self.frames:
            raise DataConfigError(
                "image_source", "mixes images into a video run's clips: it needs a video source (data.frames > 0)"
            )
        if not fraction:
            raise DataConfigError("image_fraction", "must be > 0 with data.image_source (the share of images)")
        if self.image_source not in PATHLESS_SOURCES and self.image_path is None:
            raise DataConfigError("image_path", f"is required for data.image_source={self.image_source!r}")

    def image_config(self) -> DataConfig | None:
        """The data config of the mixed-in images (None without them): this one's settings, one frame."""
        if self.image_source is None:
            return None
        return replace(
            self,
            source=self.image_source,
            path=self.image_path,
            frames=0,
            frame_stride=1,
            image_source=None,
            image_path=None,
            image_fraction=0.0,
            sprites=0,
        )


def image_batch_size(batch_size: int, fraction: float) -> int:
    """Images in a batch of ``batch_size`` samples with ``data.image_fraction``; at least one clip stays."""
    images = round(fraction * batch_size)
    if fraction and not 0 < images < batch_size:
        raise ValueError(
            f"data.image_fraction={fraction} of a batch of {batch_size} gives {images} images and "
            f"{batch_size - images} clips: each step needs at least one of each (change the fraction or the batch)"
        )
    return images


def _need_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise DataConfigError(name, f"must be one of {list(choices)}, got {value!r}")
