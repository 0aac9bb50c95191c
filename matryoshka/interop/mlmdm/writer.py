"""Writing a converted checkpoint directory atomically: everything or nothing appears at ``out``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ...checkpoints import fsync_path
from ...config import dump_yaml
from ...config.run import RunConfig
from .errors import MlmdmError

__all__ = ["prepare_out", "write_checkpoint"]


def prepare_out(out: Path) -> None:
    """Refuse an ``out`` that exists with content, or whose parent is missing, before any work is done."""
    if out.exists():
        if not out.is_dir():
            raise MlmdmError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()):
            raise MlmdmError(f"output directory {out} already exists and is not empty; choose a new --out")
    if not out.parent.exists():
        raise FileNotFoundError(f"parent directory of --out does not exist: {out.parent}")


def _write_files(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    config: RunConfig,
    step: int,
    state: dict[str, Any] | None,
    source: str,
) -> list[str]:
    metadata = {"format": "matryoshka", "step": str(step), "source": source}
    save_file(tensors, directory / "model.safetensors", metadata)
    files = ["model.safetensors"]
    if state is not None:
        # ml-mdm's vis_model files (and the ports of them) hold the EMA weights: they serve as both of ours.
        try:
            os.link(directory / "model.safetensors", directory / "ema.safetensors")
        except OSError:
            shutil.copyfile(directory / "model.safetensors", directory / "ema.safetensors")
        torch.save(state, directory / "state.pt")
        files += ["ema.safetensors", "state.pt"]
    dump_yaml(config, directory / "config.yaml")
    files.append("config.yaml")
    return files


def write_checkpoint(
    out: Path,
    tensors: dict[str, torch.Tensor],
    config: RunConfig,
    step: int,
    state: dict[str, Any] | None,
    source: str = "ml-mdm",
) -> list[str]:
    """Write our checkpoint directory at ``out`` (checked by :func:`prepare_out`); the file names written.

    ``model.safetensors`` and ``config.yaml`` always; with ``state`` (the ``state.pt``
    record) also ``ema.safetensors`` and ``state.pt``, making a loadable checkpoint. The
    files go to a temporary directory next to ``out`` that is renamed at the end, so a
    failure leaves nothing behind. ``source`` is recorded in the weights' metadata.
    """
    tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = _write_files(tmp, tensors, config, step, state, source)
        for file in files:
            fsync_path(tmp / file)
        if out.exists():
            out.rmdir()  # prepare_out checked it is empty
        tmp.rename(out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files
