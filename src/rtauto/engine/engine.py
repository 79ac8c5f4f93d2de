"""Running jobs: the step DAG of each job, with every state change written to the store first.

A job's steps move ``pending -> running -> ok | fail | skipped`` (``retry_wait`` between
attempts of a transient failure). The store is the only record: after a crash, steps found
``running`` are run again (in a fresh working folder), finished steps never are. A failed
job that is resumed (:mod:`rtauto.engine.resume`) is pending again with its failed steps, and
the steps skipped because of them, pending: the engine runs it like any other.

The rule for ``needs`` and ``if:`` is the one in :mod:`rtauto.workflow.conditions`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rtauto import __version__
from rtauto.config import Settings, effective_destinations
from rtauto.engine.pool import WorkerPool
from rtauto.hooks import PluginHost
from rtauto.store import TERMINAL_STEP_STATES, Store
from rtauto.store.models import Job, StepRun
from rtauto.workflow import LoadedWorkflow, load_workflow_text
from rtauto.workflow.conditions import decide_step

log = logging.getLogger("rtauto.engine")


def _spec(loaded: LoadedWorkflow, step_id: str) -> Any:
    return next(s for s in loaded.workflow.steps if s.id == step_id)


class Engine:
    """Schedules the steps of unfinished jobs onto a :class:`WorkerPool`."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        host: PluginHost,
        *,
        pool: WorkerPool | None = None,
        warm: list[str] | None = None,
        dry_run: Path | None = None,
    ):
        self.settings = settings
        # a dry run: every step gets this folder as ``StepContext.dry_run`` (routing steps
        # copy what they would deliver into it and reach no destination)
        self.dry_run = dry_run
        self.store = store
        self.host = host
        self.pool = pool or WorkerPool(
            settings.model_dump(mode="json"), settings.executor.workers, warm=warm
        )
        self._threads = ThreadPoolExecutor(
            max_workers=settings.executor.workers, thread_name_prefix="rtauto-step"
        )
        self._inflight: dict[tuple[str, str], Future[None]] = {}
        self._held: set[str] = set()  # jobs none of whose steps may start now (see holding)
        self._lock = threading.Lock()
        self._workflows: dict[tuple[str, str], LoadedWorkflow] = {}
        self._wake = threading.Event()
        self.on_change: Callable[[], None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    def recover(self) -> int:
        """After a restart: steps left ``running`` by a crash go back to ``pending``."""
        count = 0
        for job in self.store.unfinished_jobs():
            for step in self.store.steps_of(job.id):
                if step.status == "running":
                    self.store.update_step(job.id, step.step_id, status="pending")
                    self.store.audit(
                        "step.resumed",
                        job.id,
                        f"step {step.step_id} was running when rtauto stopped; it runs again",
                    )
                    count += 1
        return count

    def close(self, wait: bool = True) -> None:
        """Stop. Steps still running stay ``running`` in the store: the next start resumes
        them (with ``wait``, running steps are allowed to finish first)."""
        if not wait:
            self._closed = True
        self._threads.shutdown(wait=wait, cancel_futures=True)
        self._closed = True
        self.pool.close()

    def busy(self) -> bool:
        with self._lock:
            return bool(self._inflight)

    def wait_for_change(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    @contextmanager
    def holding(self, job_id: str) -> Iterator[None]:
        """No step of the job starts while this is held: the daemon sends a failed job's dead
        letters outside the engine, and a resume at that moment (``rtauto resume``) must not
        have its routing step send them too."""
        with self._lock:
            self._held.add(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._held.discard(job_id)
            self._wake.set()

    # -- workflow of a job -------------------------------------------------------------------
    def workflow_of(self, job: Job) -> LoadedWorkflow:
        """The exact workflow version the job was created with (kept in the store)."""
        key = (job.workflow_name, job.workflow_hash)
        loaded = self._workflows.get(key)
        if loaded is None:
            loaded = load_workflow_text(
                job.workflow_text, job.workflow_path or job.workflow_name, self.host.steps
            )
            self._workflows[key] = loaded
        return loaded

    # -- scheduling --------------------------------------------------------------------------
    def tick(self) -> int:
        """One scheduling pass over unfinished jobs; returns the number of steps started."""
        started = 0
        for job in self.store.unfinished_jobs():
            with self._lock:
                if job.id in self._held:
                    continue
            started += self._schedule_job(job)
        return started

    def _schedule_job(self, job: Job) -> int:
        try:
            loaded = self.workflow_of(job)
        except Exception as exc:  # a stored version no longer loads (a step type was removed)
            self._fail_job(job, f"the workflow version of this job cannot be loaded: {exc}")
            return 0
        steps = {s.step_id: s for s in self.store.steps_of(job.id)}
        now = time.time()
        started = 0
        finished_states = {sid: s.status for sid, s in steps.items()}
        for step_id in loaded.order:
            row = steps[step_id]
            if row.status in TERMINAL_STEP_STATES:
                continue
            with self._lock:
                if (job.id, step_id) in self._inflight:
                    continue
            if row.status == "running":
                # not in flight: it ended since `steps` was read (a step's result is in the
                # store before it leaves the in-flight set), or an error of the store left it
                # running with no thread to run it, which the next pass starts again (one a
                # stop left running was made pending again by recover())
                if self.store.update_step(job.id, step_id, only_if="running", status="pending"):
                    log.warning(
                        "step %s of job %s was left running with nothing running it; it runs again",
                        step_id,
                        job.id[:8],
                    )
                continue
            if row.status == "retry_wait" and (row.next_attempt_at or 0) > now:
                continue
            spec = _spec(loaded, step_id)
            needs = list(spec.needs)
            if any(finished_states[n] not in TERMINAL_STEP_STATES for n in needs):
                continue
            view = {
                sid: {"status": r.status, "outputs": r.outputs or {}} for sid, r in steps.items()
            }
            if decide_step(needs, loaded.conditions.get(step_id), view) == "skip":
                self.store.finish_step(
                    job.id,
                    step_id,
                    status="skipped",
                    summary=self._skip_reason(loaded, step_id, needs, steps),
                )
                finished_states[step_id] = "skipped"
                steps[step_id].status = "skipped"
                self._after_step(job, step_id)
                continue
            if job.status == "pending":
                self.store.set_job_status(job.id, "running")
                job.status = "running"
                self.host.notify("rtauto_job_started", job=self._job_summary(job))
            self._start_step(job, loaded, row)
            started += 1
        if started == 0:
            self._maybe_finish_job(job)
        return started

    @staticmethod
    def _skip_reason(
        loaded: LoadedWorkflow, step_id: str, needs: list[str], steps: dict[str, StepRun]
    ) -> str:
        not_ok = [n for n in needs if steps[n].status != "ok"]
        condition = loaded.conditions.get(step_id)
        if not_ok and (condition is None or not condition.overrides_success):
            # decide_step: a step whose needed steps did not all succeed runs only when its
            # condition calls failure() or always()
            reason = "skipped: needed step(s) did not succeed: " + ", ".join(
                f"{n} ({steps[n].status})" for n in not_ok
            )
            if condition is not None:
                reason += " (a condition runs after a failure only with failure() or always())"
            return reason
        return f"skipped: condition is false: {_spec(loaded, step_id).if_}"

    def _start_step(self, job: Job, loaded: LoadedWorkflow, row: StepRun) -> None:
        spec = _spec(loaded, row.step_id)
        attempt = row.attempts + 1
        job_dir = Path(job.work_dir)
        workdir = job_dir / row.step_id
        if workdir.exists() and any(workdir.iterdir()):
            # an earlier attempt's files are kept for diagnosis, never reused
            aside = job_dir / ".attempts" / f"{row.step_id}-{row.attempts or 0}-{int(time.time())}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(workdir), str(aside))
        workdir.mkdir(parents=True, exist_ok=True)
        registered = self.host.steps.get(spec.uses)
        self.store.update_step(
            job.id,
            row.step_id,
            status="running",
            attempts=attempt,
            started_at=time.time(),
            plugin=registered.plugin if registered else "",
            plugin_version=registered.plugin_version if registered else "",
        )
        task = self._task(job, loaded, row.step_id, attempt, workdir)
        future = self._threads.submit(self._run_step, job, loaded, row.step_id, task)
        with self._lock:
            self._inflight[(job.id, row.step_id)] = future

    def _task(
        self, job: Job, loaded: LoadedWorkflow, step_id: str, attempt: int, workdir: Path
    ) -> dict[str, Any]:
        spec = _spec(loaded, step_id)
        previous = {}
        for s in self.store.steps_of(job.id):
            if s.status in TERMINAL_STEP_STATES:
                previous[s.step_id] = {
                    "status": s.status,
                    "outputs": s.outputs or {},
                    "artifacts": [
                        {
                            "path": a.path,
                            "kind": a.kind,
                            "modality": a.modality,
                            "sop_instance_uid": a.sop_instance_uid,
                            "description": a.description,
                            "provenance": a.provenance,
                        }
                        for a in self.store.artifacts_of(job.id, s.step_id)
                    ],
                }
        destinations = {
            n: d.model_dump(mode="json")
            for n, d in effective_destinations(self.settings, loaded.workflow.destinations).items()
        }
        return {
            "job_id": job.id,
            "step_id": step_id,
            "step_index": loaded.workflow.steps.index(spec),
            "uses": spec.uses,
            "params": dict(spec.with_),
            "attempt": attempt,
            "max_attempts": spec.retry.max_attempts,
            "workdir": str(workdir),
            "job_dir": job.work_dir,
            "study": self._study_json(job),
            "previous": previous,
            "settings": self.settings.model_dump(mode="json"),
            "destinations": destinations,
            "store_url": self.store.url,
            "rtauto_version": __version__,
            "workflow_name": job.workflow_name,
            "workflow_hash": job.workflow_hash,
            "dry_run": str(self.dry_run) if self.dry_run is not None else None,
        }

    def _study_json(self, job: Job) -> dict[str, Any]:
        series = []
        patient_id = ""
        for uid in job.input_series:
            row = self.store.get_series(uid)
            if row is None:
                continue
            patient_id = patient_id or row.patient_id
            instances = self.store.instances_of_series(uid)
            if job.input_instances is not None:
                wanted = set(job.input_instances)
                instances = [i for i in instances if i.sop_uid in wanted]
            series.append(
                {
                    "series_instance_uid": uid,
                    "study_instance_uid": row.study_uid,
                    "modality": row.modality,
                    "attributes": row.attributes or {},
                    "instances": [
                        {
                            "sop_instance_uid": i.sop_uid,
                            "sop_class_uid": i.sop_class_uid,
                            "path": str(self.settings.spool_dir / i.path),
                        }
                        for i in instances
                    ],
                }
            )
        return {"study_instance_uid": job.study_uid, "patient_id": patient_id, "series": series}

    def _run_step(
        self, job: Job, loaded: LoadedWorkflow, step_id: str, task: dict[str, Any]
    ) -> None:
        spec = _spec(loaded, step_id)
        try:
            result = self.pool.run(task, timeout=spec.timeout)
            if self._closed:
                return  # stopping: the step stays running in the store and resumes at start
            self._record(job, loaded, step_id, task["attempt"], result)
        except Exception:
            log.exception("internal error running step %s of job %s", step_id, job.id)
            self.store.update_step(job.id, step_id, status="pending")
        finally:
            with self._lock:
                self._inflight.pop((job.id, step_id), None)
            self._wake.set()
            if self.on_change is not None:
                self.on_change()

    def _record(
        self, job: Job, loaded: LoadedWorkflow, step_id: str, attempt: int, result: dict[str, Any]
    ) -> None:
        spec = _spec(loaded, step_id)
        status = result.get("status")
        error = result.get("error")
        if status == "timeout":
            status = "retry" if spec.retry.on_timeout else "fail"
        if status == "retry":
            if attempt < spec.retry.max_attempts:
                delay = result.get("retry_after") or spec.retry.delay(attempt)
                self.store.update_step(
                    job.id,
                    step_id,
                    status="retry_wait",
                    next_attempt_at=time.time() + delay,
                    error=error,
                )
                log.info(
                    "step %s of job %s: %s; retrying in %.1f s (attempt %d of %d)",
                    step_id,
                    job.id[:8],
                    error,
                    delay,
                    attempt,
                    spec.retry.max_attempts,
                )
                return
            status = "fail"
            error = f"gave up after {attempt} attempt(s): {error}"
        if status != "ok":
            status = "fail"
            log.warning("step %s of job %s failed: %s", step_id, job.id[:8], error)
        plugin, plugin_version = result.get("plugin", ""), result.get("plugin_version", "")
        if not plugin:
            # a worker that timed out or died sent nothing back: the plugin the daemon
            # started the step with (recorded when it started) stays on record
            registered = self.host.steps.get(spec.uses)
            if registered is not None:
                plugin, plugin_version = registered.plugin, registered.plugin_version
        self.store.finish_step(
            job.id,
            step_id,
            status=status,
            outputs=result.get("outputs") or {},
            summary=result.get("summary") or "",
            error=error,
            artifacts=result.get("artifacts") or [],
            plugin=plugin,
            plugin_version=plugin_version,
        )
        self._after_step(job, step_id)

    def _after_step(self, job: Job, step_id: str) -> None:
        row = next(s for s in self.store.steps_of(job.id) if s.step_id == step_id)
        self.host.notify(
            "rtauto_step_finished",
            job=self._job_summary(job),
            step={
                "id": row.step_id,
                "uses": row.uses,
                "status": row.status,
                "attempts": row.attempts,
                "outputs": row.outputs,
                "error": row.error,
                "artifacts": [a.path for a in self.store.artifacts_of(job.id, step_id)],
            },
        )

    def _maybe_finish_job(self, job: Job) -> None:
        steps = self.store.steps_of(job.id)
        if not all(s.status in TERMINAL_STEP_STATES for s in steps):
            return
        with self._lock:
            if any(key[0] == job.id for key in self._inflight):
                return
        failed = [s for s in steps if s.status == "fail"]
        if failed:
            error = "; ".join(f"step {s.step_id} failed: {s.error}" for s in failed)
            self.store.set_job_status(job.id, "fail", error=error)
            job.status = "fail"
        else:
            self.store.set_job_status(job.id, "ok")
            job.status = "ok"
        self.host.notify("rtauto_job_finished", job=self._job_summary(job))

    def _fail_job(self, job: Job, error: str) -> None:
        for step in self.store.steps_of(job.id):
            if step.status not in TERMINAL_STEP_STATES:
                self.store.finish_step(job.id, step.step_id, status="fail", error=error)
        self.store.set_job_status(job.id, "fail", error=error)
        job.status = "fail"
        self.host.notify("rtauto_job_finished", job=self._job_summary(job))

    @staticmethod
    def _job_summary(job: Job) -> dict[str, Any]:
        return {
            "id": job.id,
            "workflow": job.workflow_name,
            "workflow_hash": job.workflow_hash,
            "study_instance_uid": job.study_uid,
            "series_instance_uid": job.series_uid,
            "status": job.status,
        }

    # -- convenience -------------------------------------------------------------------------
    def run_until_done(self, job_ids: list[str], poll: float = 0.05) -> None:
        """Drive the named jobs to their end in this process (``rtauto run``, tests)."""
        while True:
            self.tick()
            jobs = [self.store.get_job(j) for j in job_ids]
            if all(j is not None and j.status in ("ok", "fail") for j in jobs) and not self.busy():
                return
            self.wait_for_change(poll if not self.busy() else 1.0)
