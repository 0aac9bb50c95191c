"""``build_dataset``: DataConfig -> dataset."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .base import ImageDataset
from .config import SOURCES, DataConfig, DataConfigError


def build_dataset(cfg: DataConfig | Mapping[str, Any] | None = None) -> ImageDataset:
    """Build the dataset described by ``cfg`` (a DataConfig, a plain dict, or None
    for the default built-in emoji set).

    Raises :class:`DataConfigError` for an invalid config (unknown source or key,
    missing path, label not available for the source), ``FileNotFoundError`` for a
    path that does not exist, and :class:`EmptyDatasetError` when nothing usable is found.
    """
    if cfg is None:
        cfg = DataConfig()
    elif isinstance(cfg, Mapping):
        cfg = _from_mapping(cfg)
    elif not isinstance(cfg, DataConfig):
        raise TypeError(f"build_dataset expects a DataConfig or a dict, got {type(cfg).__name__}")
    if cfg.source == "emoji":
        from .emoji import EmojiDataset

        return EmojiDataset(cfg)
    if cfg.source == "imagefolder":
        from .imagefolder import ImageFolderDataset

        return ImageFolderDataset(cfg)
    if cfg.source == "webdataset":
        from .webdataset import WebDatasetTarDataset

        return WebDatasetTarDataset(cfg)
    if cfg.source == "shards":
        from .streaming import StreamingShards

        return StreamingShards(cfg)
    if cfg.source == "hf":
        from .hf import HFDataset

        return HFDataset(cfg)
    if cfg.source == "mlmdm-tsv":
        from .mlmdm import MLMDMTSVDataset

        return MLMDMTSVDataset(cfg)
    if cfg.source == "emoji-motion":
        from .emoji_motion import EmojiMotionDataset

        return EmojiMotionDataset(cfg)
    if cfg.source == "videofolder":
        from .videofolder import VideoFolderDataset

        return VideoFolderDataset(cfg)
    # only reachable when a field was changed after the config was checked
    raise DataConfigError("source", f"must be one of {list(SOURCES)}, got {cfg.source!r}")


def _from_mapping(data: Mapping[str, Any]) -> DataConfig:
    # A misspelt key would otherwise be a TypeError from the constructor, not a data setting error.
    known = [f.name for f in dataclasses.fields(DataConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DataConfigError(unknown[0], f"is not a data setting (unknown: {unknown}); known: {known}")
    return DataConfig(**data)
