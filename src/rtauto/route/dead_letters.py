"""The daemon's background retry of dead letters (the configuration's ``dead_letters:``).

A pass looks at each job that ended FAIL within ``retry_for_hours`` only for want of delivery
(every failed step left dead letters; a step that failed on bad data would fail again and is
never retried here) and sends its dead letters again, each to the destination that gave up on
it, outside the engine: in the daemon, in a worker process killed past ``send_timeout_minutes``
(a destination that hangs holds up neither the retry nor the job). While a destination stays
down the job is left as it is, FAIL, with its items in the dead-letter list (their records
count the attempts and keep the last error): it does not flap between FAIL and running, and
observers are not told of it again. Once every dead letter of a job has arrived (in this
pass, in one a stop cut short, or by ``rtauto replay``, to any destination), the job is
resumed (:func:`rtauto.engine.resume.resume_job`): its failed routing steps run again and
find everything delivered, then the steps skipped because of them run (a REG sent only after
the images it references were).

A job that a resume would refuse (a newer job of its workflow replaced it, retention removed
its inputs or its folder; :func:`rtauto.engine.resume.check_resumable`) is left alone, its
dead letters unsent, with one warning and a ``job.resume_refused`` audit event per reason.
A job that leaves the window with dead letters is logged once: an operator takes it over.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rtauto.config import Settings
from rtauto.engine.resume import check_resumable, resume_job
from rtauto.errors import ResumeRefused
from rtauto.route.replay import ReplayResult, send_dead_letters
from rtauto.store import Store

if TYPE_CHECKING:
    from rtauto.engine.pool import WorkerPool

__all__ = [
    "RetryReport",
    "SendDeadLetters",
    "retry_dead_letters",
    "send_in_process",
    "send_in_worker",
]

log = logging.getLogger("rtauto.route")


# send one job's dead letters again (job id, time limit in seconds): what became of each
SendDeadLetters = Callable[[str, float], list[ReplayResult]]


@dataclass
class RetryReport:
    """What one pass did: dead letters sent again, how many arrived, jobs resumed, jobs that
    left the window with dead letters (``gave_up``), and where the window began (``since``:
    the next pass's ``window_was``)."""

    since: float = 0.0
    jobs: int = 0
    delivered: int = 0
    undelivered: int = 0
    resumed: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)
    errors: set[str] = field(default_factory=set)

    def summary(self) -> str:
        text = (
            f"dead letters of {self.jobs} job(s) sent again: {self.delivered} delivered, "
            f"{self.undelivered} still undelivered"
        )
        if self.resumed:
            text += f"; resumed job(s) {', '.join(j[:8] for j in self.resumed)}"
        if self.errors:
            text += f" ({'; '.join(sorted(self.errors))})"
        return text


def send_in_process(store: Store, settings: Settings, host: Any) -> SendDeadLetters:
    """Send in this process, with no time limit (tests, and commands run by hand)."""

    def send(job_id: str, _timeout: float) -> list[ReplayResult]:
        return send_dead_letters(store, settings, host, job_id)

    return send


def send_in_worker(pool: WorkerPool, store: Store) -> SendDeadLetters:
    """Send in a worker of ``pool`` (the daemon's): one past the time limit is killed, and
    one that dies takes only itself down. Either way what the worker had confirmed is
    delivered, and the rest stays dead, with the reason as each item's error."""

    def send(job_id: str, timeout: float) -> list[ReplayResult]:
        before = store.dead_letters_of(job_id)
        task = {
            "kind": "dead_letters",
            "job_id": job_id,
            "step_id": "dead letters",  # what the pool's log names
            "store_url": store.url,
        }
        answer = pool.run(task, timeout=timeout)
        if answer.get("status") == "ok":
            return [
                ReplayResult(**{k: v for k, v in r.items() if k != "status"})
                for r in answer["results"]
            ]
        still = {row.id for row in store.dead_letters_of(job_id)}
        error = answer.get("error") or "the worker sending them failed"
        sent: dict[tuple[str, str], ReplayResult] = {}
        for row in before:
            arrived = row.id not in still
            sent.setdefault(
                (row.destination, row.item_key),
                ReplayResult(
                    row.item_key,
                    row.path,
                    row.destination,
                    row.step_id,
                    arrived,
                    None if arrived else error,
                ),
            )
        return list(sent.values())

    return send


def retry_dead_letters(
    settings: Settings,
    store: Store,
    host: Any,
    *,
    send: SendDeadLetters | None = None,
    hold: Callable[[str], AbstractContextManager[Any]] = contextlib.nullcontext,
    stop: Callable[[], bool] = lambda: False,
    now: float | None = None,
    window_was: float | None = None,
) -> RetryReport:
    """One pass of the background retry (see the module doc).

    ``send`` sends one job's dead letters, within ``dead_letters.send_timeout_minutes``
    (:func:`send_in_worker` in the daemon; by default :func:`send_in_process`). ``hold(job_id)``
    keeps the engine from starting any step of the job while its dead letters are sent
    (:meth:`rtauto.engine.engine.Engine.holding`): a resume at that moment must not send them
    too. ``stop()`` ends the pass between jobs. ``host`` gives the destination types and the
    step types the resumed job's workflow loads with. ``window_was``: where the previous
    pass's window began; a job with dead letters that ended between it and this pass's
    window has left the window, and is logged (once: give each pass the last one's
    :attr:`RetryReport.since`).
    """
    policy = settings.dead_letters
    send = send or send_in_process(store, settings, host)
    since = (time.time() if now is None else now) - policy.retry_for_hours * 3600
    report = RetryReport(since=since)
    if window_was is not None and window_was < since:
        report.gave_up = store.delivery_failed_jobs(
            ended_after=window_was, ended_before=since, with_dead_letters=True
        )
        for job_id in report.gave_up:
            store.audit(
                "delivery.gave_up",
                job_id,
                f"dead letters not retried any more: the job ended over "
                f"{policy.retry_for_hours:g} hour(s) ago",
            )
            log.info(
                "job %s: gave up retrying its dead letters (it ended over %g hour(s) ago); "
                "`rtauto replay %s` sends them, `rtauto resume %s` then runs its failed steps",
                job_id[:8],
                policy.retry_for_hours,
                job_id[:8],
                job_id[:8],
            )
    for job_id in store.delivery_failed_jobs(ended_after=since):
        if stop():
            break
        with hold(job_id):
            job = store.get_job(job_id)
            # resumed meanwhile (rtauto resume): its routing steps send the dead letters
            if job is None or job.status != "fail":
                continue
            try:
                check_resumable(store, job, host.steps)
            except ResumeRefused as exc:
                _refused(store, job_id, str(exc))
                continue
            if store.dead_letters_of(job_id):
                _send(store, send, policy.send_timeout_minutes * 60, job_id, report)
                if store.dead_letters_of(job_id):
                    continue
            # every dead letter arrived (now, in an earlier pass that a stop cut short, or
            # by rtauto replay): the steps that waited for them run
            try:
                steps = resume_job(
                    store,
                    job_id,
                    host.steps,
                    by="daemon",
                    reason="its dead letters were all delivered",
                )
            except ResumeRefused as exc:
                if store.job_statuses([job_id]).get(job_id) == "fail":  # not resumed meanwhile
                    _refused(store, job_id, str(exc))
                continue
            report.resumed.append(job_id)
            log.info(
                "job %s: every dead letter delivered; resumed (step(s) %s run again)",
                job_id[:8],
                ", ".join(steps),
            )
    return report


def _refused(store: Store, job_id: str, reason: str) -> None:
    """Warn, and audit, that the daemon leaves a job alone: once per reason (the latest
    ``job.resume_refused`` event remembers it), though every pass looks at the job again."""
    last = store.audit_events("job.resume_refused", limit=1, subject=job_id)
    if last and last[0].message == reason:
        return
    log.warning(
        "job %s is left to an operator by the retry of dead letters: %s", job_id[:8], reason
    )
    store.audit("job.resume_refused", job_id, reason, by="daemon")


def _send(
    store: Store, send: SendDeadLetters, timeout: float, job_id: str, report: RetryReport
) -> None:
    """Send the job's dead letters again; count and audit what arrived."""
    results = send(job_id, timeout)
    arrived = [r for r in results if r.delivered]
    report.jobs += 1
    report.delivered += len(arrived)
    report.undelivered += len(results) - len(arrived)
    report.errors.update(f"{r.destination}: {r.error}" for r in results if r.error)
    if arrived:
        store.audit(
            "delivery.retried",
            job_id,
            f"the daemon's retry of dead letters delivered {len(arrived)} of "
            f"{len(results)} item(s)",
            results=[r.to_json() for r in results],
        )
