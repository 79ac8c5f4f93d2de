"""Cohort runs: one workflow over many studies, resumable, with progress and a report.

``rtauto batch WORKFLOW COHORT... --out DIR`` is what a researcher re-running a cohort with a
new model version uses:

* every file under the COHORT folders (hidden ones left out) is read into the batch's own
  spool (``DIR/.rtauto``), exactly as ``rtauto run`` reads its inputs; files that are not
  valid DICOM are quarantined and listed in the report;
* each study (StudyInstanceUID) is one **case**: one job of the workflow with all the study's
  series as input, run by the daemon's engine with ``--jobs`` worker processes;
* each workflow version (its content hash) gets a run folder, ``DIR/runs/<hash[:12]>/``, with
  a folder of outputs per case, so the results of two model versions never mix;
* ``--set STEP.PARAM=VALUE`` changes a step's params for this batch (``--set
  segment.model=demo-thorax@2``); the value is YAML; the changed workflow is validated like a
  file and its content hash is what the jobs record;
* running the same command again resumes: a case whose job with this exact workflow version
  (overrides included) finished is not run again, a job an interrupted batch left unfinished
  goes on from its last finished step, a failed case stays failed unless ``--retry-failed``;
  a case whose files changed (a slice removed or added) runs again, in ``NAME.rerun-N``, and
  every job reads exactly the instances of the cohort's files of this run;
* the report, ``batch.json`` and ``batch.csv`` in the run folder, holds a row per case:
  patient, study, status, the step that failed and why, seconds, every step's outcome and
  outputs, the files written; numbers a step puts in its ``metrics`` output (the Dice, surface
  distances of ``autocontour.compare``) get a CSV column each.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtauto.config import Settings
from rtauto.errors import IngestError, RtautoError
from rtauto.locks import exclusive_lock
from rtauto.workflow import LoadedWorkflow

__all__ = ["BatchReport", "Case", "run_batch", "run_folder"]

_SAFE = str.maketrans({c: "_" for c in '/\\:*?"<>| '})


@dataclass
class Case:
    """One study of the cohort and the job that runs the workflow on it."""

    name: str
    patient_id: str
    study_uid: str
    series: list[str] = field(default_factory=list)
    files: int = 0
    instances: dict[str, None] = field(default_factory=dict)  # SOP Instance UIDs read, once
    originals: dict[str, str] = field(default_factory=dict)  # spool path -> cohort file
    job_id: str = ""
    resumed: str = ""  # "": new job; "done": finished before; "unfinished": goes on
    unmatched: str = ""  # why the workflow's trigger does not take this study (then no job)


@dataclass
class BatchReport:
    """What ``run_batch`` did: the cases with their summaries, and the refused files."""

    workflow: str
    workflow_hash: str
    overrides: list[str]
    rows: list[dict[str, Any]]
    refused: list[dict[str, str]]
    seconds: float
    resources: dict[str, Any] = field(default_factory=dict)  # by step id: models resolved
    folder: Path | None = None  # the run folder (cases, batch.csv, batch.json)

    @property
    def failed(self) -> int:
        return sum(1 for row in self.rows if row["status"] not in ("ok", "skipped"))

    @property
    def skipped(self) -> int:
        """Studies the workflow's trigger does not take (an MR-only study for a CT workflow)."""
        return sum(1 for row in self.rows if row["status"] == "skipped")

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "workflow_hash": self.workflow_hash,
            "overrides": self.overrides,
            "resources": self.resources,
            "cases": len(self.rows),
            "ok": len(self.rows) - self.failed - self.skipped,
            "failed": self.failed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 2),
            "rows": self.rows,
            "refused_files": self.refused,
        }


def _case_name(patient_id: str, study_uid: str, taken: set[str]) -> str:
    base = f"{patient_id or 'unknown'}_{study_uid.rsplit('.', 1)[-1][-8:]}".translate(_SAFE)
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


@contextmanager
def _exclusive(home: Path) -> Iterator[None]:
    """Hold ``HOME/batch.lock``: one batch at a time in an output folder (two would run every
    case twice into the same folders)."""
    home.mkdir(parents=True, exist_ok=True)
    lock = home / "batch.lock"
    fd = exclusive_lock(lock, writable=True)  # it holds the batch's pid
    if fd is None:
        try:
            holder = lock.read_text(errors="replace").strip() or "?"
        except OSError:
            holder = "?"
        raise RtautoError(
            f"another rtauto batch (pid {holder}) is running with this output folder"
            f" ({home.parent}); wait for it, or give another --out"
        )
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def run_batch(
    settings: Settings,
    host: Any,
    loaded: LoadedWorkflow,
    files: Sequence[Path],
    out: Path,
    *,
    overrides: Sequence[str] = (),
    retry_failed: bool = False,
    on_ingest: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> BatchReport:
    """Run ``loaded`` on every study among ``files``; the report is also written to the run
    folder (:func:`run_folder`). Raises :class:`~rtauto.errors.RtautoError` while another
    batch uses the same output folder.

    ``on_ingest(done, total)`` follows the reading of the files, ``on_progress(finished, ok,
    total)`` the cases.
    """
    resources = step_resources(loaded, host, settings)  # before any case: a bad model stops here
    with _exclusive(Path(settings.home)):
        return _run_batch(
            resources,
            settings,
            host,
            loaded,
            files,
            out,
            overrides=overrides,
            retry_failed=retry_failed,
            on_ingest=on_ingest,
            on_progress=on_progress,
        )


def step_resources(loaded: LoadedWorkflow, host: Any, settings: Settings) -> dict[str, Any]:
    """What each step of ``loaded`` will use beyond its params (``StepType.resources``: the
    model ``NAME@latest`` stands for today, with its hashes), by step id. Raises
    :class:`~rtauto.errors.RtautoError` naming the step when one cannot be resolved."""
    from rtauto.errors import StepFailed

    found: dict[str, Any] = {}
    for spec in loaded.workflow.steps:
        registered = host.steps.get(spec.uses)
        resolve = registered.step_type.resources if registered is not None else None
        if resolve is None or spec.id not in loaded.params:
            continue
        try:
            found[spec.id] = dict(resolve(loaded.params[spec.id], settings))
        except StepFailed as exc:
            raise RtautoError(f"step {spec.id!r} ({spec.uses}): {exc}") from None
    return found


def run_identity(loaded: LoadedWorkflow, resources: Mapping[str, Any]) -> str:
    """The identity of a batch run: the workflow version, and the resources its steps resolve
    (so a new model version behind ``NAME@latest`` is a new run, not "done before")."""
    if not resources:
        return loaded.hash
    text = loaded.hash + json.dumps(resources, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _run_batch(
    resources: dict[str, Any],
    settings: Settings,
    host: Any,
    loaded: LoadedWorkflow,
    files: Sequence[Path],
    out: Path,
    *,
    overrides: Sequence[str],
    retry_failed: bool,
    on_ingest: Callable[[int, int], None] | None,
    on_progress: Callable[[int, int, int], None] | None,
) -> BatchReport:
    from rtauto.engine.engine import Engine
    from rtauto.ingest.assembler import create_job_for
    from rtauto.ingest.spool import Spool, SpoolFull
    from rtauto.store import Store

    started = time.monotonic()
    settings.ensure_dirs()
    store = Store(settings.database_url, migrate=True)
    spool = Spool(settings)
    cases: dict[str, Case] = {}
    refused: list[dict[str, str]] = []
    pending: list[Any] = []  # index rows, committed together
    for done, path in enumerate(files, start=1):
        try:
            record = spool.ingest_file(path, source="batch")
        except SpoolFull:
            store.record_instances(pending)  # what was read stays indexed; a re-run goes on
            raise
        except IngestError as exc:
            refused.append({"file": str(path), "reason": exc.reason})
        else:
            pending.append(record)
            case = cases.get(record.study_instance_uid)
            if case is None:
                case = cases[record.study_instance_uid] = Case(
                    name="", patient_id=record.patient_id, study_uid=record.study_instance_uid
                )
            case.files += 1
            case.instances[record.sop_instance_uid] = None
            case.originals.setdefault(record.path, str(path))
            if record.series_instance_uid not in case.series:
                case.series.append(record.series_instance_uid)
        if len(pending) >= 500 or done == len(files):
            store.record_instances(pending)
            pending = []
        if on_ingest is not None:
            on_ingest(done, len(files))

    identity = run_identity(loaded, resources)
    run = run_folder(out, identity)
    ordered = sorted(cases.values(), key=lambda c: (c.patient_id, c.study_uid))

    def base_key(case: Case) -> str:
        # the run (workflow version and resolved models) and the study name the job (hashed:
        # the key column holds 128); a retry of a failed job is the same key with ":retry:N"
        return "batch:" + hashlib.sha256(f"{identity}|{case.study_uid}".encode()).hexdigest()

    # a study keeps the case name (and folder) it had in an earlier run of this batch; only
    # studies new to it are named, around those names
    taken: set[str] = set()
    for case in ordered:
        first = store.job_by_dedupe_key(base_key(case))
        if first is not None and first.work_dir:
            case.name = Path(first.work_dir).name
            taken.add(case.name)
    for case in ordered:
        if not case.name:
            case.name = _case_name(case.patient_id, case.study_uid, taken)
    for case in ordered:
        case.unmatched = _unmatched(loaded, store, case)
        if case.unmatched:
            continue  # reported as skipped; not a failure of the workflow
        base = base_key(case)
        key, work_dir, attempt, superseded = base, run / case.name, 0, ""
        previous = store.job_by_dedupe_key(key)
        while previous is not None:
            retried = store.job_by_dedupe_key(f"{base}:retry:{attempt + 1}")
            if retried is None:
                break
            attempt += 1
            previous = retried
        if (
            previous is not None
            and previous.input_instances is not None
            and set(previous.input_instances) != set(case.instances)
        ):
            # the study's files changed since (a slice removed or added): run it again on
            # what the cohort holds now
            attempt += 1
            superseded = previous.id
            key, previous = f"{base}:retry:{attempt}", None
            work_dir = run / f"{case.name}.rerun-{attempt}"
        elif previous is not None and previous.status == "fail" and retry_failed:
            attempt += 1
            key, previous = f"{base}:retry:{attempt}", None
            work_dir = run / f"{case.name}.retry-{attempt}"
        if previous is not None:
            case.job_id = previous.id
            case.resumed = "done" if previous.status in ("ok", "fail") else "unfinished"
            continue
        job = create_job_for(
            store,
            settings,
            loaded,
            scope="study" if len(case.series) > 1 else "series",
            study_uid=case.study_uid,
            series_uid=case.series[0] if len(case.series) == 1 else None,
            input_series=case.series,
            key_series=case.series,
            dedupe_key=key,
            work_dir=work_dir,
            input_instances=list(case.instances),
        )
        assert job is not None  # the key was free a moment ago and only this batch uses it
        case.job_id = job.id
        if superseded:  # an unfinished job on the old files is not run on
            store.supersede_pending_jobs(
                [superseded], job.id, f"superseded by job {job.id[:8]}: the study's files changed"
            )

    job_ids = [case.job_id for case in ordered if case.job_id]
    warm = sorted({s.uses for s in loaded.workflow.steps})
    engine = Engine(settings, store, host, warm=warm)
    try:
        engine.recover()  # steps an interrupted batch left running run again
        while True:
            engine.tick()
            known = store.job_statuses(job_ids)  # light: every 0.2 s over every case
            statuses = [known.get(i, "fail") for i in job_ids]
            finished = sum(1 for s in statuses if s in ("ok", "fail"))
            if on_progress is not None:
                on_progress(finished, statuses.count("ok"), len(job_ids))
            if finished == len(job_ids) and not engine.busy():
                break
            engine.wait_for_change(0.2 if not engine.busy() else 1.0)
    finally:
        engine.close()

    rows = [
        _row(case, _named_summary(store, settings, case)) if case.job_id else _skipped_row(case)
        for case in ordered
    ]
    store.close()
    report = BatchReport(
        workflow=loaded.name,
        workflow_hash=loaded.hash,
        overrides=list(overrides),
        rows=rows,
        refused=refused,
        seconds=time.monotonic() - started,
        resources=resources,
        folder=run,
    )
    _write_report(report, run)
    return report


def run_folder(out: Path, identity: str) -> Path:
    """The folder of one run's cases and report under a batch's ``out`` (``identity``: see
    :func:`run_identity`)."""
    return out / "runs" / identity[:12]


def _unmatched(loaded: LoadedWorkflow, store: Any, case: Case) -> str:
    """Why the workflow's trigger would not take the study (its series' modality, ``where``
    and ``requires``; the source and AE titles do not apply to files), or ""."""
    from rtauto.workflow.triggers import SeriesFacts, matches_series

    trigger = loaded.workflow.trigger.model_copy(
        update={"source": "any", "calling_ae": None, "called_ae": None}
    )
    facts = []
    for uid in case.series:
        row = store.get_series(uid)
        if row is not None:
            facts.append(SeriesFacts(uid, case.study_uid, row.modality or "", row.attributes or {}))
    if not any(matches_series(trigger, f) for f in facts):
        held = ", ".join(sorted({f.modality or "?" for f in facts})) or "nothing"
        return f"no series matches the workflow's trigger (the study holds {held})"
    missing = [
        selector.describe()
        for selector in trigger.requires
        if not any(selector.matches(f.modality, f.attributes) for f in facts)
    ]
    if missing:
        return "the workflow's trigger requires series the study lacks: " + "; ".join(missing)
    return ""


def _case_columns(case: Case) -> dict[str, Any]:
    return {
        "case": case.name,
        "patient_id": case.patient_id,
        "study_instance_uid": case.study_uid,
        "series": len(case.series),
        "files": case.files,
    }


def _named_summary(store: Any, settings: Settings, case: Case) -> dict[str, Any]:
    """The case's job summary, its errors naming the cohort's files (not the spool's)."""
    from rtauto.store.summary import job_summary, name_inputs

    summary = job_summary(store, case.job_id)
    name_inputs(summary, settings.spool_dir, case.originals)
    return summary


def _skipped_row(case: Case) -> dict[str, Any]:
    return {
        **_case_columns(case),
        "job": "",
        "status": "skipped",
        "resumed": "",
        "failed_step": "",
        "error": case.unmatched,
        "seconds": None,
        "steps": {},
        "outputs": "",
        "step_outputs": {},
        "artifacts": [],
    }


def _row(case: Case, summary: dict[str, Any]) -> dict[str, Any]:
    failed = next((s for s in summary["steps"] if s["outcome"] == "fail"), None)
    seconds = (
        summary["finished_at"] - summary["started_at"]
        if summary.get("finished_at") and summary.get("started_at")
        else None
    )
    return {
        **_case_columns(case),
        "job": summary["job"],
        "status": summary["status"],
        "resumed": case.resumed,
        "failed_step": failed["id"] if failed else "",
        "error": (failed["error"] or failed["summary"] if failed else "")
        or summary.get("error")
        or "",
        "seconds": round(seconds, 2) if seconds is not None else None,
        "steps": {s["id"]: s["outcome"] for s in summary["steps"]},
        "outputs": summary["work_dir"],
        "step_outputs": {s["id"]: s["outputs"] for s in summary["steps"]},
        "artifacts": [path for s in summary["steps"] for path in s["artifacts"]],
    }


def _write_report(report: BatchReport, out: Path) -> None:
    """``batch.json`` and ``batch.csv``: a row per case; a step's ``metrics`` output (a flat
    mapping of names to numbers, e.g. ``autocontour.compare``'s Dice) gets a column each."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps(report.to_json(), indent=2, default=str))
    step_ids = sorted({step for row in report.rows for step in row["steps"]})
    metrics = [
        {
            f"{step}:{name}": value
            for step, outputs in row["step_outputs"].items()
            for name, value in ((outputs or {}).get("metrics") or {}).items()
        }
        for row in report.rows
    ]
    metric_columns = sorted({column for found in metrics for column in found})
    # what ran, on every row, so that rows of two runs (two model versions) can be pooled
    run_columns = {"workflow_hash": report.workflow_hash}
    for step, resolved in sorted(report.resources.items()):
        run_columns.update({f"{step}:{key}": value for key, value in sorted(resolved.items())})
    columns = [
        "case",
        "patient_id",
        "study_instance_uid",
        "series",
        "files",
        "status",
        "failed_step",
        "error",
        "seconds",
        *(f"step:{s}" for s in step_ids),
        *metric_columns,
        "outputs",
        "job",
        *run_columns,
    ]
    with (out / "batch.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row, found in zip(report.rows, metrics, strict=True):
            values = {k: row[k] for k in columns if k in row}
            values.update((f"step:{s}", row["steps"].get(s, "")) for s in step_ids)
            writer.writerow({**values, **found, **run_columns})
