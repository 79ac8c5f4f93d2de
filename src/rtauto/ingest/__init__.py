"""Ingest: the storage SCP, drop-folder watcher and the durable spool they write into.

* :class:`Spool` validates an instance (complete header, valid required UIDs), writes it
  durably under ``<Study>/<Series>/<SOP>.dcm`` and quarantines what it refuses;
* :class:`StorageSCP` receives C-STORE/C-ECHO (one or several receiving processes);
* :class:`FolderWatcher` ingests files dropped into watch folders once they settle.

The names are imported on first use, so importing this package stays cheap (pynetdicom and
watchdog load only with the SCP and the watcher).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rtauto.ingest.scp import StorageSCP
    from rtauto.ingest.spool import RefusedInstance, Spool
    from rtauto.ingest.watcher import FolderWatcher

__all__ = ["FolderWatcher", "RefusedInstance", "Spool", "StorageSCP"]

_HOMES = {
    "FolderWatcher": "rtauto.ingest.watcher",
    "RefusedInstance": "rtauto.ingest.spool",
    "Spool": "rtauto.ingest.spool",
    "StorageSCP": "rtauto.ingest.scp",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'rtauto.ingest' has no attribute {name!r}")
