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
* the report, ``batch.json`` and ``batch.csv`` in the run folder, holds a row per case:
  patient, study, status, the step that failed and why, seconds, every step's outcome and
  outputs, the files written; numbers a step puts in its ``metrics`` output (the Dice, surface
  distances of ``autocontour.compare``) get a CSV column each.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtauto.config import Settings
from rtauto.errors import IngestError
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
    job_id: str = ""
    resumed: str = ""  # "": new job; "done": finished before; "unfinished": goes on


@dataclass
class BatchReport:
    """What ``run_batch`` did: the cases with their summaries, and the refused files."""

    workflow: str
    workflow_hash: str
    overrides: list[str]
    rows: list[dict[str, Any]]
    refused: list[dict[str, str]]
    seconds: float

    @property
    def failed(self) -> int:
        return sum(1 for row in self.rows if row["status"] != "ok")

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "workflow_hash": self.workflow_hash,
            "overrides": self.overrides,
            "cases": len(self.rows),
            "ok": len(self.rows) - self.failed,
            "failed": self.failed,
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
    folder (:func:`run_folder`).

    ``on_ingest(done, total)`` follows the reading of the files, ``on_progress(finished, ok,
    total)`` the cases.
    """
    from rtauto.engine.engine import Engine
    from rtauto.ingest.assembler import create_job_for
    from rtauto.ingest.spool import Spool, SpoolFull
    from rtauto.store import Store
    from rtauto.store.summary import job_summary

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
            if record.series_instance_uid not in case.series:
                case.series.append(record.series_instance_uid)
        if len(pending) >= 500 or done == len(files):
            store.record_instances(pending)
            pending = []
        if on_ingest is not None:
            on_ingest(done, len(files))

    run = run_folder(out, loaded)
    taken: set[str] = set()
    ordered = sorted(cases.values(), key=lambda c: (c.patient_id, c.study_uid))
    for case in ordered:
        case.name = _case_name(case.patient_id, case.study_uid, taken)
        # the workflow version and the study name the job (hashed: the key column holds 128);
        # a retry of a failed job is the same key with ":retry:N"
        base = "batch:" + hashlib.sha256(f"{loaded.hash}|{case.study_uid}".encode()).hexdigest()
        key, work_dir, attempt = base, run / case.name, 0
        previous = store.job_by_dedupe_key(key)
        while previous is not None:
            retried = store.job_by_dedupe_key(f"{base}:retry:{attempt + 1}")
            if retried is None:
                break
            attempt += 1
            previous = retried
        if previous is not None and previous.status == "fail" and retry_failed:
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
        )
        assert job is not None  # the key was free a moment ago and only this batch uses it
        case.job_id = job.id

    job_ids = [case.job_id for case in ordered]
    warm = sorted({s.uses for s in loaded.workflow.steps})
    engine = Engine(settings, store, host, warm=warm)
    try:
        engine.recover()  # steps an interrupted batch left running run again
        while True:
            engine.tick()
            statuses = [j.status if (j := store.get_job(i)) else "fail" for i in job_ids]
            finished = sum(1 for s in statuses if s in ("ok", "fail"))
            if on_progress is not None:
                on_progress(finished, statuses.count("ok"), len(job_ids))
            if finished == len(job_ids) and not engine.busy():
                break
            engine.wait_for_change(0.2 if not engine.busy() else 1.0)
    finally:
        engine.close()

    rows = [_row(case, job_summary(store, case.job_id)) for case in ordered]
    store.close()
    report = BatchReport(
        workflow=loaded.name,
        workflow_hash=loaded.hash,
        overrides=list(overrides),
        rows=rows,
        refused=refused,
        seconds=time.monotonic() - started,
    )
    _write_report(report, run)
    return report


def run_folder(out: Path, loaded: LoadedWorkflow) -> Path:
    """The folder of one workflow version's cases and report under a batch's ``out``."""
    return out / "runs" / loaded.hash[:12]


def _row(case: Case, summary: dict[str, Any]) -> dict[str, Any]:
    failed = next((s for s in summary["steps"] if s["outcome"] == "fail"), None)
    seconds = (
        summary["finished_at"] - summary["started_at"]
        if summary.get("finished_at") and summary.get("started_at")
        else None
    )
    return {
        "case": case.name,
        "patient_id": case.patient_id,
        "study_instance_uid": case.study_uid,
        "series": len(case.series),
        "files": case.files,
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
    ]
    with (out / "batch.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row, found in zip(report.rows, metrics, strict=True):
            values = {k: row[k] for k in columns if k in row}
            values.update((f"step:{s}", row["steps"].get(s, "")) for s in step_ids)
            writer.writerow({**values, **found})
