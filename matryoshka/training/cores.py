"""Notice other processes that take CPU time from a training run (Linux ``/proc``).

Two PyTorch jobs with default thread counts on the same cores slow each other about 5x
(docs/benchmarks.md), which looks like a slow machine unless someone says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcessTime:
    parent: int
    cpu_seconds: float


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_times(proc: Path = PROC) -> dict[int, ProcessTime]:
    """CPU seconds (user + system) and parent of every process that can be read."""
    times = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended, or is not ours to read
            continue
        # Fields after the command name: state, ppid, ..., utime (12th), stime (13th).
        times[int(entry.name)] = ProcessTime(int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return times


def command_line(pid: int, proc: Path = PROC) -> str:
    try:
        words = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(word.decode(errors="replace") for word in words if word)
    return text if len(text) <= 80 else text[:77] + "..."


class CoreWatch:
    """How many cores other processes used between two looks, with a warning naming the busy ones.

    Not counted: this process, its children (data loader workers) and, for a torchrun rank
    (``siblings=True``), the other ranks started by the same parent.
    """

    def __init__(self, warn: Callable[[str], None], siblings: bool = False) -> None:
        self.warn = warn
        self.siblings = siblings
        self.cores = available_cores()
        self.pid = os.getpid()
        self.named: set[int] = set()
        self._times = process_times()
        self._time = time.monotonic()

    def _ours(self, pid: int, parent: int) -> bool:
        return pid == self.pid or parent == self.pid or (self.siblings and parent == os.getppid())

    def usage(self) -> dict[int, float]:
        """Cores each other process used since the last look."""
        times, now = process_times(), time.monotonic()
        elapsed = max(now - self._time, 1e-3)
        used = {
            pid: (entry.cpu_seconds - self._times[pid].cpu_seconds) / elapsed
            for pid, entry in times.items()
            if pid in self._times and not self._ours(pid, entry.parent)
        }
        self._times, self._time = times, now
        return used

    def check(self) -> float:
        """Cores used by other processes since the last look; warns, naming them, the first time
        each busy one (a quarter of a core or more) shows up while they take 0.5 cores and a quarter of ours."""
        used = self.usage()
        total = sum(used.values())
        busy = sorted((pid for pid, cores in used.items() if cores >= 0.25), key=used.get, reverse=True)
        new = [pid for pid in busy if pid not in self.named]
        if total >= max(0.5, self.cores / 4) and new:
            self.named.update(new)
            names = "; ".join(f"{used[pid]:.1f} by pid {pid}, {command_line(pid)}" for pid in busy[:3])
            self.warn(
                f"other processes used {total:.1f} of the {self.cores} cores this run may use ({names}). Two "
                "PyTorch jobs with default thread counts slow each other about 5x: give each "
                "OMP_NUM_THREADS=(cores / jobs), or run them one after the other."
            )
        return total


def watch_cores(device: torch.device, warn: Callable[[str], None], siblings: bool = False) -> CoreWatch | None:
    """A :class:`CoreWatch` for a CPU run where ``/proc`` exists (else None); warns at once if
    PyTorch runs more threads than the cores this process may use."""
    if device.type != "cpu" or not PROC.is_dir():
        return None
    watch = CoreWatch(warn, siblings)
    if torch.get_num_threads() > watch.cores:
        warn(
            f"PyTorch runs {torch.get_num_threads()} threads on the {watch.cores} cores this process may use; "
            f"set OMP_NUM_THREADS={watch.cores} or fewer."
        )
    return watch
