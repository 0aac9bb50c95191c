"""Argument types shared by the commands: bad numbers are refused by argparse, before any work."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..config.run import SAMPLER_OPTIONS
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


def eta(text: str) -> float | list[float]:
    """One DDIM eta, or one per level separated by commas (innermost level first, as ``sample.eta``)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, or one per level as 0.5,2, got {text}")
    return values[0] if len(values) == 1 else values


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


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The flags of ``SAMPLER_OPTIONS`` (beyond --sampler/--steps/--guidance), each defaulting to the run's."""
    parser.add_argument(
        "--spacing", choices=["trailing", "mlmdm"], help="time steps (default: the run's sample.spacing)"
    )
    parser.add_argument(
        "--guidance-interval",
        dest="guidance_interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="guide only the steps with LO <= t/T <= HI (default: the run's sample.guidance_interval)",
    )
    parser.add_argument(
        "--eta",
        type=eta,
        help="DDIM stochasticity: 0 deterministic, 1 the DDPM posterior's noise, more above; one per level as "
        "0.5,2 (innermost level first; default: sample.eta)",
    )
    parser.add_argument(
        "--threshold",
        choices=["none", "clip", "dynamic", "dynamic_if"],
        help="x0 thresholding: none, clip to [-1, 1], dynamic as Imagen or as DeepFloyd IF (default: sample.threshold)",
    )
    parser.add_argument(
        "--threshold-percentile",
        dest="threshold_percentile",
        type=float,
        help="percentile of |x0| for dynamic thresholding (default: 0.995 dynamic, 0.95 dynamic_if)",
    )
    parser.add_argument(
        "--threshold-max",
        dest="threshold_max",
        type=float,
        help="cap on the dynamic threshold s (default: none for dynamic, 1.5 for dynamic_if)",
    )
    parser.add_argument(
        "--autoguidance",
        type=guidance,
        metavar="W",
        help="autoguidance weight (Karras et al. 2024): predictions pushed away from an earlier, weaker "
        "snapshot of the run; 1 = off (default: the run's sample.autoguidance)",
    )
    parser.add_argument(
        "--guide",
        help="autoguidance's weak model: a step of the run's guide snapshots, a snapshot file, or a "
        "checkpoint or run directory (default: sample.guide, else the run's first snapshot)",
    )


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The ``SAMPLER_OPTIONS`` given on the command line, as overrides of the run's ``sample`` settings."""
    return {name: getattr(args, name) for name in SAMPLER_OPTIONS if getattr(args, name) is not None}
