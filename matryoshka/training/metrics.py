"""The run's metrics: ``metrics.jsonl`` (one JSON record per logged step) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLog:
    """Written by rank 0 only; write errors (a full disk) warn instead of stopping training."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard_dir = run_dir / "tensorboard"
        self.enabled = enabled
        self.writer = None
        self._warned: set[str] = set()

    def keep_until(self, step: int) -> list[str]:
        """Drop records logged after ``step`` (the checkpoint a run resumes from); returns them.

        A line that is not a record (cut short by a kill during a write) is dropped too.
        """
        if not self.path.exists():
            return []
        kept, dropped = [], []
        for line in self.path.read_text(errors="replace").splitlines():
            record = _parse(line)
            if record is not None and record["step"] <= step:
                kept.append(line)
            elif line.strip():
                dropped.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        return dropped

    def open(self, step: int) -> None:
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported here: it takes a second to load

            self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
            if self.writer is not None:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self.writer.add_scalar(key, value, record["step"])
        except OSError as error:  # a full disk must not kill training before the next checkpoint attempt
            self.warn(f"could not write metrics: {error}")

    def warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            tqdm.write(f"warning: {message}")


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """NaN and Infinity are not JSON: a diverged step's loss is written as null."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in record.items()
    }


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def progress_bar(step: int, total_steps: int, max_minutes: float, quiet: bool) -> tqdm:
    """Counts steps, or seconds when a time limit is set (so the ETA is the real end)."""
    options = dict(disable=quiet, dynamic_ncols=True)
    if not max_minutes:
        return tqdm(total=total_steps, initial=step, unit="step", **options)
    bar_format = "{l_bar}{bar}| {n:.0f}/{total} s [{elapsed}<{remaining}{postfix}]"
    return tqdm(total=round(60 * max_minutes), unit="s", bar_format=bar_format, **options)
