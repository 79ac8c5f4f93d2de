"""Retention: rtauto removes from its home what it has kept for as long as it was told to.

A planning server runs for months; without this its disk fills and the storage SCP starts to
refuse images (``min_free_mb``). The ``retention:`` block of the daemon configuration
(:class:`~rtauto.config.RetentionSettings`) sets a period per kind of data; a kind without one
is kept for ever. What goes, and what is kept whatever its age:

* **Received instances** (spool files and instance rows): by patient, all of a patient's or
  none. Nothing of a patient goes while anything of theirs arrived within
  ``received_days`` (the planning CT stays as long as the daily CBCTs of the course keep
  coming; an instance sent again counts, as a re-send touches its file's modification time),
  while a job on any of their studies is pending or running or has a result not delivered, or
  while one of their series has not been seen complete. A series with an indexed file missing
  or outside the spool (a spool not mounted, a purge run on the wrong home) is kept and
  reported, never forgotten unread. A patient is looked at again, whole, under the spool's
  lock before anything of theirs goes (what arrived or was made meanwhile keeps it all), and
  the index rows go before the files (a crash between leaves files that the next start
  indexes again, never rows naming no file). Series and study rows stay, emptied (see
  :func:`_forget_instances`): an emptied series is absent for triggers and for steps that
  look up a patient's earlier images until it is sent again.
* **Jobs**: ``jobs_days`` after the job ended, unless one of its results is not delivered
  (pending, failed or dead-lettered: it waits for ``rtauto replay``), its folder under
  ``HOME/jobs`` goes; its rows (the job, its steps, artifacts and deliveries) go with it once
  its study holds no received instance, as until then the job's record is what keeps a
  series sent again from running the workflow (and delivering) a second time. A job folder
  outside ``HOME/jobs`` (``rtauto run --out``) is never touched.
* **Quarantine** (``<uuid>.bin`` and its ``<uuid>.json``): by the files' age.
* **Audit events**: by age.

Removing received files runs while receivers run: see :mod:`rtauto.ingest.spool` for the lock
that keeps an instance accepted at that moment from being removed. Every pass that removed
something writes one ``retention.purged`` audit event with its counts.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update

from rtauto.config import RetentionSettings, Settings
from rtauto.errors import RtautoError
from rtauto.ingest.spool import Spool
from rtauto.locks import exclusive_lock
from rtauto.store import Store
from rtauto.store.models import (
    ArtifactRow,
    AuditEvent,
    Delivery,
    Instance,
    Job,
    Series,
    StepRun,
)
from rtauto.store.store import delivered_elsewhere

__all__ = ["PurgeReport", "PurgeRunning", "purge"]

log = logging.getLogger("rtauto.retention")

DAY = 86400.0
LOCK_FILE = "retention.lock"  # in the home: one pass at a time
ENDED = ("ok", "fail")
UNFINISHED = ("pending", "running")
# series rows that no assembler looks at (the inputs of rtauto run and batch)
_NOT_ASSEMBLED = ("run", "batch")

# why something past its period was kept (the keys of PurgeReport.kept)
KEPT_UNFINISHED_JOB = "patients with a pending or running job, or a result not delivered"
KEPT_INCOMPLETE = "patients with a series not yet complete"
KEPT_SPOOL_BUSY = "series skipped while the spool was busy"
KEPT_RECEIVED_AGAIN = "series with an instance received again within the period"
KEPT_FILE_MISSING = "series with an indexed file missing or outside the spool"
KEPT_ARRIVED = "patients with something received while the pass ran"
KEPT_UNDELIVERED = "jobs with a result not delivered"
KEPT_STUDY_HELD = "job records kept while their study's received data is kept"


@dataclass
class PurgeReport:
    """What one pass removed (or, with ``dry_run``, would remove)."""

    dry_run: bool = False
    patients: int = 0
    series: int = 0
    instances: int = 0
    instance_bytes: int = 0
    jobs: int = 0
    job_folders: int = 0
    job_bytes: int = 0
    quarantined_files: int = 0
    quarantine_bytes: int = 0
    audit_events: int = 0
    kept: dict[str, int] = field(default_factory=dict)

    @property
    def removed_anything(self) -> bool:
        return any(
            (
                self.instances,
                self.series,
                self.jobs,
                self.job_folders,
                self.quarantined_files,
                self.audit_events,
            )
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        parts = [
            f"{self.instances} instance(s) in {self.series} series of {self.patients} "
            f"patient(s) ({_mb(self.instance_bytes)})",
            f"{self.jobs} job(s) and the folders of {self.job_folders} more "
            f"({_mb(self.job_bytes)})",
            f"{self.quarantined_files} quarantined file(s) ({_mb(self.quarantine_bytes)})",
            f"{self.audit_events} audit event(s)",
        ]
        text = f"retention {verb} " + ", ".join(parts)
        if self.kept:
            text += "; kept past their period: " + ", ".join(
                f"{count} {why}" for why, count in sorted(self.kept.items())
            )
        return text


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@dataclass(frozen=True)
class _SpoolFile:
    """A received instance's file as a retention pass found it."""

    sop_uid: str
    path: Path
    size: int
    mtime: float


class PurgeRunning(RtautoError):
    """Another retention pass holds the home's retention lock."""


def purge(
    settings: Settings,
    store: Store,
    *,
    retention: RetentionSettings | None = None,
    now: float | None = None,
    dry_run: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> PurgeReport:
    """Remove what has passed its retention period (``retention``: the configured one unless
    given). ``dry_run`` removes nothing and reports what would go. ``stop`` is asked between
    patients and between kinds of data: a stopping daemon ends the pass early (what is left
    goes in the next one). Raises :class:`PurgeRunning` while another pass runs on the home."""
    retention = retention or settings.retention
    now = time.time() if now is None else now
    lock = None if dry_run else exclusive_lock(Path(settings.home) / LOCK_FILE)
    if lock is None and not dry_run:
        raise PurgeRunning(f"a retention pass is already running on {settings.home}")
    run = _Pass(settings, store, dry_run, stop)
    try:
        for days, remove in (
            (retention.received_days, run.received),
            (retention.jobs_days, run.jobs),
            (retention.quarantine_days, run.quarantine),
            (retention.audit_days, run.audit),
        ):
            if days is not None and not stop():
                remove(now - days * DAY)
    finally:
        report = run.report
        report.kept = dict(run.kept)
        if report.removed_anything and not dry_run:
            store.audit("retention.purged", "", report.summary(), **report.as_dict())
        if lock is not None:
            os.close(lock)
    return report


class _Pass:
    """One retention pass; each method removes one kind of data older than ``cutoff``."""

    def __init__(
        self, settings: Settings, store: Store, dry_run: bool, stop: Callable[[], bool]
    ) -> None:
        self.settings = settings
        self.store = store
        self.dry_run = dry_run
        self.stop = stop
        self.report = PurgeReport(dry_run=dry_run)
        self.kept: Counter[str] = Counter()
        # series this pass emptied (or, in a dry run, would have)
        self.emptied: set[str] = set()

    # -- received instances --------------------------------------------------------------------
    def received(self, cutoff: float) -> None:
        with self.store.session() as s:
            rows = s.execute(select(*_SERIES_COLUMNS)).all()
            busy_studies = _busy_studies(s)
        # a patient's series together; without a Patient ID, a study's
        groups: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            groups.setdefault(_patient_key(row), []).append(row)
        spool = Spool(self.settings)
        root = spool.spool_dir.resolve()
        try:
            for key, members in groups.items():
                if self.stop():
                    return
                reason = _keeps(members, busy_studies, cutoff)
                if reason is not None:
                    if reason != KEPT_RECENT:
                        self.kept[reason] += 1
                    continue
                holding = [row for row in members if row.instance_count]  # else emptied before
                files: dict[str, list[_SpoolFile]] = {}
                for row in holding:
                    found = self._files_of(root, row.series_uid, cutoff)
                    if found is None:
                        break  # the patient is kept whole: the reason is counted
                    files[row.series_uid] = found
                else:
                    if holding and self._remove(spool, key, members, files, cutoff):
                        self.report.patients += 1
        finally:
            spool.close()

    def _files_of(self, root: Path, series_uid: str, cutoff: float) -> list[_SpoolFile] | None:
        """The spool files of a series, all last received before ``cutoff``; None (the reason
        counted in ``kept``) when one was received again since, or is missing, or lies outside
        the spool."""
        files = []
        for instance in self.store.instances_of_series(series_uid):
            path = _inside(root, instance.path)
            try:
                st = path.stat() if path is not None else None
            except FileNotFoundError:
                st = None
            if st is None:
                log.warning(
                    "retention keeps series %s: its instance %s is indexed at %s, which is %s",
                    series_uid,
                    instance.sop_uid,
                    root / instance.path,
                    "missing (is the spool mounted?)" if path is not None else "outside the spool",
                )
                self.kept[KEPT_FILE_MISSING] += 1
                return None
            if st.st_mtime >= cutoff:
                self.kept[KEPT_RECEIVED_AGAIN] += 1
                return None
            files.append(_SpoolFile(instance.sop_uid, path, st.st_size, st.st_mtime))
        return files

    def _remove(
        self,
        spool: Spool,
        key: tuple[str, str],
        members: list[Any],
        files: dict[str, list[_SpoolFile]],
        cutoff: float,
    ) -> bool:
        """Remove a patient's received data (``files``, by series): all of it or, when
        anything changed since the pass looked, none. Whether it went."""
        if self.dry_run:
            for series_uid, series_files in files.items():
                self._count_removed(series_uid, series_files)
            return True
        root = spool.spool_dir.resolve()
        with spool.exclusive() as held:
            if not held:
                self.kept[KEPT_SPOOL_BUSY] += 1
                return False
            # looked at again under the lock, the patient whole: a job made, a series or an
            # instance indexed, a file named or one received again since the pass looked
            # keeps everything of theirs
            with self.store.session() as s:
                fresh = s.execute(select(*_SERIES_COLUMNS).where(*_of_patient(key))).all()
                busy_studies = _busy_studies(s)
            reason = _keeps(fresh, busy_studies, cutoff)
            before = {row.series_uid: (row.last_received, row.instance_count) for row in members}
            now = {row.series_uid: (row.last_received, row.instance_count) for row in fresh}
            folders = {row.series_uid: root / row.study_uid / row.series_uid for row in members}
            if reason in (None, KEPT_RECENT) and (
                now != before
                or any(
                    _changed_since_listed(folders[uid], series_files)
                    for uid, series_files in files.items()
                )
            ):
                reason = KEPT_ARRIVED
            if reason is not None:
                self.kept[KEPT_ARRIVED if reason == KEPT_RECENT else reason] += 1
                return False
            # the rows first: a crash before the files go leaves files that the next start
            # indexes again (and the next pass removes), never rows naming no file
            for series_uid, series_files in files.items():
                _forget_instances(self.store, series_uid, [f.sop_uid for f in series_files])
            for series_uid, series_files in files.items():
                for file in series_files:
                    file.path.unlink(missing_ok=True)
                for folder in (folders[series_uid], folders[series_uid].parent):
                    try:
                        folder.rmdir()  # only when empty
                    except OSError:
                        break
        for series_uid, series_files in files.items():
            self._count_removed(series_uid, series_files)
        return True

    def _count_removed(self, series_uid: str, files: list[_SpoolFile]) -> None:
        self.report.instances += len(files)
        self.report.instance_bytes += sum(f.size for f in files)
        self.report.series += 1
        self.emptied.add(series_uid)

    # -- jobs ----------------------------------------------------------------------------------
    def jobs(self, cutoff: float) -> None:
        ended_at = func.coalesce(Job.finished_at, Job.created_at)
        with self.store.session() as s:
            jobs = s.execute(
                select(Job.id, Job.work_dir, Job.study_uid).where(
                    Job.status.in_(ENDED), ended_at < cutoff
                )
            ).all()
            undelivered = set(s.scalars(_undelivered_jobs()))
            holding = {
                (study_uid, series_uid)
                for study_uid, series_uid in s.execute(
                    select(Series.study_uid, Series.series_uid).where(Series.instance_count > 0)
                )
            }
        held_studies = {study for study, series in holding if series not in self.emptied}
        jobs_root = Path(self.settings.jobs_dir).resolve()
        gone: list[str] = []
        for job_id, work_dir, study_uid in jobs:
            if job_id in undelivered:
                self.kept[KEPT_UNDELIVERED] += 1
                continue
            folder = Path(work_dir).resolve() if work_dir else None
            if folder is not None and (folder == jobs_root or not folder.is_relative_to(jobs_root)):
                folder = None  # not rtauto's to remove
            removed_folder = folder is not None and folder.is_dir()
            if removed_folder:
                self.report.job_bytes += _tree_size(folder)
                if not self.dry_run:
                    shutil.rmtree(folder, ignore_errors=True)
            if study_uid in held_studies:
                self.kept[KEPT_STUDY_HELD] += 1
                self.report.job_folders += removed_folder
                continue
            gone.append(job_id)
        self.report.jobs += len(gone)
        if self.dry_run or not gone:
            return
        with self.store.session() as s:
            for start in range(0, len(gone), 500):
                ids = gone[start : start + 500]
                for table in (Delivery, ArtifactRow, StepRun):
                    s.execute(delete(table).where(table.job_id.in_(ids)))
                s.execute(delete(Job).where(Job.id.in_(ids)))

    # -- quarantine and audit ------------------------------------------------------------------
    def quarantine(self, cutoff: float) -> None:
        folder = Path(self.settings.quarantine_dir)
        if not folder.is_dir():
            return
        for entry in os.scandir(folder):
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_mtime >= cutoff:
                continue
            if not self.dry_run:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
            if entry.name.endswith(".bin"):
                self.report.quarantined_files += 1
            self.report.quarantine_bytes += st.st_size

    def audit(self, cutoff: float) -> None:
        before = datetime.fromtimestamp(cutoff, UTC).replace(tzinfo=None)
        with self.store.session() as s:
            if self.dry_run:
                count = s.scalar(_count(AuditEvent).where(AuditEvent.ts < before)) or 0
            else:
                count = s.execute(delete(AuditEvent).where(AuditEvent.ts < before)).rowcount
        self.report.audit_events += count


_SERIES_COLUMNS = (
    Series.series_uid,
    Series.study_uid,
    Series.patient_id,
    Series.last_received,
    Series.completed_at,
    Series.source,
    Series.instance_count,
)
KEPT_RECENT = "recent"  # not counted: what arrived within the period is not past it


def _patient_key(row: Any) -> tuple[str, str]:
    """Whose a series is: its patient, or its study when it has no Patient ID."""
    return ("patient", row.patient_id) if row.patient_id else ("study", row.study_uid)


def _of_patient(key: tuple[str, str]) -> tuple[Any, ...]:
    """The conditions selecting the series of :func:`_patient_key` ``key``."""
    kind, value = key
    if kind == "patient":
        return (Series.patient_id == value,)
    return (Series.patient_id == "", Series.study_uid == value)


def _keeps(rows: Any, busy_studies: set[str], cutoff: float) -> str | None:
    """Why a patient's series (``rows``) are kept whole, or None when they may go."""
    if max(row.last_received for row in rows) >= cutoff:
        return KEPT_RECENT
    if any(row.study_uid in busy_studies for row in rows):
        return KEPT_UNFINISHED_JOB
    if any(row.completed_at is None and row.source not in _NOT_ASSEMBLED for row in rows):
        return KEPT_INCOMPLETE
    return None


def _busy_studies(session: Any) -> set[str]:
    """Studies whose received data a job may still read: a job pending or running, or one
    with a result not delivered (a routing step that sends the inputs reads the spool's
    files when ``rtauto replay`` sends them again)."""
    unfinished = select(Job.study_uid).where(Job.status.in_(UNFINISHED))
    undelivered = select(Job.study_uid).where(Job.id.in_(_undelivered_jobs()))
    return set(session.scalars(unfinished)) | set(session.scalars(undelivered))


def _undelivered_jobs() -> Any:
    """The ids of jobs with a routed item that reached none of its step's destinations (one
    an alternate took after the primary failed is delivered)."""
    return (
        select(Delivery.job_id)
        .where(Delivery.status != "delivered", ~delivered_elsewhere(Delivery))
        .distinct()
    )


def _inside(root: Path, rel: str) -> Path | None:
    """``root/rel`` when it lies inside ``root`` (index paths are built from validated UIDs;
    this is the last line of defence before a file is removed)."""
    path = (root / rel).resolve()
    return path if path.is_relative_to(root) and path != root else None


def _forget_instances(store: Store, series_uid: str, sop_uids: list[str]) -> None:
    """Delete the index rows of removed instances and take them off the series' count.

    The count goes down by the rows deleted, in the database (a receiving process that
    indexes an instance of the series meanwhile adds to it concurrently; setting a count
    read here would undo that). The series and study rows stay (a few hundred bytes each): a
    receiving process knows the series it has indexed and leaves their header attributes out
    of later rows, so a series sent again must find its row, with the attributes its
    triggers match on."""
    with store.session() as s:
        deleted = 0
        for start in range(0, len(sop_uids), 500):
            chunk = sop_uids[start : start + 500]
            deleted += s.execute(delete(Instance).where(Instance.sop_uid.in_(chunk))).rowcount
        s.execute(
            update(Series)
            .where(Series.series_uid == series_uid)
            .values(instance_count=Series.instance_count - deleted)
        )


def _changed_since_listed(series_dir: Path, files: list[_SpoolFile]) -> bool:
    """Whether the series' folder holds other files than ``files`` (one named since they
    were listed) or one of them touched since (received again)."""
    listed = {f.path.name: f for f in files if f.path.parent == series_dir}
    if len(listed) != len(files):
        return True  # a file indexed outside its series' folder: not rtauto's layout
    try:
        entries = list(os.scandir(series_dir))
    except FileNotFoundError:
        return True
    for entry in entries:
        file = listed.get(entry.name)
        try:
            if file is None or entry.stat(follow_symlinks=False).st_mtime != file.mtime:
                return True
        except FileNotFoundError:
            return True
    return len(entries) != len(listed)


def _count(table: Any) -> Any:
    return select(func.count()).select_from(table)


def _tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total
