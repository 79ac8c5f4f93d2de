"""Counters of the storage SCP, shared by its receiving processes (for ``/metrics``).

The receiving processes are separate processes; what they count is kept in a small file in
the home (``scp-counters``), mapped into each of them: one row of 64-bit counters per
receiving process (its *slot*). A process adds to its own row only, under a lock of its own
(its associations run in threads); the daemon adds the rows up. The SCP makes the file afresh
when it starts, so the counters count from the daemon's start, as Prometheus expects of a
counter; a receiving process started again in place of one that exited takes over its slot
and goes on from its values.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from pathlib import Path

__all__ = ["COUNTERS", "ScpCounters"]

COUNTERS = (
    "associations_accepted",
    "associations_rejected",  # calling or called AE title, application context, version
    "instances_stored",  # C-STORE answered success (a re-sent instance included)
    "instances_refused",  # quarantined: not DICOM, truncated, bad UIDs, conflicting duplicate
    "instances_not_stored",  # 0xA700: below the free-space reserve, or a write failed
    "bytes_received",  # data set bytes of the C-STOREs answered success
)
_INDEX = {name: i for i, name in enumerate(COUNTERS)}
_WIDTH = 8 * len(COUNTERS)
FILE_NAME = "scp-counters"


class ScpCounters:
    """The counters file of ``slots`` receiving processes, at ``path``. ``create``: make it
    afresh (zeroed; the SCP does before it starts its receiving processes), else open it."""

    def __init__(self, path: Path, slots: int, *, create: bool = False):
        self.path = Path(path)
        self.slots = slots
        size = slots * _WIDTH
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"{self.path} holds fewer than {slots} slots")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._lock = threading.Lock()

    def add(self, slot: int, name: str, amount: int = 1) -> None:
        offset = slot * _WIDTH + 8 * _INDEX[name]
        with self._lock:
            (value,) = struct.unpack_from("<q", self._map, offset)
            struct.pack_into("<q", self._map, offset, value + amount)

    def totals(self) -> dict[str, int]:
        """Every counter summed over the receiving processes."""
        values = struct.unpack_from(f"<{self.slots * len(COUNTERS)}q", self._map, 0)
        return {
            name: sum(values[slot * len(COUNTERS) + i] for slot in range(self.slots))
            for i, name in enumerate(COUNTERS)
        }

    def close(self) -> None:
        self._map.close()
