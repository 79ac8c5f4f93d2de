"""The job store's tables. Changes go through an alembic migration in ``migrations/versions``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Study(Base):
    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    # the first arrival since the study was last complete: a study workflow's max_wait
    # counts from it (a new plan in a study complete for months waits afresh for its CT)
    first_received: Mapped[float] = mapped_column(Float)
    last_received: Mapped[float] = mapped_column(Float, index=True)
    # set once the study quiet period has passed and study-scoped workflows were matched
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Series(Base):
    __tablename__ = "series"

    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    source: Mapped[str] = mapped_column(String(16), default="scp")  # scp | folder | run
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received: Mapped[float] = mapped_column(Float)
    last_received: Mapped[float] = mapped_column(Float, index=True)
    # set once the series quiet period has passed and series-scoped workflows were matched
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Instance(Base):
    __tablename__ = "instances"

    sop_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    transfer_syntax: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text)  # relative to the spool
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    received_at: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(16), default="scp")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("dedupe_key", name="uq_jobs_dedupe_key"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # one job per (workflow version, study|series): a restart or a resend never duplicates it
    dedupe_key: Mapped[str] = mapped_column(String(128))
    workflow_name: Mapped[str] = mapped_column(String(200), index=True)
    workflow_hash: Mapped[str] = mapped_column(String(64))
    workflow_text: Mapped[str] = mapped_column(Text)  # the exact version that runs, for resume
    workflow_path: Mapped[str] = mapped_column(Text, default="")
    scope: Mapped[str] = mapped_column(String(8))  # series | study
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    input_series: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # the SOP Instance UIDs of the input series the job reads (those of a series when the
    # daemon made the job, of the input files for rtauto run and batch); None: every instance
    # the store holds for them (study-scoped jobs, and jobs from before this column)
    input_instances: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True, default=None)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending running ok fail
    work_dir: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class StepRun(Base):
    __tablename__ = "steps"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    step_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    uses: Mapped[str] = mapped_column(String(200))
    # pending | running | retry_wait | ok | fail | skipped
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    summary: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    plugin: Mapped[str] = mapped_column(String(100), default="")
    plugin_version: Mapped[str] = mapped_column(String(64), default="")
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ArtifactRow(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    step_id: Mapped[str] = mapped_column(String(100))
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_artifacts_job_step", "job_id", "step_id"),)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "step_id", "item_key", "destination", name="uq_delivery"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    step_id: Mapped[str] = mapped_column(String(100))  # the routing step
    # what is delivered: an artifact's SOP Instance UID, or its path for non-DICOM files
    item_key: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(String(100))
    # pending | sending | delivered | failed | dead
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditEvent(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(255), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class WatchedFile(Base):
    """A file in a watch folder that rtauto has read (ingested or refused), with the size and
    modification time it had then: a daemon restart does not read it again unless it changed.
    """

    __tablename__ = "watched_files"

    path: Mapped[str] = mapped_column(Text, primary_key=True)  # absolute
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(16))  # ingested | refused
    read_at: Mapped[float] = mapped_column(Float)
