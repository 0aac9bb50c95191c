"""Rank 0's half of a checkpoint save, and how a run that cannot go on stops."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import latest_checkpoint, save_checkpoint
from ..config.run import RunConfig
from ..guides import save_guide_snapshot
from .metrics import MetricsLog
from .state import all_finite


class TrainingStopped(RuntimeError):
    """Training stopped early (signal, divergence, a failed save) with the checkpoint to resume from."""

    def __init__(self, message: str, checkpoint: Path | None, exit_code: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = exit_code

    @classmethod
    def diverged(cls, steps_in_a_row: int, checkpoint: Path | None) -> TrainingStopped:
        return cls(
            f"stopped: {steps_in_a_row} non-finite steps in a row (weights were not updated by "
            "them); the checkpoint holds the last finite weights. Lower train.lr or check the data.",
            checkpoint,
            exit_code=3,
        )

    @classmethod
    def by_signal(cls, signum: int, step: int, checkpoint: Path | None) -> TrainingStopped:
        return cls(
            f"{signal.Signals(signum).name} received: saved step {step}; run the same command to resume",
            checkpoint,
            exit_code=128 + signum,
        )


def write_checkpoint(
    run_dir: Path,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    state: dict[str, Any],
    config: RunConfig,
    metrics: MetricsLog,
) -> tuple[Path | None, TrainingStopped | None]:
    """Write the checkpoint of ``step``: its path, or why it was not written (the previous one is intact).

    Non-finite weights are never written: with ``keep_checkpoints=1`` the save would prune the
    last good checkpoint, and ``latest`` would point every later resume at NaNs.
    """
    previous = latest_checkpoint(run_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    bad = [name for name, weights in (("model", model), ("EMA", ema)) if not all_finite(weights.values())]
    if bad:
        message = (
            f"refusing to save step {step}: the {' and '.join(bad)} weights are NaN/Inf. {kept}; "
            "lower train.lr and run the same command to resume from it"
        )
        return None, TrainingStopped(message, previous, exit_code=3)
    try:
        path = save_checkpoint(run_dir, step, model, ema, state, config, keep=config.train.keep_checkpoints)
    except OSError as error:
        message = (
            f"could not save the checkpoint of step {step} in {run_dir}: {error}. {kept}; "
            "free space or fix permissions, then run the same command to resume"
        )
        return None, TrainingStopped(message, previous, exit_code=4)
    try:  # a summary for people: the checkpoint's state.pt holds the stage history
        (run_dir / "stages.json").write_text(json.dumps(state.get("stage_history", []), indent=1) + "\n")
    except OSError as error:
        metrics.warn(f"could not write stages.json: {error}")
    return path, None


def write_guide_snapshot(
    run_dir: Path, step: int, ema: dict[str, torch.Tensor], levels: int, class_names: list[str], metrics: MetricsLog
) -> None:
    """Keep the EMA of ``step`` for autoguidance; a failure costs only this snapshot, never the run."""
    if not all_finite(ema.values()):
        metrics.warn(f"no guide snapshot at step {step}: the EMA weights are NaN/Inf")
        return
    try:
        save_guide_snapshot(run_dir, step, ema, levels, class_names)
    except OSError as error:
        metrics.warn(f"could not write the guide snapshot of step {step}: {error}")


def weights_not_finite(run_dir: Path, step: int, lr: float, weight_decay: float) -> TrainingStopped:
    """Why a run stops when a finite gradient still made non-finite weights (an lr or weight decay that overflows).

    Undoing an AdamW step exactly is impossible, and a copy of every weight and moment to
    restore would double the memory of training. So the run stops before the EMA or a
    checkpoint sees the weights: the last checkpoint holds finite ones. Resuming it unchanged
    would replay the same deterministic steps into the same update, hence the advice.
    """
    previous = latest_checkpoint(run_dir)
    kept = f"the last checkpoint {previous.name} is intact" if previous else "no checkpoint was written"
    return TrainingStopped(
        f"stopped: step {step} made the weights NaN/Inf although its loss and gradients were finite "
        f"(lr {lr:.3g}, weight_decay {weight_decay:g}); nothing of it was saved and {kept}. "
        "Lower train.lr (or train.weight_decay) and run the same command again",
        previous,
        exit_code=3,
    )
