"""Lock files that keep a second process off the same state (a home, a batch's folder)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["exclusive_lock", "open_lock_file"]


def open_lock_file(path: Path) -> int:
    """Open ``path`` (created if missing) to take an exclusive ``flock`` on it: for writing
    where that is allowed (on NFS an exclusive ``flock`` is a byte-range lock, which needs a
    file open for writing), else read-only (a local ``flock`` needs no write access: a lock
    file left by root does not lock a service user out)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def exclusive_lock(path: Path, *, writable: bool = False) -> int | None:
    """Take an exclusive ``flock`` on ``path`` (created if missing) without waiting: the open
    descriptor, which holds the lock until it is closed (or the process ends), or None while
    another process holds it. ``writable``: the holder writes into the file (it must be
    allowed to); else see :func:`open_lock_file`."""
    if writable:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    else:
        fd = open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
