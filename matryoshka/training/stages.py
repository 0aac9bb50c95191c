"""Where each progressive-training stage (paper §3.4) ends, in steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config.run import StageConfig


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
