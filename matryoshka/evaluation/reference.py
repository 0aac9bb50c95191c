"""Reference statistics: features of real images at every level of the pyramid.

A reference is read once and kept as a :class:`ReferenceStats` (saved by ``mdm eval-stats``
as a ``.npz``). For each level side it holds the mean and covariance of the features (all
the Fréchet distance needs), the image count, and optionally up to ``max_features`` of the
feature vectors themselves: KID and precision/recall need those, FD does not.

Lower levels are made as the diffusion process makes them: average pooling of the top-level
image by ``resolution // side`` (identical to pooling by the nesting factor level after level).
For a video model the reference holds clips: each level keeps every k-th frame of the clip and
pools space the same way; its frames are the images measured, and each level also keeps the
reference's temporal measures (:mod:`.video`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import EvaluationError
from .features import FeatureExtractor
from .stats import FeatureStats
from .video import ClipLayout, TemporalStats, clip_rows, frames_of, pool_clip_levels, reference_clip_config

FORMAT = "matryoshka-eval-stats-v1"


@dataclass
class LevelStats:
    size: int
    mean: np.ndarray
    cov: np.ndarray
    count: int
    features: np.ndarray | None = None
    """A subset (or all) of the feature vectors, for KID and precision/recall."""
    temporal: TemporalStats | None = None
    """Clip levels: their frames and temporal measures (None for images)."""


@dataclass
class ReferenceStats:
    feature: dict
    """The feature network: name, dim, weights, fid_comparable."""
    resolution: int
    levels: dict[int, LevelStats]
    source: str = ""
    meta: dict = field(default_factory=dict)
    clip_frames: int = 0
    """Frames of the clips the levels were pooled from (0: images)."""

    @property
    def feature_name(self) -> str:
        return str(self.feature["name"])

    @property
    def level_sizes(self) -> list[int]:
        return sorted(self.levels, reverse=True)

    @property
    def has_features(self) -> bool:
        return all(level.features is not None and len(level.features) > 1 for level in self.levels.values())

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "format": np.array(FORMAT),
            "feature_name": np.array(self.feature_name),
            "feature_dim": np.array(int(self.feature["dim"])),
            "feature_weights": np.array(str(self.feature.get("weights", ""))),
            "fid_comparable": np.array(bool(self.feature.get("fid_comparable", False))),
            "resolution": np.array(self.resolution),
            "level_sizes": np.array(self.level_sizes, dtype=np.int64),
            "source": np.array(self.source),
            "clip_frames": np.array(self.clip_frames),
        }
        for size, level in self.levels.items():
            arrays[f"mean_{size}"] = level.mean
            arrays[f"cov_{size}"] = level.cov
            arrays[f"count_{size}"] = np.array(level.count)
            if level.features is not None:
                arrays[f"features_{size}"] = level.features.astype(np.float32)
            if level.temporal is not None:
                t = level.temporal
                arrays[f"temporal_{size}"] = np.array([t.frames, t.clips, t.diff_sum, t.dist_sum], np.float64)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(temporary, **arrays)
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        path = Path(path).expanduser()
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data or str(data["format"]) != FORMAT:
                raise EvaluationError(f"{path} is not a statistics file written by `mdm eval-stats`")
            feature = {
                "name": str(data["feature_name"]),
                "dim": int(data["feature_dim"]),
                "weights": str(data["feature_weights"]),
                "fid_comparable": bool(data["fid_comparable"]),
            }
            levels = {}
            for size in (int(s) for s in data["level_sizes"]):
                features = data.get(f"features_{size}", None)
                temporal = None
                if f"temporal_{size}" in data:
                    frames, clips, diff_sum, dist_sum = data[f"temporal_{size}"].tolist()
                    temporal = TemporalStats(int(frames), int(clips), diff_sum, dist_sum)
                levels[size] = LevelStats(
                    size, data[f"mean_{size}"], data[f"cov_{size}"], int(data[f"count_{size}"]), features, temporal
                )
            clip_frames = int(data["clip_frames"]) if "clip_frames" in data else 0
            meta = {"path": str(path)}
            return cls(feature, int(data["resolution"]), levels, str(data["source"]), meta, clip_frames)

    def check_compatible(
        self, extractor: FeatureExtractor, sizes: Sequence[int], resolution: int, layout: ClipLayout | None = None
    ) -> None:
        """Raise EvaluationError unless these statistics can be compared with ``extractor``'s
        features of images (or of clips laid out as ``layout``) at these level sizes pooled from ``resolution``."""
        where = self.meta.get("path", "the reference statistics")
        if self.feature_name != extractor.name or int(self.feature["dim"]) != extractor.dim:
            raise EvaluationError(
                f"{where} were computed with the feature network {self.feature_name!r}, not "
                f"{extractor.name!r}: pass --feature {self.feature_name} or recompute them"
            )
        if self.feature.get("weights") != extractor.weights:
            raise EvaluationError(
                f"{where} were computed with other {self.feature_name} weights "
                f"({self.feature.get('weights')} vs {extractor.weights})"
            )
        missing = [s for s in sizes if s not in self.levels]
        if missing:
            raise EvaluationError(
                f"{where} have levels {self.level_sizes}, the model makes {list(sizes)}: "
                f"recompute with --levels {','.join(map(str, sizes))}"
            )
        if self.resolution != resolution:
            raise EvaluationError(
                f"{where} were pooled from {self.resolution}px images, the model's top level is {resolution}px"
            )
        have = (self.clip_frames, [self.levels[s].temporal.frames if self.levels[s].temporal else 0 for s in sizes])
        want = (layout.clip_frames, list(layout.level_frames)) if layout else (0, [0] * len(sizes))
        if have != want:
            raise EvaluationError(
                f"{where} hold {_content(*have)}, the model makes {_content(*want)}: "
                "recompute them with `mdm eval-stats DATA --run RUN`"
            )


def _content(clip_frames: int, level_frames: list[int]) -> str:
    return f"clips of {clip_frames} frames ({level_frames} frames per level)" if clip_frames else "images"


def pool_levels(images: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Average-pool square images to each side in ``sizes`` (each must divide the side)."""
    side = images.shape[-1]
    levels = []
    for size in sizes:
        if side % size:
            raise ValueError(f"level side {size} does not divide the image side {side}")
        levels.append(images if size == side else F.avg_pool2d(images, side // size))
    return levels


def pick_subset(count: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``limit`` out of ``count`` (all if fewer)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def stats_from_batches(
    batches: Iterable[list[Tensor]],
    total: int,
    sizes: Sequence[int],
    extractor: FeatureExtractor,
    resolution: int,
    max_features: int | None = 10_000,
    source: str = "",
    seed: int = 0,
    progress=None,
    layout: ClipLayout | None = None,
) -> ReferenceStats:
    """Statistics of ``total`` images (or clips laid out as ``layout``) given as batches of levels
    (highest first, ``sizes``); the frames of clips are the images measured.

    ``max_features``: how many items' feature vectors to keep (a seeded subset of images or
    clips, all frames of a kept clip); None keeps all, 0 none."""
    keep = np.zeros(0, np.int64) if max_features == 0 else pick_subset(total, max_features, seed)
    stats = {size: FeatureStats(extractor.dim) for size in sizes}
    kept: dict[int, list[np.ndarray]] = {size: [] for size in sizes}
    temporal = {size: TemporalStats(frames) for size, frames in zip(sizes, layout.level_frames)} if layout else {}
    seen = 0
    for levels in batches:
        count = len(levels[0])
        rows = keep[(keep >= seen) & (keep < seen + count)] - seen
        for index, (size, images) in enumerate(zip(sizes, levels)):
            frames = layout.level_frames[index] if layout else 1
            features = extractor(frames_of(images) if layout else images)
            stats[size].update(features)
            if len(rows):
                kept[size].append(features[clip_rows(rows, frames)])
            if layout:
                temporal[size].update(images, features)
        seen += count
        if progress is not None:
            progress.update(count)
    if seen < 2:
        raise EvaluationError(f"need at least 2 reference images, got {seen}")
    levels = {
        size: LevelStats(
            size,
            stats[size].mean,
            stats[size].cov,
            stats[size].count,
            np.concatenate(kept[size]) if kept[size] else None,
            temporal.get(size),
        )
        for size in sizes
    }
    return ReferenceStats(
        extractor.describe(), resolution, levels, source, clip_frames=layout.clip_frames if layout else 0
    )


def reference_dataset(spec: str, resolution: int, run_data=None, layout: ClipLayout | None = None):
    """The dataset named by ``spec``: an image folder, ``emoji`` (built in) or ``train`` (the
    run's own training data config ``run_data``), at ``resolution`` without augmentation; for a
    video model (``layout``) a folder of videos, ``emoji-motion`` or ``train``."""
    from ..data import DataConfig, build_dataset

    if spec == "train" and run_data is None:
        raise EvaluationError("reference 'train' needs a run (its data config)")
    if layout is not None:
        return build_dataset(reference_clip_config(spec, resolution, layout, run_data))
    if spec == "emoji-motion":
        raise EvaluationError("reference 'emoji-motion' holds clips: it measures video models only")
    if spec == "train":
        config = dataclasses.replace(run_data, resolution=resolution, hflip=False, crop="center", shuffle=False)
    elif spec == "emoji":
        base = run_data if run_data is not None and run_data.source == "emoji" else DataConfig()
        config = dataclasses.replace(
            base, resolution=resolution, hflip=False, crop="center", shuffle=False, label="none"
        )
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"reference {spec!r}: no such folder or statistics file")
        if not path.is_dir():
            raise EvaluationError(
                f"reference {spec!r} is neither a folder of images, a .npz from `mdm eval-stats`, 'emoji' nor 'train'"
            )
        config = DataConfig(source="imagefolder", path=str(path), resolution=resolution, shuffle=False)
    return build_dataset(config)


def _stack_images(items: list[dict]) -> Tensor:
    return torch.stack([item["image"] for item in items])


def dataset_batches(
    dataset,
    indices: np.ndarray,
    sizes: Sequence[int],
    batch_size: int,
    num_workers: int = 0,
    layout: ClipLayout | None = None,
):
    """Batches of pooled levels of ``dataset[indices]`` (images, or clips laid out as ``layout``)."""
    subset = torch.utils.data.Subset(dataset, [int(i) for i in indices])
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_stack_images
    )
    for images in loader:
        yield pool_clip_levels(images, sizes, layout) if layout else pool_levels(images, sizes)


def compute_reference_stats(
    spec: str,
    extractor: FeatureExtractor,
    resolution: int,
    sizes: Sequence[int],
    max_images: int | None = None,
    max_features: int | None = 10_000,
    batch_size: int = 64,
    run_data=None,
    seed: int = 0,
    progress: bool = False,
    layout: ClipLayout | None = None,
) -> ReferenceStats:
    """Read the reference images (clips, with ``layout``) named by ``spec`` (see
    :func:`reference_dataset`) once and return their statistics at every level side in
    ``sizes`` (highest first; for clips, as many as ``layout`` has levels)."""
    from tqdm.auto import tqdm

    sizes = sorted({int(s) for s in sizes}, reverse=True)
    if layout is not None and len(layout.level_frames) != len(sizes):
        raise EvaluationError(f"levels {sizes} and frames per level {list(layout.level_frames)} differ in number")
    dataset = reference_dataset(spec, resolution, run_data, layout)
    streaming = getattr(dataset, "streaming", False)
    if streaming and max_images is None and max_features is None:
        raise EvaluationError("a stream has no length: give a number of reference images or of kept feature vectors")
    batches, total = reference_batches(dataset, max_images, sizes, batch_size, layout, seed)
    if streaming:
        # the kept feature vectors: a seeded subset of max_images items, or the first max_features of the epoch
        total = max_images if max_images is not None else max_features
    unit = "clip" if layout else "img"
    bar = tqdm(total=max_images if streaming else total, desc="reference features", unit=unit, disable=not progress)
    try:
        source = spec if spec in ("emoji", "emoji-motion", "train") else str(Path(spec).expanduser().resolve())
        stats = stats_from_batches(
            batches, total, sizes, extractor, resolution, max_features, source, seed, bar, layout
        )
    finally:
        bar.close()
    count = stats.levels[sizes[0]].count // (layout.clip_frames if layout else 1)
    stats.meta.update({"images": count, "dataset_size": None if streaming else len(dataset)})
    return stats


def reference_batches(dataset, max_images: int | None, sizes: Sequence[int], batch_size: int, layout, seed: int = 0):
    """(batches of pooled levels, items at most) of a reference dataset: a seeded subset of
    ``max_images`` items of an indexed set, or a stream's first ``max_images`` (None: its first epoch)."""
    if getattr(dataset, "streaming", False):
        return stream_batches(dataset, max_images, sizes, batch_size, layout), max_images
    indices = pick_subset(len(dataset), max_images, seed)
    workers = getattr(getattr(dataset, "cfg", None), "num_workers", 0)
    return dataset_batches(dataset, indices, sizes, batch_size, workers, layout), len(indices)


def stream_batches(dataset, max_images: int | None, sizes: Sequence[int], batch_size: int, layout):
    """Pooled levels of a stream's first ``max_images`` samples in shard order (fewer if its first
    epoch is shorter), or of its whole first epoch when None. Read unshuffled by one reader, sample
    ids (shard << SAMPLE_BITS | sample) only grow within an epoch: a smaller one starts the next,
    and a repeated one is a bad sample's stand-in, which is not counted twice."""
    from ..data import make_loader

    loader = make_loader(dataset, batch_size=batch_size, seed=0, shuffle=False)
    last, count = -1, 0
    try:
        while max_images is None or count < max_images:
            batch = next(loader)
            rows, epoch_over = [], False
            for row, sample in enumerate(batch["index"].tolist()):
                if sample < last or (max_images is not None and count == max_images):
                    epoch_over = True
                    break
                if sample > last:
                    rows.append(row)
                    count += 1
                last = sample
            if rows:
                images = batch["image"][rows]
                yield pool_clip_levels(images, sizes, layout) if layout else pool_levels(images, sizes)
            if epoch_over:
                return
    finally:
        loader.close()
