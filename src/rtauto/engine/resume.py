"""Resuming a failed job: its failed steps, and the steps skipped because of them, run again
inside the same job, through the same engine.

The steps that ended ok never run again (their outputs and artifacts stay as they are), and
routing delivers nothing twice: a routing step run again skips each item it delivered before
(:class:`rtauto.route.deliveries.DeliveryLedger`). ``rtauto resume JOB`` and the daemon's
background retry of dead letters (:mod:`rtauto.route.dead_letters`) both come here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from rtauto.errors import ResumeRefused, WorkflowError
from rtauto.hooks import RegisteredStep
from rtauto.store import Store
from rtauto.store.models import Job
from rtauto.workflow import LoadedWorkflow, load_workflow_text

__all__ = ["check_resumable", "resume_job", "steps_to_resume"]


def steps_to_resume(loaded: LoadedWorkflow, statuses: Mapping[str, str]) -> list[str]:
    """The steps a resume runs again, in the workflow's order: those that failed, and those
    skipped because a step they need, directly or through others, is among them (an ``if:``
    reads only steps its step needs so).

    A step skipped for a reason that stays (a condition false on the outputs of steps that
    ended ok) stays skipped; a step that ran after a failure (``failure()``, ``always()``) is
    not run again.
    """
    needs = {spec.id: set(spec.needs) for spec in loaded.workflow.steps}
    again = {step_id for step_id, status in statuses.items() if status == "fail"}
    for step_id in loaded.order:  # each step comes after the steps it needs
        if statuses.get(step_id) == "skipped" and needs[step_id] & again:
            again.add(step_id)
    return [step_id for step_id in loaded.order if step_id in again]


def check_resumable(store: Store, job: Job, steps: Mapping[str, RegisteredStep]) -> list[str]:
    """The steps a resume of ``job`` would run again (:func:`steps_to_resume`), with
    ``steps`` the registered step types its workflow version is loaded with.

    Raises :class:`ResumeRefused` naming why, and what to do instead, when the job is pending,
    running, ended OK, was superseded (it never ran: a newer job did its work), has no failed
    step, a newer job of its workflow replaced it (its series or study grew, or ``rtauto
    rerun``), its inputs are no longer held (retention removed them), its working folder is
    gone with results that the steps run again would read, or its workflow version no longer
    loads.
    """
    name = job.id[:8]
    if job.status in ("pending", "running"):
        raise ResumeRefused(f"job {name} is still {job.status}: only a failed job is resumed")
    if job.status != "fail":
        raise ResumeRefused(f"job {name} ended {job.status.upper()}: nothing to resume")
    rows = store.steps_of(job.id)
    statuses = {row.step_id: row.status for row in rows}
    if "fail" not in statuses.values():
        if job.started_at is None:
            raise ResumeRefused(f"job {name} never ran ({job.error}): nothing to resume")
        raise ResumeRefused(f"job {name} has no failed step to run again ({job.error})")
    newer = store.replacing_job(job.id)
    if newer is not None:
        subject = "series" if job.scope == "series" else "study"
        made = (
            "by rtauto rerun"
            if newer.dedupe_key.startswith("rerun:")
            else f"when the {subject} grew"
        )
        raise ResumeRefused(
            f"job {newer.id[:8]} of workflow {job.workflow_name}, made {made}, replaced job "
            f"{name} on its {subject}: job {name} is not resumed, and its results are not "
            f"delivered beside the newer job's; `rtauto resume {newer.id[:8]}` or `rtauto "
            f"replay {newer.id[:8]}` acts on the newer job"
        )
    _check_inputs_held(store, job)
    _check_work_dir(store, job, {row.step_id for row in rows if row.status == "ok"})
    try:
        loaded = load_workflow_text(
            job.workflow_text, job.workflow_path or job.workflow_name, steps
        )
    except WorkflowError as exc:
        raise ResumeRefused(
            f"the workflow version of job {name} no longer loads, so its steps cannot run "
            f"again: {exc}"
        ) from None
    return steps_to_resume(loaded, statuses)


def _check_inputs_held(store: Store, job: Job) -> None:
    """Refuse a job whose inputs retention removed: its steps would run on part of the data,
    or on none, and could end OK on it."""
    name = job.id[:8]
    again = (
        f"send the series again, then `rtauto rerun {name}` runs its workflow on what the "
        "series hold"
    )
    if job.input_instances is not None:
        missing = len(set(job.input_instances) - store.held_instances(job.input_instances))
        if missing:
            raise ResumeRefused(
                f"{missing} of the {len(set(job.input_instances))} input instance(s) of job "
                f"{name} are no longer held (removed by retention): {again}"
            )
        return
    for uid in job.input_series:
        series = store.get_series(uid)
        if series is None or series.instance_count == 0:
            raise ResumeRefused(
                f"input series {uid} of job {name} holds no instance any more (removed by "
                f"retention): {again}"
            )


def _check_work_dir(store: Store, job: Job, ended_ok: set[str]) -> None:
    """Refuse a job whose working folder is gone (retention's ``jobs_days``) while steps
    that ended OK, and do not run again, have results in it."""
    if not job.work_dir or Path(job.work_dir).is_dir():
        return
    with_results = sorted({a.step_id for a in store.artifacts_of(job.id) if a.step_id in ended_ok})
    if with_results:
        raise ResumeRefused(
            f"the working folder of job {job.id[:8]} ({job.work_dir}) was removed, with the "
            f"results of step(s) {', '.join(with_results)} that the steps run again would "
            f"read: `rtauto rerun {job.id[:8]}` runs its workflow again on what its series "
            "hold now"
        )


def resume_job(
    store: Store, job_id: str, steps: Mapping[str, RegisteredStep], *, by: str, reason: str
) -> list[str]:
    """Resume the failed job ``job_id`` (a unique prefix will do) for the engine to run:
    the job goes back to pending, and its failed steps and the steps skipped because of them
    (:func:`steps_to_resume`) to pending with no attempt made, under their retry policy
    afresh. ``steps`` are the registered step types the job's workflow version is loaded
    with; ``by`` and ``reason`` go into the ``job.resumed`` audit event, which also keeps
    what the earlier attempts said. Returns the ids of the steps that run again.

    Raises :class:`ResumeRefused` naming why when the job is unknown, when
    :func:`check_resumable` refuses it, or when it was resumed by someone else meanwhile.
    """
    job = store.get_job(job_id)
    if job is None:
        raise ResumeRefused(f"no job {job_id}")
    again = check_resumable(store, job, steps)
    if not store.resume_job(job.id, again, by=by, reason=reason):
        now = store.job_statuses([job.id]).get(job.id, "removed")
        raise ResumeRefused(f"job {job.id[:8]} was resumed meanwhile (it is {now} now)")
    return again
