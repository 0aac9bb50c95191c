"""The run directory before training: which checkpoint to resume, what to set aside, paths that must not clash."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import (
    CheckpointError,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_tensors,
    load_train_state,
    point_latest,
    set_aside,
)
from ..config.run import RunConfig
from .metrics import MetricsLog

STATE_KEYS = ("step", "num_levels", "optimizer", "ema_updates")


def check_run_paths(config: RunConfig, run_dir: Path) -> None:
    data = config.data
    if data.source == "imagefolder" and data.path:
        images, run = Path(data.path).expanduser().resolve(), run_dir.resolve()
        if run == images or images in run.parents:
            raise ValueError(
                f"run_dir {run} is inside data.path {images}: its sample grids would become training images; "
                "put the run outside the image folder"
            )
    cpus = os.cpu_count() or 1
    if data.num_workers > max(32, 4 * cpus):
        raise ValueError(f"data.num_workers={data.num_workers} processes for {cpus} CPUs: use at most {4 * cpus}")


def read_checkpoint(checkpoint: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Training state and weights of a checkpoint; CheckpointError if any file is damaged."""
    state = load_train_state(checkpoint / "state.pt")
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{checkpoint / 'state.pt'} is not an mdm training state (no {', '.join(missing)})")
    weights = {name: load_tensors(checkpoint / f"{name}.safetensors") for name in ("model", "ema")}
    return state, weights


@dataclass
class ResumePoint:
    """What a run continues from (nothing for a new run), and what happens to the checkpoints after it."""

    checkpoint: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    set_aside: list[tuple[Path, str]] = field(default_factory=list)
    """Checkpoints renamed ``*.damaged`` or ``*.superseded`` when training starts."""
    notes: list[str] = field(default_factory=list)


def find_checkpoint(run_dir: Path, resume_from: Path | None) -> ResumePoint:
    """The checkpoint to resume: ``resume_from``, else the newest one that reads back intact."""
    if resume_from is not None:
        state, weights = read_checkpoint(resume_from)  # named by the user: a damaged one is an error
        later = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) > checkpoint_step(resume_from)]
        point = ResumePoint(resume_from, state, weights, [(c, "superseded") for c in later])
        if later:
            point.notes.append(
                f"going back to {resume_from.name}: the later {', '.join(c.name for c in later)} will be kept "
                "as *.superseded (no longer resumed or pruned); their metrics go to metrics.jsonl.superseded"
            )
        return point
    latest = latest_checkpoint(run_dir)
    candidates = [latest] if latest else []
    candidates += [c for c in reversed(list_checkpoints(run_dir)) if c != latest]
    damaged: list[str] = []
    point = ResumePoint()
    for checkpoint in candidates:
        try:
            state, weights = read_checkpoint(checkpoint)
        except CheckpointError as error:
            damaged.append(str(error))
            point.set_aside.append((checkpoint, "damaged"))
            continue
        if damaged:
            point.notes.append(
                f"warning: {'; '.join(damaged)}. Resuming from {checkpoint.name}, the newest intact checkpoint; "
                f"the damaged ones are kept as *.damaged"
            )
        point.checkpoint, point.state, point.weights = checkpoint, state, weights
        return point
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {run_dir / 'checkpoints'}: {'; '.join(damaged)}. "
            "Move that folder away to start the run afresh"
        )
    return point


def set_aside_checkpoints(
    run_dir: Path, aside: list[tuple[Path, str]], resumed_from: Path | None, metrics: MetricsLog, step: int
) -> None:
    """Rename the damaged or superseded checkpoints, point ``latest`` back, keep the metrics up to ``step``."""
    for checkpoint, reason in aside:
        set_aside(checkpoint, reason)
    if aside and resumed_from is not None:
        point_latest(resumed_from)
    dropped = metrics.keep_until(step)
    if dropped and any(reason == "superseded" for _, reason in aside):
        with open(run_dir / "metrics.jsonl.superseded", "a") as handle:
            handle.write("".join(line + "\n" for line in dropped))
