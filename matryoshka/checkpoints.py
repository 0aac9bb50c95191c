"""Checkpoints that survive crashes and never execute code when read.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX`` holding ``model.safetensors``,
``ema.safetensors``, ``state.pt`` (optimizer, counters, data position: tensors and plain
Python values only, read with ``weights_only=True``) and the run's ``config.yaml``, so it
is usable on its own. It is written under a temporary name, flushed to disk, then renamed:
a directory with the final name is always complete. ``checkpoints/latest`` names the newest
one and is replaced atomically after the rename.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .config import dump_yaml

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.yaml")
SAMPLING_FILES = ("model.safetensors", "ema.safetensors", "config.yaml")
"""Enough to sample: what a model is made of is also in the weights' metadata (see checkpoint_info)."""
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


def fsync_path(path: Path) -> None:
    """Flush a file or directory entry to disk (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    """Write and flush to disk; a full disk or a read-only directory raises OSError here."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    _write(path, save(tensors, metadata))


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config: Any,
    keep: int = 3,
) -> Path:
    """Write a complete checkpoint atomically, point ``latest`` at it, prune old ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # Sampling reads these from the weights alone: no state.pt, and no training data for class names.
        metadata = {
            "format": "matryoshka",
            "step": str(step),
            "num_levels": str(train_state["num_levels"]),
            "class_names": json.dumps(list(train_state.get("class_names", []))),
        }
        if "train_seconds" in train_state:  # converted checkpoints have no training time of ours
            metadata["train_seconds"] = f"{float(train_state['train_seconds']):.3f}"
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors", metadata
        )
        save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, tmp / "ema.safetensors", metadata)
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        _write(tmp / "state.pt", buffer.getvalue())
        dump_yaml(config, tmp / "config.yaml")
        fsync_path(tmp / "config.yaml")
        fsync_path(tmp)
        if final.exists():  # the same step saved again (e.g. a final save right after a periodic one)
            trash = root / f".old-{final.name}-{os.getpid()}"
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_path(root)
        point_latest(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep)
    return final


def point_latest(checkpoint: Path) -> None:
    """Make ``checkpoints/latest`` name ``checkpoint``, atomically."""
    root = checkpoint.parent
    pointer = root / f".latest-{os.getpid()}"
    pointer.write_text(checkpoint.name + "\n")
    fsync_path(pointer)
    os.replace(pointer, root / "latest")
    fsync_path(root)


def set_aside(checkpoint: Path, reason: str) -> Path:
    """Rename ``step_N`` to ``step_N.<reason>``: kept for the user, but no longer seen as a checkpoint.

    Resuming from an earlier checkpoint must not leave later (or damaged) ones in place: pruning
    keeps the highest steps and would delete the new checkpoints instead, and a lost ``latest``
    pointer would make a scan pick the abandoned one.
    """
    target, count = checkpoint.with_name(f"{checkpoint.name}.{reason}"), 1
    while target.exists():
        count += 1
        target = checkpoint.with_name(f"{checkpoint.name}.{reason}-{count}")
    checkpoint.rename(target)
    return target


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``step_N`` directory name, None for any other name."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in CHECKPOINT_FILES)


def prune_checkpoints(root: Path, keep: int) -> None:
    checkpoints = list_checkpoints(root.parent)
    for old in checkpoints[: max(0, len(checkpoints) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def remove_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted saves (never a complete checkpoint)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    for old in root.glob(".old-step_*"):  # a re-save was interrupted after moving the old copy aside
        final = root / old.name[len(".old-") :].rsplit("-", 1)[0]
        if not final.exists() and is_complete(old):
            old.rename(final)
    leftovers = [p for p in root.glob(".*") if p.name.startswith((".tmp-", ".old-", ".latest-"))]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return leftovers


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if valid, else a scan."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _STEP_DIR.match(named.name) and named.is_dir() and is_complete(named):
            return named
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint: {path}")
    if path.is_dir() and (is_complete(path) or all((path / name).is_file() for name in SAMPLING_FILES)):
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(
                f"{path} has no complete checkpoint (expected {path}/checkpoints/step_*/ with "
                f"{', '.join(CHECKPOINT_FILES)})"
            )
        return found
    raise CheckpointError(f"{path} is not a run directory or a checkpoint directory")


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, refusing corrupt files and non-finite values."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read weights from {path}: {error}") from error
    bad = [name for name, value in tensors.items() if value.dtype.is_floating_point and not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(f"{path} has NaN or Inf values in {len(bad)} tensors, e.g. {', '.join(bad[:3])}")
    return tensors


def checkpoint_info(checkpoint: Path) -> dict[str, Any]:
    """Step, number of levels, class names and training seconds (None if unknown) of a checkpoint,
    from its weights' metadata.

    Checkpoints written before the metadata held them fall back to ``state.pt``; their class
    names are unknown (an empty list).
    """
    try:
        with safe_open(str(checkpoint / "ema.safetensors"), framework="pt") as weights:
            metadata = weights.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read weights from {checkpoint / 'ema.safetensors'}: {error}") from error
    if "num_levels" in metadata:
        return {
            "step": int(metadata.get("step", 0)),
            "num_levels": int(metadata["num_levels"]),
            "class_names": [str(name) for name in json.loads(metadata.get("class_names", "[]"))],
            "train_seconds": float(metadata["train_seconds"]) if "train_seconds" in metadata else None,
        }
    if not (checkpoint / "state.pt").is_file():
        raise CheckpointError(f"{checkpoint} has neither level metadata in its weights nor a state.pt")
    state = load_train_state(checkpoint / "state.pt")
    seconds = state.get("train_seconds")
    return {
        "step": int(state.get("step", 0)),
        "num_levels": state.get("num_levels"),
        "class_names": [],
        "train_seconds": None if seconds is None else float(seconds),
    }


def _load_failure(error: Exception) -> str:
    """PyTorch's reason for refusing a file, without its advice to retry with ``weights_only=False``.

    That advice means running whatever code the file holds: never something to suggest for a
    file that failed the safe reader.
    """
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line and "Check the documentation" not in line]
    return lines[0] if lines else type(error).__name__


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Read ``state.pt`` without unpickling code (``weights_only=True``)."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise before the one-line refusal
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"refusing or unable to read training state {path}: {_load_failure(error)} "
            "(an mdm state.pt holds only tensors and plain values: this one is damaged or foreign)"
        ) from None


def load_into(
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    source: str | Path,
    optional: Callable[[str], bool] | None = None,
) -> None:
    """``load_state_dict`` with one message naming every missing, unexpected or mis-shaped tensor.

    Tensors for which ``optional(name)`` holds may be missing: they keep their initial values
    (the temporal layers of a video model inflated from an image model).
    """
    expected = module.state_dict()
    missing = sorted(name for name in set(expected) - set(tensors) if optional is None or not optional(name))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{name}: checkpoint {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in expected
        if name in tensors and tensors[name].shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(tensors, strict=optional is None)
