"""Lock files that keep a second process off the same state (a home, a batch's folder)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["exclusive_lock"]


def exclusive_lock(path: Path, *, writable: bool = False) -> int | None:
    """Take an exclusive ``flock`` on ``path`` (created if missing) without waiting: the open
    descriptor, which holds the lock until it is closed (or the process ends), or None while
    another process holds it. The file is opened read-only unless the holder writes into it
    (``flock`` needs no write access: a lock file left by root does not lock a service user
    out)."""
    mode = os.O_RDWR if writable else os.O_RDONLY
    fd = os.open(path, mode | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
