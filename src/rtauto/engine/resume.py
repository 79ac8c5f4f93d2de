"""Resuming a failed job: its failed steps, and the steps skipped because of them, run again
inside the same job, through the same engine.

The steps that ended ok never run again (their outputs and artifacts stay as they are), and
routing delivers nothing twice: a routing step run again skips each item it delivered before
(:class:`rtauto.route.deliveries.DeliveryLedger`). ``rtauto resume JOB`` and the daemon's
background retry of dead letters (:mod:`rtauto.route.dead_letters`) both come here.
"""

from __future__ import annotations

from collections.abc import Mapping

from rtauto.errors import ResumeRefused, WorkflowError
from rtauto.hooks import RegisteredStep
from rtauto.store import Store
from rtauto.workflow import LoadedWorkflow, load_workflow_text

__all__ = ["resume_job", "steps_to_resume"]


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


def resume_job(
    store: Store, job_id: str, steps: Mapping[str, RegisteredStep], *, by: str, reason: str
) -> list[str]:
    """Resume the failed job ``job_id`` (a unique prefix will do) for the engine to run:
    the job goes back to pending, and its failed steps and the steps skipped because of them
    (:func:`steps_to_resume`) to pending with no attempt made, under their retry policy
    afresh. ``steps`` are the registered step types the job's workflow version is loaded
    with; ``by`` and ``reason`` go into the ``job.resumed`` audit event, which also keeps
    what the earlier attempts said. Returns the ids of the steps that run again.

    Raises :class:`ResumeRefused` naming why when the job is unknown, pending, running, ended
    OK, was superseded (it never ran: a newer job did its work), has no failed step, its
    workflow version no longer loads, or it was resumed by someone else meanwhile.
    """
    job = store.get_job(job_id)
    if job is None:
        raise ResumeRefused(f"no job {job_id}")
    name = job.id[:8]
    if job.status in ("pending", "running"):
        raise ResumeRefused(f"job {name} is still {job.status}: only a failed job is resumed")
    if job.status != "fail":
        raise ResumeRefused(f"job {name} ended {job.status.upper()}: nothing to resume")
    statuses = {row.step_id: row.status for row in store.steps_of(job.id)}
    if "fail" not in statuses.values():
        if job.started_at is None:
            raise ResumeRefused(f"job {name} never ran ({job.error}): nothing to resume")
        raise ResumeRefused(f"job {name} has no failed step to run again ({job.error})")
    try:
        loaded = load_workflow_text(
            job.workflow_text, job.workflow_path or job.workflow_name, steps
        )
    except WorkflowError as exc:
        raise ResumeRefused(
            f"the workflow version of job {name} no longer loads, so its steps cannot run "
            f"again: {exc}"
        ) from None
    again = steps_to_resume(loaded, statuses)
    if not store.resume_job(job.id, again, by=by, reason=reason):
        now = store.job_statuses([job.id]).get(job.id, "removed")
        raise ResumeRefused(f"job {name} was resumed meanwhile (it is {now} now)")
    return again
