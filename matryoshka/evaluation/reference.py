"""Reference statistics: features of real images at every level of the pyramid.

A reference is read once and kept as a :class:`ReferenceStats` (saved by ``mdm eval-stats``
as a ``.npz``). For each level side it holds the mean and covariance of the features (all
the Fréchet distance needs), the image count, and optionally up to ``max_features`` of the
feature vectors themselves: KID and precision/recall need those, FD does not.

Lower levels are made as the diffusion process makes them: average pooling of the top-level
image by ``resolution // side`` (identical to pooling by the nesting factor level after level).
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

FORMAT = "matryoshka-eval-stats-v1"


@dataclass
class LevelStats:
    size: int
    mean: np.ndarray
    cov: np.ndarray
    count: int
    features: np.ndarray | None = None
    """A subset (or all) of the feature vectors, for KID and precision/recall."""


@dataclass
class ReferenceStats:
    feature: dict
    """The feature network: name, dim, weights, fid_comparable."""
    resolution: int
    levels: dict[int, LevelStats]
    source: str = ""
    meta: dict = field(default_factory=dict)

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
        }
        for size, level in self.levels.items():
            arrays[f"mean_{size}"] = level.mean
            arrays[f"cov_{size}"] = level.cov
            arrays[f"count_{size}"] = np.array(level.count)
            if level.features is not None:
                arrays[f"features_{size}"] = level.features.astype(np.float32)
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
                levels[size] = LevelStats(
                    size, data[f"mean_{size}"], data[f"cov_{size}"], int(data[f"count_{size}"]), features
                )
            return cls(feature, int(data["resolution"]), levels, str(data["source"]), {"path": str(path)})

    def check_compatible(self, extractor: FeatureExtractor, sizes: Sequence[int], resolution: int) -> None:
        """Raise EvaluationError unless these statistics can be compared with ``extractor``'s
        features of images at these level sizes pooled from ``resolution``."""
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
) -> ReferenceStats:
    """Statistics of ``total`` images given as batches of levels (highest first, ``sizes``).

    ``max_features``: how many feature vectors to keep (a seeded subset); None keeps all, 0 none."""
    keep = np.zeros(0, np.int64) if max_features == 0 else pick_subset(total, max_features, seed)
    stats = {size: FeatureStats(extractor.dim) for size in sizes}
    kept: dict[int, list[np.ndarray]] = {size: [] for size in sizes}
    seen = 0
    for levels in batches:
        count = len(levels[0])
        rows = keep[(keep >= seen) & (keep < seen + count)] - seen
        for size, images in zip(sizes, levels):
            features = extractor(images)
            stats[size].update(features)
            if len(rows):
                kept[size].append(features[rows])
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
        )
        for size in sizes
    }
    return ReferenceStats(extractor.describe(), resolution, levels, source)


def reference_dataset(spec: str, resolution: int, run_data=None):
    """The dataset named by ``spec``: an image folder, ``emoji`` (built in) or ``train`` (the
    run's own training data config ``run_data``), at ``resolution`` without augmentation."""
    from ..data import DataConfig, build_dataset

    if spec == "train":
        if run_data is None:
            raise EvaluationError("reference 'train' needs a run (its data config)")
        if run_data.source == "shards":
            raise EvaluationError(
                "reference 'train' needs a data set of known size; data.source=shards is a stream: "
                "give a folder of reference images or statistics from `mdm eval-stats`"
            )
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


def dataset_batches(dataset, indices: np.ndarray, sizes: Sequence[int], batch_size: int, num_workers: int = 0):
    """Batches of pooled levels of ``dataset[indices]``."""
    subset = torch.utils.data.Subset(dataset, [int(i) for i in indices])
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_stack_images
    )
    for images in loader:
        yield pool_levels(images, sizes)


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
) -> ReferenceStats:
    """Read the reference images named by ``spec`` (see :func:`reference_dataset`) once and
    return their statistics at every level side in ``sizes`` (highest first)."""
    from tqdm.auto import tqdm

    sizes = sorted({int(s) for s in sizes}, reverse=True)
    dataset = reference_dataset(spec, resolution, run_data)
    indices = pick_subset(len(dataset), max_images, seed)
    bar = tqdm(total=len(indices), desc="reference features", unit="img", disable=not progress)
    try:
        workers = getattr(getattr(dataset, "cfg", None), "num_workers", 0)
        batches = dataset_batches(dataset, indices, sizes, batch_size, workers)
        source = spec if spec in ("emoji", "train") else str(Path(spec).expanduser().resolve())
        stats = stats_from_batches(batches, len(indices), sizes, extractor, resolution, max_features, source, seed, bar)
    finally:
        bar.close()
    stats.meta.update({"images": len(indices), "dataset_size": len(dataset)})
    return stats
