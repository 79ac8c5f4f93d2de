"""Lock files that keep a second process off the same state (a home, a batch's folder)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["exclusive_lock"]


def exclusive_lock(path: Path) -> int | None:
    """Take an exclusive ``flock`` on ``path`` (created if missing) without waiting: the open
    descriptor, which holds the lock until it is closed (or the process ends), or None while
    another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
