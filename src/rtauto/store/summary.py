"""A job as the command line, the dashboard's API and batch reports show it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["job_summary", "name_inputs"]


def job_summary(store: Any, job_id: str) -> dict[str, Any]:
    """The summary ``rtauto run --json`` and ``rtauto jobs --json`` print for a job."""
    job = store.get_job(job_id)
    steps = {s.step_id: s for s in store.steps_of(job.id)}
    order = [s.step_id for s in steps.values()]
    try:
        import yaml

        order = [s["id"] for s in yaml.safe_load(job.workflow_text)["steps"]]
    except Exception:
        pass
    return {
        "job": job.id,
        "status": job.status,
        "workflow": job.workflow_name,
        "workflow_hash": job.workflow_hash,
        "study_instance_uid": job.study_uid,
        "series_instance_uid": job.series_uid,
        "work_dir": job.work_dir,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": job.error,
        "steps": [
            {
                "id": sid,
                "uses": steps[sid].uses,
                "outcome": steps[sid].status,
                "attempts": steps[sid].attempts,
                "outputs": steps[sid].outputs or {},
                "summary": steps[sid].summary,
                "error": steps[sid].error,
                "plugin": steps[sid].plugin,
                "plugin_version": steps[sid].plugin_version,
                "artifacts": [a.path for a in store.artifacts_of(job.id, sid)],
            }
            for sid in order
            if sid in steps
        ],
        "deliveries": [
            {
                "step": d.step_id,
                "destination": d.destination,
                "item": d.item_key,
                "status": d.status,
                "attempts": d.attempts,
                "error": d.last_error,
            }
            for d in store.deliveries_of(job.id)
        ],
        # each time the failed job was resumed (rtauto resume, the daemon's retry of dead
        # letters), oldest first, with the error it had ended with; each step's earlier
        # attempts are in the job.resumed audit events
        "resumes": [
            {
                "at": event.ts.isoformat() + "Z",
                "by": event.data.get("by"),
                "reason": event.data.get("reason"),
                "steps": event.data.get("steps", []),
                "earlier_error": event.data.get("earlier_error"),
            }
            for event in reversed(store.audit_events("job.resumed", subject=job.id))
        ],
    }


def name_inputs(summary: dict[str, Any], spool_dir: Path, originals: Mapping[str, str]) -> None:
    """Name the input files in a summary's error texts, in place.

    ``rtauto run`` and ``rtauto batch`` read their inputs through a spool, so a step's error
    names the spool's copy (``.../spool/STUDY/SERIES/SOP.dcm``); ``originals`` maps those
    relative paths (``STUDY/SERIES/SOP.dcm``) to the files the user gave."""
    if not originals:
        return
    pattern = re.compile(re.escape(str(spool_dir).rstrip("/")) + r"/([0-9.]+/[0-9.]+/[0-9.]+\.dcm)")

    def named(text: str | None) -> str | None:
        if not text:
            return text
        return pattern.sub(lambda m: originals.get(m.group(1), m.group(0)), text)

    summary["error"] = named(summary.get("error"))
    for step in summary.get("steps", []):
        step["error"] = named(step.get("error"))
        step["summary"] = named(step.get("summary"))
