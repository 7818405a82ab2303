"""One run per state directory: an exclusive OS lock the driver holds while it runs.

Two runs on one state dir would number versions from the same decision log,
overwrite each other's ``served/vN/model.pt`` and split the shards between
them. The control actor's name only keeps one run per Ray namespace of one
cluster, and each local ``livetrain run`` starts its own Ray, so the state dir
guards itself: ``flock`` on ``<state_dir>/livetrain.lock``, non-blocking. The
OS drops the lock when the holder exits, crashed or not, so a stale file never
blocks a restart. Only ``livetrain run`` takes it: ``status``, ``history``,
``rollback`` and ``quarantine`` read (or go through the running pipeline) and
keep working while it runs.

Plain code, no Ray.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from livetrain.config import ConfigError

LOCK_FILE = "livetrain.lock"


class StateDirLock:
    """Held from ``acquire`` to ``release`` (or the process's exit)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, holder: dict[str, Any]) -> None:
        """Take the lock and record ``holder`` (pid, job id...) in the file; ``ConfigError``
        naming ``state_dir`` and the other run when another process holds it."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by Ray's processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"state_dir: {str(self.path.parent)!r} is in use by another livetrain run "
                    f"({_describe(self.path)}); stop it first, or give this run another state_dir"
                ) from e
            # a filesystem without locks (some network mounts): run unguarded, but say so
            print(f"livetrain: state_dir: cannot lock {self.path} ({e.strerror}); "
                  "nothing stops a second run on this state dir", file=sys.stderr)
            return
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({**holder, "host": socket.gethostname()}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, naming the last holder
            self._fd = None


def _describe(path: Path) -> str:
    """The holder as its lock file names it (its pid, host, Ray job)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "pid unknown: it is just starting"
    parts = [f"pid {info['pid']}"]
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("job_id"):
        parts.append(f"Ray job {info['job_id']}")
    if info.get("namespace"):
        parts.append(f"Ray namespace {info['namespace']!r}")
    return ", ".join(parts)
