"""The errors of the ml-mdm converter, all ``ValueError``s through :class:`ConfigError`."""

from __future__ import annotations

from ...config import ConfigError

__all__ = [
    "CheckpointFormatError",
    "MlmdmConfigError",
    "MlmdmError",
    "MlmdmMismatchError",
    "UnsafeCheckpointError",
]


class MlmdmError(ConfigError):
    """An ml-mdm file or option we cannot convert faithfully (a ``ValueError``)."""


class MlmdmConfigError(MlmdmError):
    """An ml-mdm option we cannot reproduce (or an invalid ml-mdm config)."""


class MlmdmMismatchError(MlmdmError):
    """The checkpoint's tensors do not fit the model its config describes."""


class UnsafeCheckpointError(MlmdmError):
    """The pickle references code outside the allow-list; nothing from it was executed."""


class CheckpointFormatError(MlmdmError):
    """The file is not a checkpoint we understand (or is corrupt)."""
