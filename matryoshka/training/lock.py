"""One training process per run directory: ``RUN/.lock``, held with ``flock`` while training.

The kernel drops a ``flock`` when its process dies, however it dies, so a lock left by a
crashed run is never in the way: the file stays, but the next run locks it at once. The
file records the holder's pid, host and start time for the message of a refused run. On a
filesystem without ``flock`` the recorded pid decides: a live process on this host (or any
holder on another host, which cannot be checked) keeps the run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..cli.errors import UserError

LOCK_NAME = ".lock"


class RunLocked(UserError):
    """Another process trains in this run directory."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {started})"


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return bool(holder)  # a process on another machine cannot be checked from here
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


class RunLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.taken_over: dict = {}

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = _holder(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS) or _alive(previous):
                os.close(fd)
                raise RunLocked(
                    f"{self.path.parent} is in use by another training process: {_describe(previous)}. "
                    f"Wait for it to end or stop it; if it no longer exists, delete {self.path}"
                ) from None
        if previous and previous.get("pid") != os.getpid():
            self.taken_over = previous  # its process ended without releasing: the lock is free
        record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        # The file stays (deleting it would let a process that opened it just before lock a
        # file no one else sees); emptied, it no longer names a holder.
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()

    def stale_message(self) -> str | None:
        """A line about a lock taken over from a process that ended without releasing it."""
        if not self.taken_over:
            return None
        return f"taking over the lock of {_describe(self.taken_over)}, which ended without releasing it"
