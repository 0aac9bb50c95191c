"""Image and video datasets for Matryoshka diffusion training.

Every dataset item is ``{"image": float32 (3, R, R) in [-1, 1] (a clip (3, F, R, R) for the
video sources), "label": int (-1 if none), "caption": str ("" if none), "index": int}``.
See docs/data.md and docs/video.md.
"""

from .base import EmptyDatasetError, ImageDataset, SkipLog, print_skip_report, skip_report
from .build import build_dataset
from .config import DataConfig, DataConfigError
from .emoji import EmojiDataset, export_emoji
from .emoji_font import EmojiResourceError
from .emoji_motion import EmojiMotionDataset, export_emoji_motion
from .emoji_table import EmojiTable, build_emoji_table, load_emoji_table
from .imagefolder import ImageFolderDataset
from .images import BadImage, load_image, to_rgb, verify_image
from .loader import ResumableLoader, ShardPlan, collate, make_loader
from .mlmdm import MLMDMTSVDataset
from .stream_loader import StreamLoader
from .streaming import DataFailureError, StreamingShards
from .videofolder import VideoFolderDataset
from .webdataset import WebDatasetTarDataset

__all__ = [
    "BadImage",
    "DataConfig",
    "DataConfigError",
    "DataFailureError",
    "EmojiDataset",
    "EmojiMotionDataset",
    "EmojiResourceError",
    "EmojiTable",
    "EmptyDatasetError",
    "ImageDataset",
    "ImageFolderDataset",
    "MLMDMTSVDataset",
    "ResumableLoader",
    "ShardPlan",
    "SkipLog",
    "StreamLoader",
    "StreamingShards",
    "VideoFolderDataset",
    "WebDatasetTarDataset",
    "build_dataset",
    "build_emoji_table",
    "collate",
    "export_emoji",
    "export_emoji_motion",
    "load_emoji_table",
    "load_image",
    "make_loader",
    "print_skip_report",
    "skip_report",
    "to_rgb",
    "verify_image",
]
