"""Argument types shared by the commands: bad numbers are refused by argparse, before any work."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .errors import UserError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^63), got {value}")
    return value


def guidance(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (1 = no guidance), got {text}")
    return value


def fps(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or not 0 < value <= 240:
        raise argparse.ArgumentTypeError(f"must be a number of frames per second in (0, 240], got {text}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {value}")
    return value


def folder_or_new(path: str | Path, flag: str) -> Path:
    """``path`` as a folder that exists or can be made: not a file, not below a file."""
    folder = Path(path).expanduser()
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            raise UserError(f"{flag} {folder}: {part} is a file, not a folder")
        if part.exists():
            break
    return folder
