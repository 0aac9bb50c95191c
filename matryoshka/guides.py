"""Guide snapshots: the EMA weights a run keeps at a few early steps, the weak models of autoguidance.

A snapshot is one safetensors file, ``RUN/guides/step_XXXXXXXX.safetensors``, with the same
metadata as a checkpoint's weights (step, levels, class names); its architecture is the run's
model truncated to its levels. They are written at ``first`` and every doubling of it: the
first is the automatic guide, the later ones are there to be chosen by step.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoints import CheckpointError, save_file

GUIDES_DIR = "guides"
_SNAPSHOT = re.compile(r"^step_(\d{8,})\.safetensors$")


def is_guide_step(step: int, first: int) -> bool:
    """Whether ``step`` is ``first`` times a power of two (0 turns snapshots off)."""
    if first <= 0 or step < first or step % first:
        return False
    multiple = step // first
    return multiple & (multiple - 1) == 0


def save_guide_snapshot(
    run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], num_levels: int, class_names: list[str]
) -> Path:
    """Write the snapshot of ``step`` (atomically, as checkpoints are) and return its path."""
    folder = Path(run_dir) / GUIDES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.safetensors"
    partial = folder / f".tmp-{path.name}-{os.getpid()}"
    metadata = {
        "format": "matryoshka",
        "step": str(step),
        "num_levels": str(num_levels),
        "class_names": json.dumps(list(class_names)),
    }
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, partial, metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def guide_snapshots(folder: str | Path) -> dict[int, Path]:
    """The snapshots in a run's guide folder by step (empty if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _SNAPSHOT.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def first_guide(folder: str | Path, step: int) -> Path | None:
    """The run's first snapshot, if it is from before ``step`` (a model does not guide itself)."""
    snapshots = guide_snapshots(folder)
    first = next(iter(snapshots), None)
    return None if first is None or first >= step else snapshots[first]


def snapshot_levels(path: Path) -> int:
    """How many levels the model of a guide snapshot has (from its metadata)."""
    try:
        with safe_open(str(path), framework="pt") as weights:
            metadata = weights.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read the guide snapshot {path}: {error}") from error
    if "num_levels" not in metadata:
        raise CheckpointError(f"{path} is not a guide snapshot: its metadata has no num_levels")
    return int(metadata["num_levels"])
