"""Progressive-training stages (paper §3.4): where each ends, and how far the current one is.

A stage ends after its steps or, with ``minutes``, at the first step past them. The
history of the stages begun (saved in a checkpoint as ``stage_history``) records where
time-limited stages ended, so a resumed run keeps the boundaries it had.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.run import RunConfig, StageConfig
from .distributed import DistContext


def stage_boundaries(
    stages: Sequence[StageConfig], history: Sequence[dict[str, Any]], train_steps: int, last_is_open: bool
) -> list[int]:
    """The step at which each stage ends: after its steps, or where its minutes ran out.

    ``history`` records the stages already ended by time (``end_step``); an open last stage
    (no ``steps`` of its own) runs until ``train_steps``.
    """
    ended = {entry["stage"]: entry["end_step"] for entry in history if "end_step" in entry}
    ends, end = [], 0
    for index, stage in enumerate(stages):
        end = ended.get(index, end + (stage.steps or 0))
        ends.append(end)
    if last_is_open:
        ends[-1] = max(train_steps, ends[-2] + 1 if len(ends) > 1 else 1)
    return ends


@dataclass
class StagePlan:
    """A run's stages and the history of those begun, asked about at a step.

    The plan keeps no counters of its own: the trainer owns the step and the training
    seconds and passes them in. ``dist`` and ``device`` are for the collectives that make
    every rank agree on a stage's end and on the time spent, whose clocks differ.
    """

    config: RunConfig
    dist: DistContext
    device: torch.device
    history: list[dict[str, Any]] = field(default_factory=list)
    """Each stage begun: its index, levels, start step and training seconds; ``end_step`` if minutes ended it."""
    stages: list[StageConfig] = field(init=False)

    def __post_init__(self) -> None:
        self.stages = self.config.resolved_stages()

    @property
    def boundaries(self) -> list[int]:
        last_is_open = not self.config.stages or self.config.stages[-1].steps is None
        return stage_boundaries(self.stages, self.history, self.config.train.steps, last_is_open)

    @property
    def total_steps(self) -> int:
        return self.boundaries[-1]

    def index(self, step: int) -> int:
        """The stage that ``step`` (the next step to take) belongs to."""
        return next((i for i, end in enumerate(self.boundaries) if step < end), len(self.stages) - 1)

    def start(self, step: int) -> int:
        """The first step of the stage that ``step`` belongs to."""
        index = self.index(step)
        return self.boundaries[index - 1] if index else 0

    def begin(self, step: int, levels: int, seconds: float) -> None:
        """Record the stage of ``step`` in the history if it is not the one recorded last."""
        index = self.index(step)
        if not self.history or self.history[-1]["stage"] != index:
            self.history.append({"stage": index, "levels": levels, "start_step": step, "start_seconds": seconds})

    def progress(self, step: int, seconds: float, run_end_seconds: float) -> float:
        """How far the stage is through its budget after warm-up: steps, or minutes where they end it sooner.

        ``seconds``: training seconds so far; ``run_end_seconds``: those at which the run's
        ``train.max_minutes`` run out. A collective where a time limit applies.
        """
        train = self.config.train
        index, first = self.index(step), self.start(step)
        length = self.boundaries[index] - first
        progress = (step - first - train.warmup_steps) / max(1, length - train.warmup_steps)
        if train.lr_schedule == "constant":
            return progress
        start = self.history[-1].get("start_seconds", 0.0)
        end = run_end_seconds
        minutes = self.stages[index].minutes
        if minutes and index < len(self.stages) - 1:
            end = min(end, start + 60 * minutes)
        if math.isfinite(end):
            # Clocks differ across ranks; every rank must apply the same rate.
            spent = self.dist.max(seconds - start, self.device)
            progress = max(progress, spent / max(end - start, 1e-9))
        return progress

    def end_when_out_of_minutes(self, step: int, seconds: float) -> None:
        """A stage with ``minutes`` ends at the first step past them (a collective: all ranks agree)."""
        index = self.index(step)
        minutes = self.stages[index].minutes
        if not minutes or index == len(self.stages) - 1:
            return
        entry = self.history[-1]
        spent = seconds - entry.get("start_seconds", 0.0)
        if self.dist.any(spent >= 60 * minutes, self.device) and step < self.boundaries[index]:
            entry["end_step"] = step
