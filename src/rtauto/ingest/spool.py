"""The spool: where every accepted instance is written durably, once, under validated UIDs.

Layout under ``settings.spool_dir``::

    <StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   accepted instances
    .incoming/                                                      temporary files

An instance is accepted only when its header parses to the end of the data (nothing truncated)
and its SOP Class, SOP Instance, Study and Series Instance UIDs are present and valid UIDs; the
path is built from those UIDs only. Writing is temp file, write, ``fdatasync``, hard link into
place (which never replaces an existing file), ``fsync`` of the folder: when an ingest call
returns, the instance survives a crash or power loss. The storage SCP writes a data set into its
unnamed file while the data set arrives (:meth:`Spool.begin_encoded`) and starts the disk writes
as it goes, so that after the last fragment only the tail is left to flush; the file is still
named only after the whole instance is validated and flushed.

Refused input is copied into ``settings.quarantine_dir`` as ``<name>.bin`` with ``<name>.json``
(reason, source, calling/called AE, time, original name, how many times it came) and
:class:`RefusedInstance` (an :class:`~rtauto.errors.IngestError`) is raised. ``<name>`` is a
digest of the refused bytes, the reason, the source, the calling AE title and the original name
(never the content's UIDs): the same data refused again from the same place is kept once.

Free space: below ``settings.min_free_mb`` free on the spool's file system, nothing is stored or
quarantined and :class:`SpoolFull` is raised (the SCP answers 0xA700, a drop-folder file waits),
so that running jobs, the job store and the quarantine keep room.

Re-sent instances: the same SOP Instance UID with the same data set bytes and transfer syntax
is accepted again without a second file (idempotent). The same SOP Instance UID with different
content is refused and quarantined with reason "duplicate SOPInstanceUID with different
content": received data is never altered, so the first version stays in the spool. A re-sent
instance's file gets the time it was received again as its modification time (its content is
not touched): retention (:mod:`rtauto.retention`) counts from that time.

Retention removes spool files while receivers run. Receivers hold ``.retention.lock`` in the
spool shared while they name a file or accept a re-sent one; retention holds it exclusively
while it removes a series' files, and keeps every file whose modification time is within the
retention period: an instance accepted again just before is kept, and one that arrives after
is stored afresh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rtauto.config import Settings
from rtauto.errors import IngestError, RtautoError
from rtauto.ingest.header import (
    IMPLEMENTATION_CLASS_UID,
    DatasetLayout,
    HeaderError,
    build_file_meta,
    guess_raw_encoding,
    header_attributes,
    missing_pixel_data,
    pixel_data_shortfall,
    read_file_meta,
    scan_dataset,
    uid_value,
)
from rtauto.locks import open_lock_file
from rtauto.store import InstanceRecord, Store
from rtauto.uids import is_valid_uid

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_DUPLICATE_CONFLICT",
    "RefusedInstance",
    "SpoolFull",
    "Spool",
    "StreamedFile",
]

log = logging.getLogger("rtauto.ingest")

# C-STORE failure statuses (PS3.4 B.2.3) that a refusal maps to.
RETENTION_LOCK = ".retention.lock"  # in the spool folder (see the module docstring)
STATUS_DATASET_MISMATCH = 0xA900  # data set does not match SOP class / required UIDs
STATUS_CANNOT_UNDERSTAND = 0xC000  # not DICOM, truncated, malformed
STATUS_DUPLICATE_CONFLICT = 0xC001  # same SOP Instance UID, different content

_REQUIRED_UIDS = (
    (0x00080016, "SOPClassUID"),
    (0x00080018, "SOPInstanceUID"),
    (0x0020000D, "StudyInstanceUID"),
    (0x0020000E, "SeriesInstanceUID"),
)


class RefusedInstance(IngestError):
    """An instance was refused and quarantined. ``status`` is the C-STORE failure status and
    ``quarantined`` the quarantined copy."""

    def __init__(self, reason: str, status: int, quarantined: Path | None = None):
        super().__init__(reason)
        self.status = status
        self.quarantined = quarantined


class SpoolFull(RtautoError):
    """The home file system is below its free-space reserve (``min_free_mb``): the instance
    was neither stored nor quarantined (it is not bad input), and can be sent, or left in its
    drop folder, again. Not an :class:`~rtauto.errors.IngestError`: nothing was refused."""

    def __init__(self, free: int, reserve: int):
        self.free = free
        self.reserve = reserve
        self.reason = (
            f"rtauto's disk is nearly full: {free / 1e6:.0f} MB free, below the"
            f" {reserve / 1e6:.0f} MB min_free_mb keeps in reserve"
        )
        super().__init__(self.reason)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the file system of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class _Invalid(Exception):
    def __init__(self, reason: str, status: int):
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_WRITEBACK_STEP = 128 << 10  # bytes written before their disk write is started


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a file range to disk without waiting for it (a hint: durability still
    comes from the ``fdatasync`` that follows)."""
    global _sync_file_range
    if _sync_file_range is not None and _sync_file_range(
        fd, offset, length, _SYNC_FILE_RANGE_WRITE
    ):
        _sync_file_range = None  # not supported here: fdatasync does all of it


class StreamedFile:
    """An unnamed spool file that a C-STORE data set is written into while it arrives.

    Made by :meth:`Spool.begin_encoded` with the file meta header already written; the network
    layer :meth:`feed` s the data set's bytes in order, and :meth:`Spool.ingest_encoded` then
    validates the whole data set and, when everything fed matches it, flushes and names this
    file instead of writing the data again. Writing errors are not raised: the file is
    dropped and the instance written the ordinary way. :meth:`close` releases the file (an
    unnamed file that was never linked vanishes).
    """

    def __init__(self, fd: int, meta: bytes):
        self.fd = fd
        self.meta = meta
        self.size = 0
        self._unflushed_from = 0
        try:
            _write_all(fd, [meta])
            self.size = len(meta)
        except OSError:
            self.close()

    @property
    def usable(self) -> bool:
        return self.fd >= 0

    def feed(self, chunk: memoryview) -> None:
        if self.fd < 0:
            return
        try:
            _write_all(self.fd, [chunk])
            self.size += len(chunk)
            if self.size - self._unflushed_from >= _WRITEBACK_STEP:
                _start_writeback(self.fd, self._unflushed_from, self.size - self._unflushed_from)
                self._unflushed_from = self.size
        except OSError as exc:
            log.warning("writing a data set as it arrives failed (%s); it is written whole", exc)
            self.close()

    def matches(self, meta: bytes, dataset_size: int) -> bool:
        """Whether this file holds exactly ``meta`` followed by a data set of that size."""
        return self.fd >= 0 and self.meta == meta and self.size == len(meta) + dataset_size

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _read_regular(path: Path, follow_symlinks: bool) -> bytes:
    """The bytes of a regular file; :class:`_Invalid` for anything else (never blocks on a
    FIFO, never reads through a symbolic link unless ``follow_symlinks``)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise _Invalid(
                "a symbolic link: rtauto reads only regular files from a drop folder "
                "(what it points to was not read)",
                STATUS_CANNOT_UNDERSTAND,
            ) from None
        raise
    with open(fd, "rb", closefd=True) as file:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kinds = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device"}
            kind = kinds.get(stat.S_IFMT(mode), "a device or other special file")
            raise _Invalid(
                f"not a regular file ({kind}); nothing was read", STATUS_CANNOT_UNDERSTAND
            )
        return file.read()


def _open_unnamed(folder: Path) -> int:
    """A new unnamed file (Linux ``O_TMPFILE``) on the file system of ``folder``."""
    return os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)


def _write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _text(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


class Spool:
    """Durable, validated storage of received instances (see the module docstring)."""

    def __init__(self, settings: Settings):
        settings.ensure_dirs()
        self.settings = settings
        self.spool_dir = Path(settings.spool_dir)
        self.incoming_dir = Path(settings.incoming_dir)
        self.quarantine_dir = Path(settings.quarantine_dir)
        # series whose store row exists (the storage SCP adds them once indexed): their
        # instances skip the header attribute conversion, which only a new series row needs
        self.known_series = _BoundedSet(10_000)
        # series folders known to exist (one removed by retention is made again on demand)
        self._series_dirs = _BoundedSet(10_000)
        self._guard = _SharedFlock(self.spool_dir / RETENTION_LOCK)
        # unnamed temporary files (Linux O_TMPFILE) are linked into place through /proc
        self._tmpfile_supported = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
        self._prepared: _PreparedFiles | None = None
        self.reserve_bytes = int(settings.min_free_mb * 1e6)

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`SpoolFull` when storing ``incoming`` more bytes would leave less than
        the reserve free (one ``statvfs`` call: cheap enough for every instance)."""
        if self.reserve_bytes <= 0:
            return
        free = free_bytes(self.spool_dir)
        if free - incoming < self.reserve_bytes:
            raise SpoolFull(free, self.reserve_bytes)

    def prepare_files(self, count: int) -> None:
        """Keep ``count`` unnamed files open ahead of need, created by a background thread in
        the spool folder (creating a file costs about as much as writing half a megabyte;
        this takes it off a receiver's path). :meth:`close` releases them; unused ones vanish
        with the process, whatever way it ends."""
        if self._prepared is None and self._tmpfile_supported and count > 0:
            self._prepared = _PreparedFiles(self.spool_dir, count)

    def close(self) -> None:
        if self._prepared is not None:
            self._prepared.close()
            self._prepared = None
        self._guard.close()

    @contextmanager
    def exclusive(self, timeout: float = 30.0) -> Iterator[bool]:
        """Hold the spool's retention lock exclusively (no receiver names a file or accepts a
        re-sent one meanwhile); yields False when it could not be had within ``timeout``
        (receivers take it shared for microseconds at a time, so it is tried again and again
        rather than waited for: a waiting exclusive lock would not stop new shared ones)."""
        fd = open_lock_file(self.spool_dir / RETENTION_LOCK)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(0.005)
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # -- public --------------------------------------------------------------------------------
    def begin_encoded(
        self,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str = "",
    ) -> StreamedFile | None:
        """An unnamed spool file for a C-STORE data set about to arrive (see
        :class:`StreamedFile`), to pass to :meth:`ingest_encoded`; None where the file system
        has no unnamed files (the data set is then written after it arrived)."""
        if not self._tmpfile_supported:
            return None
        try:
            self.check_space()
        except SpoolFull:
            return None  # refused by ingest_encoded once the data set is in
        try:
            meta = build_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)
        except HeaderError:
            return None
        try:
            fd = self._unnamed_file()
        except OSError:
            return None
        streamed = StreamedFile(fd, meta)
        return streamed if streamed.usable else None

    def ingest_encoded(
        self,
        encoded: bytes | memoryview,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        source: str,
        calling_ae: str = "",
        called_ae: str = "",
        streamed: StreamedFile | None = None,
    ) -> InstanceRecord:
        """Store a data set received over the network (no file meta) behind a file meta header
        naming rtauto and the calling AE. ``sop_class_uid``/``sop_instance_uid`` are those of
        the C-STORE request; the data set must carry the same ones. ``streamed``: the file from
        :meth:`begin_encoded` that the data set was fed into as it arrived (closed here).

        Raises :class:`RefusedInstance` after quarantining what was refused, and
        :class:`SpoolFull` (nothing stored, nothing quarantined) below the free-space reserve.
        """
        try:
            self.check_space(len(encoded))
            original = f"C-STORE {sop_instance_uid} from {calling_ae or '?'}"
            try:
                meta = build_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)
            except HeaderError:
                meta = b""
            try:
                layout, uids = self._validate(encoded, transfer_syntax)
                if uids["SOPInstanceUID"] != sop_instance_uid:
                    raise _Invalid(
                        f"SOPInstanceUID {_text(uids['SOPInstanceUID'])} in the data set differs"
                        f" from {_text(sop_instance_uid)} in the C-STORE request",
                        STATUS_DATASET_MISMATCH,
                    )
                if uids["SOPClassUID"] != sop_class_uid:
                    raise _Invalid(
                        f"SOPClassUID {_text(uids['SOPClassUID'])} in the data set differs from"
                        f" {_text(sop_class_uid)} in the C-STORE request",
                        STATUS_DATASET_MISMATCH,
                    )
            except _Invalid as bad:
                raise self._refuse(
                    [meta, encoded], bad, source, calling_ae, called_ae, original
                ) from None
            return self._accept(
                meta,
                encoded,
                layout,
                uids,
                transfer_syntax,
                source,
                calling_ae,
                called_ae,
                original,
                streamed if streamed is not None and streamed.matches(meta, len(encoded)) else None,
            )
        finally:
            if streamed is not None:
                streamed.close()

    def ingest_file(
        self, path: Path, *, source: str = "folder", follow_symlinks: bool = True
    ) -> InstanceRecord:
        """Copy a DICOM file into the spool (the original is never moved or modified).

        A file with a Part 10 header is stored byte for byte; a bare data set (no ``DICM``
        prefix, little endian) is stored behind a file meta header built by rtauto.
        Only regular files are read (a FIFO or a device is refused without reading it);
        ``follow_symlinks=False`` (drop folders) refuses a symbolic link instead of reading
        what it points to. Raises :class:`RefusedInstance` after quarantining the file, and
        :class:`SpoolFull` (the file is left alone) below the free-space reserve.
        """
        path = Path(path)
        original = str(path)
        self.check_space()
        try:
            data = _read_regular(path, follow_symlinks)
        except _Invalid as bad:
            raise self._refuse([], bad, source, "", "", original) from None
        self.check_space(len(data))
        view = memoryview(data)
        try:
            try:
                file_meta = read_file_meta(view)
            except HeaderError as exc:
                raise _Invalid(f"not DICOM: {exc}", STATUS_CANNOT_UNDERSTAND) from None
            if file_meta is None:
                transfer_syntax = guess_raw_encoding(view)
                if transfer_syntax is None:
                    raise _Invalid(
                        "not DICOM: no 'DICM' prefix and no data set at the start of the file",
                        STATUS_CANNOT_UNDERSTAND,
                    )
                meta, dataset = b"", view
            else:
                transfer_syntax = file_meta.transfer_syntax
                meta, dataset = view[: file_meta.dataset_offset], view[file_meta.dataset_offset :]
            layout, uids = self._validate(dataset, transfer_syntax)
            if file_meta is not None:
                stated = file_meta.values.get(0x00020003, "")
                if stated and stated != uids["SOPInstanceUID"]:
                    raise _Invalid(
                        f"MediaStorageSOPInstanceUID {_text(stated)} differs from the data"
                        f" set's SOPInstanceUID {_text(uids['SOPInstanceUID'])}",
                        STATUS_DATASET_MISMATCH,
                    )
            else:
                meta = build_file_meta(uids["SOPClassUID"], uids["SOPInstanceUID"], transfer_syntax)
        except _Invalid as bad:
            raise self._refuse([view], bad, source, "", "", original) from None
        return self._accept(meta, dataset, layout, uids, transfer_syntax, source, "", "", original)

    def reconcile(self, store: Store, stale_seconds: float = 60.0) -> int:
        """Index spool files the store does not know (a crash between the durable write and
        the index row) and delete temporary files older than ``stale_seconds``.

        Call it before receivers start. Returns the number of instances indexed. The source of
        a recovered instance is ``scp`` (calling AE from the file meta header) when rtauto
        wrote its header, ``folder`` otherwise.
        """
        now = time.time()
        for tmp in self.incoming_dir.iterdir():
            try:
                if tmp.is_file() and now - tmp.stat().st_mtime >= stale_seconds:
                    tmp.unlink()
            except FileNotFoundError:
                continue
        known = store.instance_paths()
        indexed = 0
        for study_dir in sorted(self.spool_dir.iterdir()):
            if not (study_dir.is_dir() and is_valid_uid(study_dir.name)):
                continue
            for series_dir in sorted(study_dir.iterdir()):
                if not (series_dir.is_dir() and is_valid_uid(series_dir.name)):
                    continue
                for file in sorted(series_dir.glob("*.dcm")):
                    rel = f"{study_dir.name}/{series_dir.name}/{file.name}"
                    if rel in known:
                        continue
                    record = self._record_from_spool_file(file, rel)
                    if record is not None and store.record_instance(record):
                        indexed += 1
        if indexed:
            log.warning("reconcile: indexed %d spool instance(s) missing from the store", indexed)
        return indexed

    def path_of(self, record: InstanceRecord) -> Path:
        """Absolute path of an instance in the spool."""
        return self.spool_dir / record.path

    # -- validation ----------------------------------------------------------------------------
    def _validate(
        self, dataset: bytes | memoryview, transfer_syntax: str
    ) -> tuple[DatasetLayout, dict[str, str]]:
        if not is_valid_uid(transfer_syntax):
            raise _Invalid(
                f"transfer syntax {_text(transfer_syntax)} is not a valid UID",
                STATUS_CANNOT_UNDERSTAND,
            )
        try:
            layout = scan_dataset(dataset, transfer_syntax)
        except HeaderError as exc:
            reason = str(exc)
            if not reason.startswith(("truncated", "not DICOM")):
                reason = f"not DICOM: {reason}"
            raise _Invalid(reason, STATUS_CANNOT_UNDERSTAND) from None
        shortfall = pixel_data_shortfall(layout)
        if shortfall:
            raise _Invalid(shortfall, STATUS_CANNOT_UNDERSTAND)
        uids: dict[str, str] = {}
        for tag, keyword in _REQUIRED_UIDS:
            value = uid_value(layout, tag)
            if not value:
                raise _Invalid(
                    f"missing {keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})",
                    STATUS_DATASET_MISMATCH,
                )
            if not is_valid_uid(value):
                raise _Invalid(
                    f"{keyword} {_text(value)} is not a valid DICOM UID", STATUS_DATASET_MISMATCH
                )
            uids[keyword] = value
        missing = missing_pixel_data(layout, uids["SOPClassUID"])
        if missing:
            raise _Invalid(missing, STATUS_CANNOT_UNDERSTAND)
        return layout, uids

    # -- writing -------------------------------------------------------------------------------
    def _accept(
        self,
        meta: bytes | memoryview,
        dataset: bytes | memoryview,
        layout: DatasetLayout,
        uids: dict[str, str],
        transfer_syntax: str,
        source: str,
        calling_ae: str,
        called_ae: str,
        original: str,
        streamed: StreamedFile | None = None,
    ) -> InstanceRecord:
        study, series, sop = (
            uids["StudyInstanceUID"],
            uids["SeriesInstanceUID"],
            uids["SOPInstanceUID"],
        )
        rel = f"{study}/{series}/{sop}.dcm"
        dest = self.spool_dir / rel
        size = len(meta) + len(dataset)
        for _attempt in range(3):
            if self._write_new(dest, [meta, dataset], streamed):
                break
            with self._guard:
                try:
                    kept = dest.read_bytes()
                except FileNotFoundError:
                    continue  # retention removed the first copy meanwhile: store this one
                kept_size = len(kept)
                try:
                    kept_meta = read_file_meta(kept)
                except HeaderError:
                    kept_meta = None
                kept_dataset = kept[kept_meta.dataset_offset :] if kept_meta else b""
                same_syntax = kept_meta is not None and kept_meta.transfer_syntax == transfer_syntax
                same = same_syntax and kept_dataset == dataset
                if same:
                    self._touch_resent(dest, kept)
            if not same:
                sizes = f"{len(dataset)} bytes of data set here, {len(kept_dataset)} kept"
                if not same_syntax:
                    sizes += ", another transfer syntax"
                bad = _Invalid(
                    f"duplicate SOPInstanceUID with different content ({sizes}): the first"
                    f" version is kept at {rel}",
                    STATUS_DUPLICATE_CONFLICT,
                )
                raise self._refuse([meta, dataset], bad, source, calling_ae, called_ae, original)
            size = kept_size
            log.info("re-sent instance %s is already in the spool", sop)
            break
        else:
            raise OSError(f"{rel} kept vanishing while it was stored")
        return InstanceRecord(
            sop_instance_uid=sop,
            sop_class_uid=uids["SOPClassUID"],
            series_instance_uid=series,
            study_instance_uid=study,
            patient_id=str(_attribute(layout, "PatientID")),
            modality=str(_attribute(layout, "Modality")),
            transfer_syntax=transfer_syntax,
            path=rel,
            size=size,
            source=source,
            calling_ae=calling_ae.strip(),
            called_ae=called_ae.strip(),
            attributes={} if series in self.known_series else header_attributes(layout),
        )

    def _write_new(
        self,
        dest: Path,
        parts: Sequence[bytes | memoryview],
        streamed: StreamedFile | None = None,
    ) -> bool:
        """Write ``dest`` durably unless it exists; False when it already existed.

        The data go into an unnamed file (``O_TMPFILE``; a named temporary file in
        ``.incoming`` where the file system lacks it), are flushed to disk, and only then get
        their name through a hard link, which never replaces a file another receiver put there
        first; then the folder is flushed. ``streamed``: an unnamed file that already holds
        exactly ``parts`` (only flushed and linked here; the caller closes it).
        """
        self._make_dirs(dest.parent)
        if streamed is not None and streamed.usable:
            os.fdatasync(streamed.fd)
            try:
                with self._guard:
                    self._link_unnamed(streamed.fd, dest)
            except FileExistsError:
                return False  # already stored (the link never replaces a file)
            _fsync_dir(dest.parent)
            return True
        if dest.exists():
            return False
        if self._tmpfile_supported:
            try:
                fd = self._unnamed_file()
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._tmpfile_supported = False
            else:
                try:
                    _write_all(fd, parts)
                    os.fdatasync(fd)
                    with self._guard:
                        self._link_unnamed(fd, dest)
                except FileExistsError:
                    return False
                finally:
                    os.close(fd)
                _fsync_dir(dest.parent)
                return True
        tmp = self.incoming_dir / f"{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, parts)
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            with self._guard:
                self._link(tmp, dest)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(dest.parent)
        return True

    def _unnamed_file(self) -> int:
        """An unnamed file in the spool: one prepared ahead when there is one."""
        fd = self._prepared.take() if self._prepared is not None else -1
        return fd if fd >= 0 else _open_unnamed(self.spool_dir)

    def _link_unnamed(self, fd: int, dest: Path) -> None:
        """Give an unnamed file its name (FileExistsError: the name is taken)."""
        # src_dir_fd only makes Python call linkat(), which follows the /proc link (the path is
        # absolute, so the kernel ignores the folder it names)
        self._link(f"/proc/self/fd/{fd}", dest, src_dir_fd=fd, follow_symlinks=True)

    def _link(self, source: str | Path, dest: Path, **options: Any) -> None:
        try:
            os.link(source, dest, **options)
        except FileNotFoundError:
            # the series folder was removed behind rtauto's back: make it again
            self._series_dirs.discard(str(dest.parent))
            self._make_dirs(dest.parent)
            os.link(source, dest, **options)

    def _make_dirs(self, series_dir: Path) -> None:
        """Create (durably) a series folder and its study folder where missing."""
        key = str(series_dir)
        if key in self._series_dirs:
            return
        for folder in (series_dir.parent, series_dir):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(folder.parent)
        self._series_dirs.add(key)

    def _refuse(
        self,
        parts: Sequence[bytes | memoryview],
        bad: _Invalid,
        source: str,
        calling_ae: str,
        called_ae: str,
        original: str,
    ) -> RefusedInstance:
        # named by what was refused, from where and why: a sender that retries a refused
        # instance, or a batch read again, adds to its count instead of filling the disk
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        for text in (bad.reason, source, calling_ae.strip(), original):
            digest.update(b"\0" + text.encode("utf-8", "replace"))
        name = digest.hexdigest()[:32]
        data_path = self.quarantine_dir / f"{name}.bin"
        reason_path = self.quarantine_dir / f"{name}.json"
        now = datetime.now(UTC).isoformat()
        try:
            record = json.loads(reason_path.read_text()) if data_path.exists() else None
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict):
            record["times"] = int(record.get("times", 1)) + 1
            record["last_time"] = now
            self._write_durable(reason_path, [json.dumps(record, indent=2).encode()])
            os.utime(data_path)  # retention counts from the last time it came
            log.warning(
                "quarantined %s from %s again (%d times, kept once as %s): %s",
                original,
                source,
                record["times"],
                name,
                bad.reason,
            )
            return RefusedInstance(bad.reason, bad.status, data_path)
        record = {
            "reason": bad.reason,
            "source": source,
            "calling_ae": calling_ae.strip(),
            "called_ae": called_ae.strip(),
            "time": now,
            "original_name": original,
            "status": f"0x{bad.status:04X}",
            "file": data_path.name,
            "times": 1,
        }
        self._write_durable(data_path, parts)
        self._write_durable(reason_path, [json.dumps(record, indent=2).encode()])
        _fsync_dir(self.quarantine_dir)
        log.warning("quarantined %s from %s as %s: %s", original, source, name, bad.reason)
        return RefusedInstance(bad.reason, bad.status, data_path)

    def _touch_resent(self, path: Path, kept: bytes) -> None:
        """Set a re-sent instance's file's modification time to now: retention counts from
        the last time it came. A file the daemon's user may not touch (written by another
        user, say ``rtauto run`` as root into the daemon's home) is written anew with the
        same bytes, as the daemon's own; where even that is refused, the instance is still
        stored and only that clock stays."""
        try:
            os.utime(path)
            return
        except PermissionError:
            pass
        try:
            self._write_durable(path, [kept])
            log.info("re-sent instance %s: its spool file of another user written anew", path)
        except PermissionError:
            log.warning(
                "re-sent instance %s: its spool file belongs to another user, so retention "
                "counts from its first arrival (give the spool to the daemon's user)",
                path,
            )

    def _write_durable(self, dest: Path, parts: Sequence[bytes | memoryview]) -> None:
        # a temporary name of its own: two receivers may quarantine the same data at once
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, parts)
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, dest)

    def _record_from_spool_file(self, file: Path, rel: str) -> InstanceRecord | None:
        data = file.read_bytes()
        try:
            file_meta = read_file_meta(data)
            if file_meta is None:
                raise HeaderError("no file meta header")
            layout, uids = self._validate(
                data[file_meta.dataset_offset :], file_meta.transfer_syntax
            )
        except (HeaderError, _Invalid) as exc:
            log.error("reconcile: spool file %s is unreadable (%s); left in place", rel, exc)
            return None
        expected = (
            f"{uids['StudyInstanceUID']}/{uids['SeriesInstanceUID']}/{uids['SOPInstanceUID']}"
        )
        if rel != f"{expected}.dcm":
            log.error("reconcile: spool file %s does not match its UIDs; left in place", rel)
            return None
        written_by_scp = file_meta.values.get(0x00020012) == IMPLEMENTATION_CLASS_UID and bool(
            file_meta.values.get(0x00020016)
        )
        return InstanceRecord(
            sop_instance_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            series_instance_uid=uids["SeriesInstanceUID"],
            study_instance_uid=uids["StudyInstanceUID"],
            patient_id=str(_attribute(layout, "PatientID")),
            modality=str(_attribute(layout, "Modality")),
            transfer_syntax=file_meta.transfer_syntax,
            path=rel,
            size=len(data),
            source="scp" if written_by_scp else "folder",
            calling_ae=file_meta.values.get(0x00020016, "") if written_by_scp else "",
            called_ae=self.settings.scp.ae_title if written_by_scp else "",
            attributes=header_attributes(layout),
            received_at=file.stat().st_mtime,
        )


class _SharedFlock:
    """The spool's retention lock held shared by the threads of one process: the first thread
    in takes the ``flock``, the last one out releases it (a ``flock`` belongs to the open file,
    which the threads share). Opened on first use."""

    def __init__(self, path: Path):
        self._path = path
        self._fd = -1
        self._holders = 0
        self._mutex = threading.Lock()

    def __enter__(self) -> None:
        with self._mutex:
            if self._holders == 0:
                if self._fd < 0:
                    self._fd = os.open(self._path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_SH)  # waits while retention removes files
            self._holders += 1

    def __exit__(self, *_exc: object) -> None:
        with self._mutex:
            self._holders -= 1
            if self._holders == 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._mutex:
            if self._fd >= 0 and self._holders == 0:
                os.close(self._fd)
                self._fd = -1


class _PreparedFiles:
    """Unnamed files (``O_TMPFILE``) in one folder, created ahead of need by a thread."""

    def __init__(self, folder: Path, count: int):
        self._folder = folder
        self._count = count
        self._fds: list[int] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._fill, name="rtauto-spool-files", daemon=True)
        self._thread.start()

    def take(self) -> int:
        """An open unnamed file, or -1 when none is ready."""
        with self._cond:
            fd = self._fds.pop() if self._fds else -1
            self._cond.notify()
        return fd

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        with self._cond:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._fds) >= self._count:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                fd = _open_unnamed(self._folder)
            except OSError as exc:
                log.warning("cannot prepare spool files ahead (%s); creating them as needed", exc)
                return
            with self._cond:
                if self._closed:
                    os.close(fd)
                    return
                self._fds.append(fd)


class _BoundedSet:
    """A set that forgets everything when it reaches ``limit`` members (a cache)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._members: set[str] = set()

    def add(self, item: str) -> None:
        if item not in self._members:
            if len(self._members) >= self.limit:
                self._members.clear()
            self._members.add(item)

    def discard(self, item: str) -> None:
        self._members.discard(item)

    def __contains__(self, item: object) -> bool:
        return item in self._members


_KEYWORD_TAGS = {"PatientID": 0x00100020, "Modality": 0x00080060}


def _attribute(layout: DatasetLayout, keyword: str) -> str:
    found = layout.elements.get(_KEYWORD_TAGS[keyword])
    if found is None:
        return ""
    _vr, pos, length = found
    if length > 64:
        return ""
    return bytes(layout.data[pos : pos + length]).decode("latin-1").strip("\x00 ")
