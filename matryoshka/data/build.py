"""``build_dataset``: DataConfig -> dataset."""

from __future__ import annotations

from typing import Any, Mapping, Union

from .base import ImageDataset
from .config import SOURCES, DataConfig, DataConfigError


def build_dataset(cfg: Union[DataConfig, Mapping[str, Any], None] = None) -> ImageDataset:
    """Build the dataset described by ``cfg`` (a DataConfig, a plain dict, or None
    for the default built-in emoji set).

    Raises :class:`DataConfigError` for an invalid config (unknown source, missing
    path, label not available for the source), ``FileNotFoundError`` for a path
    that does not exist, and :class:`EmptyDatasetError` when nothing usable is found.
    """
    if cfg is None:
        cfg = DataConfig()
    elif isinstance(cfg, Mapping):
        cfg = DataConfig.from_dict(cfg)
    elif not isinstance(cfg, DataConfig):
        raise TypeError(f"build_dataset expects a DataConfig or a dict, got {type(cfg).__name__}")
    cfg.validate()
    if cfg.source == "emoji":
        from .emoji import EmojiDataset

        return EmojiDataset(cfg)
    if cfg.source == "imagefolder":
        from .imagefolder import ImageFolderDataset

        return ImageFolderDataset(cfg)
    if cfg.source == "webdataset":
        from .webdataset import WebDatasetTarDataset

        return WebDatasetTarDataset(cfg)
    if cfg.source == "mlmdm-tsv":
        from .mlmdm import MLMDMTSVDataset

        return MLMDMTSVDataset(cfg)
    raise DataConfigError("source", f"unknown source {cfg.source!r}; choose one of {list(SOURCES)}")
