"""The job store: every state change of ingest, jobs, steps and deliveries goes through here.

SQLite in WAL mode is the embedded default (one file under the daemon's home, shared by its
processes); a PostgreSQL URL lets several nodes share one store. The schema is created and
upgraded by alembic migrations when the store is opened with ``migrate=True``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Exists,
    create_engine,
    delete,
    event,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased, sessionmaker
from sqlalchemy.orm.util import AliasedClass

from rtauto.errors import StoreError
from rtauto.store.models import (
    ArtifactRow,
    AuditEvent,
    Delivery,
    Instance,
    Job,
    Series,
    StepRun,
    Study,
    WatchedFile,
)

__all__ = ["InstanceRecord", "Store", "TERMINAL_STEP_STATES", "delivered_elsewhere"]

TERMINAL_STEP_STATES = frozenset({"ok", "fail", "skipped"})
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


@dataclass(frozen=True)
class InstanceRecord:
    """One instance safely on disk in the spool, as ingest reports it to the store."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    modality: str
    transfer_syntax: str
    path: str  # relative to the spool folder
    size: int
    source: str  # scp | folder | run
    calling_ae: str = ""
    called_ae: str = ""
    # series-level attributes workflows may trigger on (SeriesDescription, BodyPartExamined...)
    attributes: dict[str, Any] = field(default_factory=dict)
    received_at: float = field(default_factory=time.time)


def delivered_elsewhere(record: type[Delivery] | AliasedClass[Delivery]) -> Exists:
    """EXISTS: the item of the delivery record ``record`` (the :class:`Delivery` entity or an
    alias of it in the enclosing query) was delivered by the same step of the same job to some
    destination (its own, an alternate, or another that ``rtauto replay --to`` sent it to).
    Such an item counts as delivered: ``~delivered_elsewhere(Delivery)`` beside
    ``Delivery.status == "dead"`` selects the dead letters still waiting."""
    arrived = aliased(Delivery)
    return (
        select(arrived.id)
        .where(
            arrived.job_id == record.job_id,
            arrived.step_id == record.step_id,
            arrived.item_key == record.item_key,
            arrived.status == "delivered",
        )
        .exists()
    )


def _replaces(newer: AliasedClass[Job], job: type[Job] | AliasedClass[Job]) -> ColumnElement[bool]:
    """Whether ``newer`` took over the work of ``job``: a later job of the same workflow on
    the same series (series scope) or study (study scope), made when it grew (the
    assembler's ``series.grown`` / ``study.grown``) or by ``rtauto rerun``. Jobs of ``rtauto
    run`` and ``batch`` replace none (they run on their own input files)."""
    return (
        (newer.workflow_name == job.workflow_name)
        & (newer.scope == job.scope)
        & (newer.created_at > job.created_at)
        & newer.dedupe_key.not_like("run:%")
        & newer.dedupe_key.not_like("batch:%")
        & (
            ((job.scope == "series") & (newer.series_uid == job.series_uid))
            | ((job.scope == "study") & (newer.study_uid == job.study_uid))
        )
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across process crashes in WAL mode; the spool file (fsynced) is the
    # record of an acknowledged instance, the index row can be rebuilt from it.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}
        )  # no pre-ping: a local file has no connection to lose, and it runs per transaction
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _instance_upserts(dialect: str) -> tuple[Any, Any, Any]:
    """INSERT ... ON CONFLICT statements (SQLite and PostgreSQL) indexing instances: add the
    instances unless known, create or touch their study, create their series or add the count
    of new instances (the inserted ``instance_count``) to it."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    from sqlalchemy import case

    # RETURNING tells a new row from a known one (psycopg reports no rowcount here)
    add_instance = (
        insert(Instance)
        .on_conflict_do_nothing(index_elements=[Instance.sop_uid])
        .returning(Instance.sop_uid)
    )
    study = insert(Study)
    touch_study = study.on_conflict_do_update(
        index_elements=[Study.study_uid],
        set_={
            "first_received": case(
                (Study.completed_at.is_(None), Study.first_received),
                else_=study.excluded.first_received,
            ),
            "last_received": case(
                (study.excluded.last_received > Study.last_received, study.excluded.last_received),
                else_=Study.last_received,
            ),
            "completed_at": None,  # a late series is matched again
        },
    )
    series = insert(Series)
    touch_series = series.on_conflict_do_update(
        index_elements=[Series.series_uid],
        set_={
            "instance_count": Series.instance_count + series.excluded.instance_count,
            "last_received": case(
                (
                    series.excluded.last_received > Series.last_received,
                    series.excluded.last_received,
                ),
                else_=Series.last_received,
            ),
            "completed_at": None,
        },
    )
    return add_instance, touch_study, touch_series


def _instance_rows(records: Sequence[InstanceRecord]) -> list[dict[str, Any]]:
    return [
        {
            "sop_uid": rec.sop_instance_uid,
            "sop_class_uid": rec.sop_class_uid,
            "series_uid": rec.series_instance_uid,
            "study_uid": rec.study_instance_uid,
            "transfer_syntax": rec.transfer_syntax,
            "path": rec.path,
            "size": rec.size,
            "received_at": rec.received_at,
            "source": rec.source,
            "calling_ae": rec.calling_ae,
        }
        for rec in records
    ]


def _touched(
    records: Sequence[InstanceRecord], new: set[str]
) -> tuple[list[bool], list[dict[str, Any]], list[dict[str, Any]]]:
    """Per record: was it new (``new`` holds the SOP Instance UIDs the INSERT added; a repeat
    within ``records`` is not new); the study and series upsert parameters for new ones."""
    new = set(new)
    flags: list[bool] = []
    studies: dict[str, dict[str, Any]] = {}
    series: dict[str, dict[str, Any]] = {}
    for rec in records:
        is_new = rec.sop_instance_uid in new
        new.discard(rec.sop_instance_uid)
        flags.append(is_new)
        if not is_new:
            continue
        now = rec.received_at
        study = studies.get(rec.study_instance_uid)
        if study is None:
            studies[rec.study_instance_uid] = {
                "study_uid": rec.study_instance_uid,
                "patient_id": rec.patient_id,
                "first_received": now,
                "last_received": now,
            }
        else:
            study["first_received"] = min(study["first_received"], now)
            study["last_received"] = max(study["last_received"], now)
        row = series.get(rec.series_instance_uid)
        if row is None:
            series[rec.series_instance_uid] = {
                "series_uid": rec.series_instance_uid,
                "study_uid": rec.study_instance_uid,
                "patient_id": rec.patient_id,
                "modality": rec.modality,
                "source": rec.source,
                "calling_ae": rec.calling_ae,
                "called_ae": rec.called_ae,
                "attributes": rec.attributes,
                "instance_count": 1,
                "first_received": now,
                "last_received": now,
            }
        else:
            row["instance_count"] += 1
            row["first_received"] = min(row["first_received"], now)
            row["last_received"] = max(row["last_received"], now)
            if not row["attributes"]:
                row["attributes"] = rec.attributes
    return flags, list(studies.values()), list(series.values())


# the upserts of _instance_upserts in SQLite's SQL, for the DB-API fast path
_SQLITE_ADD_INSTANCE = (
    "INSERT INTO instances (sop_uid, sop_class_uid, series_uid, study_uid, transfer_syntax,"
    " path, size, received_at, source, calling_ae) VALUES (:sop_uid, :sop_class_uid,"
    " :series_uid, :study_uid, :transfer_syntax, :path, :size, :received_at, :source,"
    " :calling_ae) ON CONFLICT (sop_uid) DO NOTHING RETURNING sop_uid"
)
_SQLITE_TOUCH_STUDY = (
    "INSERT INTO studies (study_uid, patient_id, first_received, last_received)"
    " VALUES (:study_uid, :patient_id, :first_received, :last_received)"
    " ON CONFLICT (study_uid) DO UPDATE SET"
    " first_received = CASE WHEN studies.completed_at IS NULL THEN studies.first_received"
    " ELSE excluded.first_received END,"
    " last_received = max(studies.last_received, excluded.last_received), completed_at = NULL"
)
_SQLITE_TOUCH_SERIES = (
    "INSERT INTO series (series_uid, study_uid, patient_id, modality, source, calling_ae,"
    " called_ae, attributes, instance_count, first_received, last_received)"
    " VALUES (:series_uid, :study_uid, :patient_id, :modality, :source, :calling_ae,"
    " :called_ae, :attributes, :instance_count, :first_received, :last_received)"
    " ON CONFLICT (series_uid) DO UPDATE SET"
    " instance_count = series.instance_count + excluded.instance_count,"
    " last_received = max(series.last_received, excluded.last_received), completed_at = NULL"
)


def run_migrations(url: str) -> None:
    """Bring the schema at ``url`` to the newest revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    try:
        command.upgrade(cfg, "head")
    except OperationalError as exc:
        raise StoreError(f"cannot migrate the job store at {url}: {exc}") from exc


class Store:
    """A handle on the job store; one per process (it holds a connection pool)."""

    def __init__(self, url: str, *, migrate: bool = False):
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if migrate:
            run_migrations(url)
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._upserts: tuple[Any, Any, Any] | None = None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    # -- ingest --------------------------------------------------------------------------------
    def record_instance(self, rec: InstanceRecord) -> bool:
        """Index an instance already durable in the spool. Returns False for a re-sent one."""
        return self.record_instances([rec])[0]

    def record_instances(self, records: Sequence[InstanceRecord]) -> list[bool]:
        """Index instances already durable in the spool, in one transaction (the storage SCP
        commits the instances of concurrent associations together). One flag per record:
        False for an instance already indexed (a re-sent one, or a repeat in ``records``)."""
        if not records:
            return []
        for attempt in range(5):
            try:
                if self.engine.dialect.name == "sqlite":
                    return self._record_instances_sqlite(records)
                if self.engine.dialect.name == "postgresql":
                    return self._record_instances_upsert(records)
                return [self._record_instance_orm(rec) for rec in records]
            except IntegrityError:
                # two processes created the same study/series row at once: try again
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _record_instance_orm(self, rec: InstanceRecord) -> bool:
        with self.session() as s:
            if s.get(Instance, rec.sop_instance_uid) is not None:
                return False
            now = rec.received_at
            study = s.get(Study, rec.study_instance_uid)
            if study is None:
                s.add(
                    Study(
                        study_uid=rec.study_instance_uid,
                        patient_id=rec.patient_id,
                        first_received=now,
                        last_received=now,
                    )
                )
            else:
                if study.completed_at is not None:
                    study.first_received = now  # waiting (max_wait) starts afresh
                study.last_received = max(study.last_received, now)
                study.completed_at = None  # a late series is matched again
            series = s.get(Series, rec.series_instance_uid)
            if series is None:
                s.add(
                    Series(
                        series_uid=rec.series_instance_uid,
                        study_uid=rec.study_instance_uid,
                        patient_id=rec.patient_id,
                        modality=rec.modality,
                        source=rec.source,
                        calling_ae=rec.calling_ae,
                        called_ae=rec.called_ae,
                        attributes=rec.attributes,
                        instance_count=1,
                        first_received=now,
                        last_received=now,
                    )
                )
            else:
                series.instance_count += 1
                series.last_received = max(series.last_received, now)
                series.completed_at = None
            s.add(
                Instance(
                    sop_uid=rec.sop_instance_uid,
                    sop_class_uid=rec.sop_class_uid,
                    series_uid=rec.series_instance_uid,
                    study_uid=rec.study_instance_uid,
                    transfer_syntax=rec.transfer_syntax,
                    path=rec.path,
                    size=rec.size,
                    received_at=now,
                    source=rec.source,
                    calling_ae=rec.calling_ae,
                )
            )
        return True

    def _record_instances_sqlite(self, records: Sequence[InstanceRecord]) -> list[bool]:
        """``record_instances`` on SQLite through the DB-API connection with the same upserts
        as :func:`_instance_upserts`, written out in SQL: it runs before C-STORE success
        statuses, and SQLAlchemy's statement machinery costs more CPU than SQLite itself."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                new: set[str] = set()
                for row in _instance_rows(records):
                    cursor.execute(_SQLITE_ADD_INSTANCE, row)
                    if cursor.fetchone() is not None:
                        new.add(row["sop_uid"])
                flags, studies, series = _touched(records, new)
                for params in series:
                    params["attributes"] = json.dumps(params["attributes"])
                cursor.executemany(_SQLITE_TOUCH_STUDY, studies)
                cursor.executemany(_SQLITE_TOUCH_SERIES, series)
            finally:
                cursor.close()
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            raw.close()  # back to the pool
        return flags

    def _record_instances_upsert(self, records: Sequence[InstanceRecord]) -> list[bool]:
        """``record_instances`` on PostgreSQL: one multi-row INSERT for the instances, then
        one upsert per study and per series touched, with the count of new instances."""
        if self._upserts is None:
            self._upserts = _instance_upserts(self.engine.dialect.name)
        add_instance, touch_study, touch_series = self._upserts
        with self.engine.begin() as conn:
            new = set(conn.execute(add_instance, _instance_rows(records)).scalars())
            flags, studies, series = _touched(records, new)
            for params in studies:
                conn.execute(touch_study, params)
            for params in series:
                conn.execute(touch_series, params)
        return flags

    def has_instance(self, sop_uid: str) -> bool:
        with self.session() as s:
            return s.get(Instance, sop_uid) is not None

    def instance_paths(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(Instance.path)))

    def pending_series(self) -> list[Series]:
        with self.session() as s:
            return list(s.scalars(select(Series).where(Series.completed_at.is_(None))))

    def pending_studies(self) -> list[Study]:
        with self.session() as s:
            return list(s.scalars(select(Study).where(Study.completed_at.is_(None))))

    def series_of_study(self, study_uid: str) -> list[Series]:
        """The series of a study that hold instances (a series retention emptied is absent
        until it is sent again), first received first."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Series)
                    .where(Series.study_uid == study_uid, Series.instance_count > 0)
                    .order_by(Series.first_received)
                )
            )

    def get_series(self, series_uid: str) -> Series | None:
        with self.session() as s:
            return s.get(Series, series_uid)

    def get_study(self, study_uid: str) -> Study | None:
        with self.session() as s:
            return s.get(Study, study_uid)

    def instances_of_series(self, series_uid: str) -> list[Instance]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(Instance)
                    .where(Instance.series_uid == series_uid)
                    .order_by(Instance.received_at, Instance.sop_uid)
                )
            )

    def series_of_patient(self, patient_id: str, modality: str | None = None) -> list[Series]:
        """Every series of a patient that holds instances (newest first), for steps that look
        up earlier images (a series retention emptied is absent)."""
        with self.session() as s:
            q = select(Series).where(Series.patient_id == patient_id, Series.instance_count > 0)
            if modality:
                q = q.where(Series.modality == modality)
            return list(s.scalars(q.order_by(Series.last_received.desc())))

    def mark_series_complete(
        self, series_uid: str, when: float | None = None, *, instance_count: int | None = None
    ) -> bool:
        """Mark the series complete; with ``instance_count``, only while it still holds that
        many instances (one that arrived since the caller looked keeps it pending, to be
        looked at again). Returns whether it was marked."""
        with self.session() as s:
            q = update(Series).where(Series.series_uid == series_uid)
            if instance_count is not None:
                q = q.where(Series.instance_count == instance_count)
            return bool(s.execute(q.values(completed_at=when or time.time())).rowcount)

    def mark_study_complete(
        self, study_uid: str, when: float | None = None, *, last_received: float | None = None
    ) -> bool:
        """Mark the study complete; with ``last_received``, only while nothing arrived for it
        since (see :meth:`mark_series_complete`)."""
        with self.session() as s:
            q = update(Study).where(Study.study_uid == study_uid)
            if last_received is not None:
                q = q.where(Study.last_received == last_received)
            return bool(s.execute(q.values(completed_at=when or time.time())).rowcount)

    # -- watch folders -------------------------------------------------------------------------
    def watched_files(self, folder: Path) -> dict[str, tuple[int, int]]:
        """The files under ``folder`` the folder watcher has read: path -> (size, mtime_ns)."""
        prefix = str(folder).rstrip("/") + "/"
        with self.session() as s:
            rows = s.execute(
                select(WatchedFile.path, WatchedFile.size, WatchedFile.mtime_ns).where(
                    WatchedFile.path.startswith(prefix, autoescape=True)
                )
            )
            return {path: (size, mtime) for path, size, mtime in rows}

    def remember_watched_file(self, path: Path, size: int, mtime_ns: int, outcome: str) -> None:
        """Record that a watch-folder file with this size and modification time was read."""
        with self.session() as s:
            s.merge(
                WatchedFile(
                    path=str(path),
                    size=size,
                    mtime_ns=mtime_ns,
                    outcome=outcome,
                    read_at=time.time(),
                )
            )

    def forget_watched_files(self, paths: Iterable[Path]) -> None:
        """Drop the records of watch-folder files that are gone or changed."""
        names = [str(p) for p in paths]
        with self.session() as s:
            for start in range(0, len(names), 500):
                s.execute(
                    delete(WatchedFile).where(WatchedFile.path.in_(names[start : start + 500]))
                )

    def counts(self) -> dict[str, int]:
        with self.session() as s:
            return {
                "instances": s.scalar(select(func.count()).select_from(Instance)) or 0,
                "series": s.scalar(select(func.count()).select_from(Series)) or 0,
                "studies": s.scalar(select(func.count()).select_from(Study)) or 0,
                "jobs": s.scalar(select(func.count()).select_from(Job)) or 0,
            }

    # -- jobs ----------------------------------------------------------------------------------
    def create_job(
        self,
        *,
        dedupe_key: str,
        workflow_name: str,
        workflow_hash: str,
        workflow_text: str,
        workflow_path: str,
        scope: str,
        study_uid: str,
        series_uid: str | None,
        input_series: Sequence[str],
        step_ids: Sequence[tuple[str, str]],
        jobs_dir: Path,
        work_dir: Path | None = None,
        input_instances: Sequence[str] | None = None,
    ) -> Job | None:
        """Create a job with its steps pending; None when this job already exists.

        Its working folder is ``jobs_dir/<job id>`` unless ``work_dir`` is given.
        ``input_instances``: the SOP Instance UIDs of the input series the job reads (None:
        every instance the store holds for them).
        """
        job_id = uuid.uuid4().hex
        now = time.time()
        try:
            with self.session() as s:
                if s.scalar(select(Job.id).where(Job.dedupe_key == dedupe_key)) is not None:
                    return None
                job = Job(
                    id=job_id,
                    dedupe_key=dedupe_key,
                    workflow_name=workflow_name,
                    workflow_hash=workflow_hash,
                    workflow_text=workflow_text,
                    workflow_path=workflow_path,
                    scope=scope,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    input_series=list(input_series),
                    input_instances=None if input_instances is None else list(input_instances),
                    status="pending",
                    work_dir=str(work_dir or jobs_dir / job_id),
                    created_at=now,
                )
                s.add(job)
                for step_id, uses in step_ids:
                    s.add(StepRun(job_id=job_id, step_id=step_id, uses=uses, status="pending"))
                s.add(
                    AuditEvent(
                        ts=datetime.now(UTC),
                        kind="job.created",
                        subject=job_id,
                        message=f"workflow {workflow_name} on {scope} {series_uid or study_uid}",
                        data={"workflow_hash": workflow_hash},
                    )
                )
            return job
        except IntegrityError:
            return None  # created concurrently by another process

    def get_job(self, job_id: str) -> Job | None:
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                # accept a unique prefix, as users type them
                matches = list(s.scalars(select(Job).where(Job.id.like(f"{job_id}%")).limit(2)))
                job = matches[0] if len(matches) == 1 else None
            return job

    def job_by_dedupe_key(self, dedupe_key: str) -> Job | None:
        """The job created under ``dedupe_key`` (see :meth:`create_job`), if any."""
        with self.session() as s:
            return s.scalar(select(Job).where(Job.dedupe_key == dedupe_key))

    def list_jobs(self, status: Iterable[str] | None = None, limit: int = 200) -> list[Job]:
        with self.session() as s:
            q = select(Job)
            if status is not None:
                q = q.where(Job.status.in_(list(status)))
            return list(s.scalars(q.order_by(Job.created_at.desc()).limit(limit)))

    def unfinished_jobs(self) -> list[Job]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(Job)
                    .where(Job.status.in_(["pending", "running"]))
                    .order_by(Job.created_at)
                )
            )

    def supersede_pending_jobs(self, job_ids: Sequence[str], by_job: str, reason: str) -> list[str]:
        """End those of ``job_ids`` that have not started (status pending, no step begun) as
        failed with ``reason``, their steps skipped: a newer job ``by_job`` does their work on
        newer inputs. Returns the ids ended (a job already started runs to its end)."""
        now = time.time()
        with self.session() as s:
            ids = list(
                s.scalars(
                    select(Job.id).where(
                        Job.id.in_(list(job_ids)),
                        Job.id != by_job,
                        Job.status == "pending",
                        Job.started_at.is_(None),
                    )
                )
            )
            if not ids:
                return []
            s.execute(
                update(Job)
                .where(Job.id.in_(ids))
                .values(status="fail", error=reason, finished_at=now)
            )
            s.execute(
                update(StepRun)
                .where(StepRun.job_id.in_(ids), StepRun.status == "pending")
                .values(status="skipped", summary=reason, finished_at=now)
            )
            for job_id in ids:
                s.add(
                    AuditEvent(
                        ts=datetime.now(UTC),
                        kind="job.superseded",
                        subject=job_id,
                        message=reason,
                        data={"by": by_job},
                    )
                )
        return ids

    def resume_job(self, job_id: str, step_ids: Sequence[str], *, by: str, reason: str) -> bool:
        """Set a failed job back to pending, and ``step_ids`` (its failed steps and the steps
        skipped because of them) back to pending with no attempt made, so that the engine
        runs them again under their retry policy afresh; the other steps keep their state.

        Only while the job is still ``fail``: of two resumes at once, one happens. Returns
        whether this one did. The ``job.resumed`` audit event names ``by`` (who resumed it)
        and ``reason``, and keeps what the earlier attempts of each step and the job said.
        """
        with self.session() as s:
            # the conditional update comes first: it takes the write lock before anything
            # is read, and of two resumes at once the second finds the job no longer failed
            resumed = s.execute(
                update(Job).where(Job.id == job_id, Job.status == "fail").values(status="pending")
            ).rowcount
            if not resumed:
                return False
            job = s.get(Job, job_id)
            rows = {
                row.step_id: row
                for row in s.scalars(
                    select(StepRun).where(
                        StepRun.job_id == job_id,
                        StepRun.step_id.in_(list(step_ids)),
                        StepRun.status.in_(["fail", "skipped"]),
                    )
                )
            }
            earlier = {
                sid: {
                    "status": rows[sid].status,
                    "attempts": rows[sid].attempts,
                    "error": rows[sid].error,
                    "summary": rows[sid].summary,
                    "started_at": rows[sid].started_at,
                    "finished_at": rows[sid].finished_at,
                }
                for sid in step_ids
                if sid in rows
            }
            s.add(
                AuditEvent(
                    ts=datetime.now(UTC),
                    kind="job.resumed",
                    subject=job_id,
                    message=f"resumed by {by}: {reason}; step(s) run again: "
                    + ", ".join(f"{sid} ({earlier[sid]['status']})" for sid in earlier),
                    data={
                        "by": by,
                        "reason": reason,
                        "steps": list(earlier),
                        "earlier_steps": earlier,
                        "earlier_error": job.error,
                        "earlier_finished_at": job.finished_at,
                    },
                )
            )
            s.execute(update(Job).where(Job.id == job_id).values(error=None, finished_at=None))
            s.execute(
                update(StepRun)
                .where(StepRun.job_id == job_id, StepRun.step_id.in_(list(earlier)))
                .values(
                    status="pending",
                    attempts=0,
                    next_attempt_at=None,
                    outputs={},
                    summary="",
                    error=None,
                    started_at=None,
                    finished_at=None,
                )
            )
        return True

    def delivery_failed_jobs(
        self,
        ended_after: float = 0.0,
        *,
        ended_before: float | None = None,
        with_dead_letters: bool = False,
    ) -> list[str]:
        """Ids of the jobs, oldest first, that ended FAIL after ``ended_after`` (and before
        ``ended_before``) only for want of delivery: each failed step gave up delivering (it
        left dead letters, still dead or delivered since it ended, by the daemon's retry or a
        replay; none was left half sent). A step that failed on bad data, or after its items
        were delivered, left none, and would fail again. ``with_dead_letters``: only jobs
        with dead letters still (an item the same step delivered elsewhere is none).

        Left out: a job that a newer job of its workflow replaced on its series or study
        (made when it grew, or by ``rtauto rerun``: its results were made on what is no
        longer the whole data), and jobs of ``rtauto run`` and ``rtauto batch`` (no daemon
        runs them)."""
        gave_up = exists().where(
            Delivery.job_id == StepRun.job_id,
            Delivery.step_id == StepRun.step_id,
            (Delivery.status == "dead")
            | ((Delivery.status == "delivered") & (Delivery.delivered_at > StepRun.finished_at)),
        )
        half_sent = exists().where(
            Delivery.job_id == StepRun.job_id,
            Delivery.step_id == StepRun.step_id,
            Delivery.status.in_(["pending", "sending"]),
        )
        failed_otherwise = select(StepRun.job_id).where(
            StepRun.status == "fail", ~gave_up | half_sent
        )
        newer = aliased(Job)
        query = select(Job.id).where(
            Job.status == "fail",
            Job.finished_at >= ended_after,
            Job.id.in_(select(StepRun.job_id).where(StepRun.status == "fail")),
            Job.id.not_in(failed_otherwise),
            Job.dedupe_key.not_like("run:%"),
            Job.dedupe_key.not_like("batch:%"),
            ~select(newer.id).where(_replaces(newer, Job)).exists(),
        )
        if ended_before is not None:
            query = query.where(Job.finished_at < ended_before)
        if with_dead_letters:
            dead = select(Delivery.job_id).where(
                Delivery.status == "dead", ~delivered_elsewhere(Delivery)
            )
            query = query.where(Job.id.in_(dead))
        with self.session() as s:
            return list(s.scalars(query.order_by(Job.finished_at)))

    def replacing_job(self, job_id: str) -> Job | None:
        """The newest job that took over the work of job ``job_id``: of its workflow, on its
        series (or study, for a study workflow), made after it when the series grew or by
        ``rtauto rerun``; None when no job did."""
        newer = aliased(Job)
        with self.session() as s:
            return s.scalar(
                select(newer)
                .join(Job, _replaces(newer, Job))
                .where(Job.id == job_id)
                .order_by(newer.created_at.desc())
                .limit(1)
            )

    def held_instances(self, sop_uids: Iterable[str]) -> set[str]:
        """Those of ``sop_uids`` that the store still indexes (retention removes the rest)."""
        wanted = list(dict.fromkeys(sop_uids))
        held: set[str] = set()
        with self.session() as s:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                held.update(s.scalars(select(Instance.sop_uid).where(Instance.sop_uid.in_(chunk))))
        return held

    def job_ids_of_series(self, workflow_name: str, series_uid: str) -> list[str]:
        """The ids of one workflow's jobs on one series, oldest first (ids only: no JSON
        columns are read)."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Job.id)
                    .where(Job.workflow_name == workflow_name, Job.series_uid == series_uid)
                    .order_by(Job.created_at)
                )
            )

    def job_ids_of_study(self, workflow_name: str, study_uid: str) -> list[str]:
        """The ids of one workflow's study-scoped jobs on one study, oldest first."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Job.id)
                    .where(
                        Job.workflow_name == workflow_name,
                        Job.study_uid == study_uid,
                        Job.scope == "study",
                    )
                    .order_by(Job.created_at)
                )
            )

    def job_statuses(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The status of each of these jobs (a light query: no JSON columns)."""
        with self.session() as s:
            rows = s.execute(select(Job.id, Job.status).where(Job.id.in_(list(job_ids))))
            return {job_id: status for job_id, status in rows}

    def set_job_status(self, job_id: str, status: str, error: str | None = None) -> None:
        now = time.time()
        values: dict[str, Any] = {"status": status}
        if status == "running":
            values["started_at"] = now
        if status in ("ok", "fail"):
            values["finished_at"] = now
            values["error"] = error
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(**values))
            s.add(
                AuditEvent(
                    ts=datetime.now(UTC), kind=f"job.{status}", subject=job_id, message=error or ""
                )
            )

    def steps_of(self, job_id: str) -> list[StepRun]:
        with self.session() as s:
            return list(s.scalars(select(StepRun).where(StepRun.job_id == job_id)))

    def update_step(
        self, job_id: str, step_id: str, *, only_if: str | None = None, **values: Any
    ) -> bool:
        """Set the step's columns; with ``only_if``, only while its status is that one.
        Returns whether the step was updated."""
        with self.session() as s:
            q = update(StepRun).where(StepRun.job_id == job_id, StepRun.step_id == step_id)
            if only_if is not None:
                q = q.where(StepRun.status == only_if)
            return bool(s.execute(q.values(**values)).rowcount)

    def finish_step(
        self,
        job_id: str,
        step_id: str,
        *,
        status: str,
        outputs: dict[str, Any] | None = None,
        summary: str = "",
        error: str | None = None,
        artifacts: Sequence[dict[str, Any]] = (),
        plugin: str = "",
        plugin_version: str = "",
    ) -> None:
        """Record a step's end and its artifacts in one transaction."""
        now = time.time()
        with self.session() as s:
            # a re-run after a crash replaces what an unfinished attempt may have recorded
            s.execute(
                ArtifactRow.__table__.delete().where(
                    ArtifactRow.job_id == job_id, ArtifactRow.step_id == step_id
                )
            )
            for a in artifacts:
                s.add(
                    ArtifactRow(
                        job_id=job_id,
                        step_id=step_id,
                        path=str(a["path"]),
                        kind=a["kind"],
                        modality=a.get("modality"),
                        sop_instance_uid=a.get("sop_instance_uid"),
                        sha256=a.get("sha256", ""),
                        description=a.get("description", ""),
                        provenance=a.get("provenance") or {},
                        created_at=now,
                    )
                )
            s.execute(
                update(StepRun)
                .where(StepRun.job_id == job_id, StepRun.step_id == step_id)
                .values(
                    status=status,
                    outputs=json.loads(json.dumps(outputs or {}, default=str)),
                    summary=summary,
                    error=error,
                    plugin=plugin,
                    plugin_version=plugin_version,
                    finished_at=now,
                    next_attempt_at=None,
                )
            )

    def artifacts_of(self, job_id: str, step_id: str | None = None) -> list[ArtifactRow]:
        with self.session() as s:
            q = select(ArtifactRow).where(ArtifactRow.job_id == job_id)
            if step_id is not None:
                q = q.where(ArtifactRow.step_id == step_id)
            return list(s.scalars(q.order_by(ArtifactRow.id)))

    # -- deliveries ----------------------------------------------------------------------------
    def delivery(
        self, job_id: str, step_id: str, item_key: str, path: str, destination: str
    ) -> Delivery:
        """The delivery record for this item and destination, created pending if new."""
        now = time.time()
        with self.session() as s:
            row = s.scalar(
                select(Delivery).where(
                    Delivery.job_id == job_id,
                    Delivery.step_id == step_id,
                    Delivery.item_key == item_key,
                    Delivery.destination == destination,
                )
            )
            if row is None:
                row = Delivery(
                    job_id=job_id,
                    step_id=step_id,
                    item_key=item_key,
                    path=path,
                    destination=destination,
                    status="pending",
                    attempts=0,
                    updated_at=now,
                )
                s.add(row)
                s.flush()
            return row

    def update_delivery(self, delivery_id: int, **values: Any) -> None:
        values.setdefault("updated_at", time.time())
        with self.session() as s:
            s.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))

    def deliveries_of(self, job_id: str) -> list[Delivery]:
        with self.session() as s:
            return list(
                s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id))
            )

    def dead_letters_of(self, job_id: str) -> list[Delivery]:
        """The job's dead letters still waiting: its dead records, less those whose item
        the same step delivered to another destination (an alternate, or ``rtauto replay
        --to``)."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Delivery)
                    .where(
                        Delivery.job_id == job_id,
                        Delivery.status == "dead",
                        ~delivered_elsewhere(Delivery),
                    )
                    .order_by(Delivery.id)
                )
            )

    def dead_letters(self) -> list[Delivery]:
        with self.session() as s:
            return list(s.scalars(select(Delivery).where(Delivery.status == "dead")))

    # -- audit ---------------------------------------------------------------------------------
    def audit(self, kind: str, subject: str = "", message: str = "", **data: Any) -> None:
        with self.session() as s:
            s.add(
                AuditEvent(
                    ts=datetime.now(UTC),
                    kind=kind,
                    subject=subject,
                    message=message,
                    data=json.loads(json.dumps(data, default=str)),
                )
            )

    def audit_events(
        self, kind_prefix: str = "", limit: int = 500, subject: str | None = None
    ) -> list[AuditEvent]:
        """The newest audit events first; of one kind (prefix) and ``subject`` when given."""
        with self.session() as s:
            q = select(AuditEvent)
            if kind_prefix:
                q = q.where(AuditEvent.kind.like(f"{kind_prefix}%"))
            if subject is not None:
                q = q.where(AuditEvent.subject == subject)
            return list(s.scalars(q.order_by(AuditEvent.id.desc()).limit(limit)))
