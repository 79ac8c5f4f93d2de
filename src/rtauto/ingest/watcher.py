"""Drop folders: files copied into a watched folder are ingested once they have settled.

A :class:`FolderWatcher` runs one watchdog observer for every ``settings.watch`` folder and one
thread that ingests. A file is read only after its size and modification time have stayed the
same for the folder's ``settle_seconds`` (so a file still being written, even in pieces with
pauses shorter than that, is never read half-way), and once per (path, size, mtime): the spool's
SOP Instance UID check makes a second copy of the same instance idempotent anyway.

Files present when the watcher starts (dropped while the daemon was down) are found by a scan at
start; a slower periodic rescan catches anything whose file system event was lost. What was read
(path, size, modification time, ingested or refused) is kept in the job store, so a restart does
not read a kept file again, nor quarantine a kept bad file a second time, unless it changed.
Hidden files (``.name``, the usual form of a partial copy), ``*.tmp``/``*.part`` and
``DICOMDIR`` are left alone. Refused files are quarantined with their reason by the spool; the
original stays unless ``delete_after_ingest``, in which case it is removed only after its spool
copy or its quarantined copy is durable, and only when it did not change while it was read. A
writer that pauses longer than ``settle_seconds`` has its partial file quarantined as truncated
(and, with ``delete_after_ingest``, removed): set the settle time above the longest pause of the
senders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from rtauto.config import Settings, WatchFolder
from rtauto.errors import IngestError, RtautoError
from rtauto.ingest.spool import Spool, SpoolFull
from rtauto.store import Store

__all__ = ["FolderWatcher"]

log = logging.getLogger("rtauto.ingest.watcher")

RESCAN_SECONDS = 30.0  # safety net for lost file system events (inotify queue overflow)
RETRY_SECONDS = 5.0  # after an error reading a file (permissions, I/O) or a full disk
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")


@dataclass
class _Candidate:
    folder: WatchFolder
    signature: tuple[int, int]  # (size, mtime_ns) when last looked at
    stable_since: float  # monotonic time the signature was first seen
    not_before: float = 0.0  # monotonic time before which it is not retried


def _ignored(path: Path) -> bool:
    name = path.name
    return name.startswith(".") or name.endswith(_IGNORED_SUFFIXES) or name == "DICOMDIR"


class _Events(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher, folder: WatchFolder):
        self.watcher = watcher
        self.folder = folder

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                # a folder moved in whole brings files no event announced
                target = event.dest_path if event.event_type == "moved" else event.src_path
                self.watcher._scan(self.folder, Path(os.fsdecode(target)))
            return
        if event.event_type in ("created", "modified", "closed"):
            self.watcher._touch(self.folder, Path(os.fsdecode(event.src_path)))
        elif event.event_type == "moved":
            self.watcher._forget(Path(os.fsdecode(event.src_path)))
            self.watcher._touch(self.folder, Path(os.fsdecode(event.dest_path)))
        elif event.event_type == "deleted":
            self.watcher._forget(Path(os.fsdecode(event.src_path)))


def _ensure_watch_folder(path: Path) -> None:
    """A missing drop folder is made when the folder it lies in exists; when that one is
    missing too (a share that is not mounted, a typo) the watcher refuses to start, rather
    than watch a local folder that nothing ever writes to."""
    if path.is_dir():
        return
    if not path.parent.is_dir():
        raise RtautoError(
            f"watch folder {path} does not exist, nor does {path.parent}: is a share not "
            "mounted, or the path mistyped?"
        )
    path.mkdir(exist_ok=True)
    log.warning("watch folder %s did not exist; created it", path)


class FolderWatcher:
    """Ingests files dropped into ``settings.watch`` folders; ``start()`` / ``stop()``."""

    def __init__(self, settings: Settings, store_url: str):
        self.settings = settings
        self.store_url = store_url
        self.spool = Spool(settings)
        self.store: Store | None = None
        self._observers: list[object] = []
        self._candidates: dict[Path, _Candidate] = {}
        self._done: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.ingested = 0  # files stored in the spool (or found there already)
        self.refused = 0  # files quarantined
        self._full = False  # the disk is below its reserve: files wait in their folders

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Scan every watch folder, then follow its file system events."""
        self.store = Store(self.store_url)
        self._stopping.clear()
        for folder in self.settings.watch:
            _ensure_watch_folder(folder.path)
        for folder in self.settings.watch:
            observer = Observer()
            observer.schedule(_Events(self, folder), str(folder.path), recursive=folder.recursive)
            observer.start()
            self._observers.append(observer)
        # scan after the observers run, so a file dropped in between is seen by one of them;
        # files read before a restart are not read again unless they changed (a folder that
        # deletes what it ingested has every file it holds read, and then deleted)
        for folder in self.settings.watch:
            read_before = {Path(p): sig for p, sig in self.store.watched_files(folder.path).items()}
            if folder.delete_after_ingest:
                self.store.forget_watched_files(read_before)
                self._scan(folder, folder.path)
                continue
            with self._lock:
                self._done.update(read_before)
            seen = self._scan(folder, folder.path)
            gone = [path for path in read_before if path not in seen]
            if gone:
                with self._lock:
                    for path in gone:
                        self._done.pop(path, None)
                self.store.forget_watched_files(gone)
        self._thread = threading.Thread(target=self._run, name="rtauto-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; a file being ingested is finished first."""
        self._stopping.set()
        self._wake.set()
        for observer in self._observers:
            observer.stop()  # type: ignore[attr-defined]
        for observer in self._observers:
            observer.join(timeout=10)  # type: ignore[attr-defined]
        self._observers = []
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> FolderWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- bookkeeping (called from observer threads) -------------------------------------------
    def _scan(self, folder: WatchFolder, root: Path) -> set[Path]:
        """Look at every file under ``root``; returns the files found."""
        if root.is_file():
            self._touch(folder, root)
            return {root}
        seen = set()
        walker = os.walk(root) if folder.recursive else [(str(root), [], os.listdir(root))]
        for dirpath, _dirs, files in walker:
            for name in files:
                path = Path(dirpath) / name
                seen.add(path)
                self._touch(folder, path)
        return seen

    def _touch(self, folder: WatchFolder, path: Path) -> None:
        if _ignored(path):
            return
        try:
            st = path.lstat()  # a symbolic link is refused, not followed
        except OSError:
            return
        signature = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._done.get(path) == signature:
                return
            known = self._candidates.get(path)
            if known is None or known.signature != signature:
                self._candidates[path] = _Candidate(folder, signature, time.monotonic())
        self._wake.set()

    def _forget(self, path: Path, recorded: bool = True) -> None:
        """A file was deleted, moved away or changed: its next version is a new candidate.
        ``recorded``: whether the job store may hold that it was read."""
        with self._lock:
            self._candidates.pop(path, None)
            was_read = self._done.pop(path, None) is not None
        store = self.store
        if recorded and was_read and store is not None:
            try:
                store.forget_watched_files([path])
            except Exception:
                log.exception("cannot drop the record of %s", path)

    # -- the ingesting thread -----------------------------------------------------------------
    def _run(self) -> None:
        next_rescan = time.monotonic() + RESCAN_SECONDS
        while not self._stopping.is_set():
            wait = self._ingest_settled()
            now = time.monotonic()
            if now >= next_rescan:
                for folder in self.settings.watch:
                    with contextlib.suppress(OSError):
                        self._scan(folder, folder.path)
                next_rescan = now + RESCAN_SECONDS
            self._wake.wait(min(wait, max(0.0, next_rescan - now)))
            self._wake.clear()

    def _ingest_settled(self) -> float:
        """Ingest every candidate that has settled; returns seconds until the next check."""
        with self._lock:
            pending = list(self._candidates.items())
        wait = RESCAN_SECONDS
        for path, candidate in pending:
            if self._stopping.is_set():
                break
            try:
                st = path.lstat()
            except OSError:
                self._forget(path)
                continue
            now = time.monotonic()
            signature = (st.st_size, st.st_mtime_ns)
            if signature != candidate.signature:
                with self._lock:
                    if self._candidates.get(path) is candidate:
                        self._candidates[path] = _Candidate(candidate.folder, signature, now)
                wait = min(wait, candidate.folder.settle_seconds)
                continue
            ready_at = max(
                candidate.stable_since + candidate.folder.settle_seconds, candidate.not_before
            )
            if now < ready_at:
                wait = min(wait, ready_at - now)
                continue
            self._ingest(path, candidate, signature)
        return max(0.02, min(wait, 1.0))

    def _ingest(self, path: Path, candidate: _Candidate, signature: tuple[int, int]) -> None:
        assert self.store is not None
        try:
            record = self.spool.ingest_file(path, source="folder", follow_symlinks=False)
            if self._full:
                self._full = False
                log.info("drop folders are read again: the disk has room")
            self.store.record_instance(record)
            self.ingested += 1
            outcome = "ingested"
            log.info("ingested %s as %s", path, record.path)
        except SpoolFull as full:
            if not self._full:
                log.error("drop folders wait: %s", full.reason)
            self._full = True
            candidate.not_before = time.monotonic() + RETRY_SECONDS
            return
        except IngestError as refused:
            self.refused += 1
            outcome = "refused"
            log.warning("refused %s: %s", path, refused.reason)
        except Exception:
            log.exception("cannot ingest %s; retrying in %.0f s", path, RETRY_SECONDS)
            candidate.not_before = time.monotonic() + RETRY_SECONDS
            return
        with self._lock:
            if self._candidates.get(path) is candidate:
                del self._candidates[path]
            self._done[path] = signature
        if self._changed_since(path, signature):
            # written to while it was read (a writer that paused longer than the settle
            # time): keep it, and ingest the new content once it settles
            log.warning("%s changed while it was ingested; it is looked at again", path)
            self._forget(path)
            self._touch(candidate.folder, path)
            return
        if candidate.folder.delete_after_ingest:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot delete %s after ingest: %s", path, exc)
            self._forget(path, recorded=False)  # gone, and never recorded
            return
        try:
            self.store.remember_watched_file(path, *signature, outcome)
        except Exception:
            # only costs a second read after a restart (which the spool makes idempotent)
            log.exception("cannot record that %s was read", path)

    @staticmethod
    def _changed_since(path: Path, signature: tuple[int, int]) -> bool:
        try:
            st = path.lstat()
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) != signature
