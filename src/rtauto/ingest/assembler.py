"""The assembler: decides when a series or study is complete and creates the matching jobs.

A series is complete for a workflow once no instance arrived for the workflow's series quiet
period; a study once its required series are all present (each quiet) or its study quiet
period has passed. Jobs are keyed by (workflow, series | study and its required series): a
restart, a resend, a second look or a workflow edit never creates a job twice; the job
records the workflow version it ran. Time before the daemon started never counts as quiet,
and a series that grows after its job was created runs again (see :class:`Assembler`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rtauto.config import Settings
from rtauto.hooks import PluginHost
from rtauto.store import Store
from rtauto.store.models import Job, Series
from rtauto.workflow import LoadedWorkflow
from rtauto.workflow.triggers import SeriesFacts, matches_series, series_ready, study_readiness

log = logging.getLogger("rtauto.assembler")


def series_facts(row: Series, not_before: float = 0.0) -> SeriesFacts:
    """The trigger's view of a series row; its times are taken no earlier than
    ``not_before`` (see :class:`Assembler`)."""
    return SeriesFacts(
        series_instance_uid=row.series_uid,
        study_instance_uid=row.study_uid,
        modality=row.modality,
        attributes=row.attributes or {},
        calling_ae=row.calling_ae,
        called_ae=row.called_ae,
        source=row.source,
        first_received=max(row.first_received, not_before),
        last_received=max(row.last_received, not_before),
        instance_count=row.instance_count,
    )


def job_key(loaded: LoadedWorkflow, scope: str, study_uid: str, key_series: Sequence[str]) -> str:
    """The dedupe key of a daemon job: keyed by workflow name, not version (an edit applies
    to series that complete after it, and a series already matched is not run again because
    its workflow changed)."""
    digest = hashlib.sha256("|".join(sorted(key_series)).encode()).hexdigest()[:24]
    return f"{loaded.workflow.name}:{scope}:{study_uid}:{digest}"


def create_job_for(
    store: Store,
    settings: Settings,
    loaded: LoadedWorkflow,
    *,
    scope: str,
    study_uid: str,
    series_uid: str | None,
    input_series: Sequence[str],
    key_series: Sequence[str],
    dedupe_key: str | None = None,
    work_dir: Path | None = None,
    input_instances: Sequence[str] | None = None,
) -> Job | None:
    """Create the job of ``loaded`` on these series; None when it exists already.

    ``input_instances`` limits the job to these instances of its series (see
    :meth:`Store.create_job`)."""
    if dedupe_key is None:
        dedupe_key = job_key(loaded, scope, study_uid, key_series)
    return store.create_job(
        dedupe_key=dedupe_key,
        workflow_name=loaded.workflow.name,
        workflow_hash=loaded.hash,
        workflow_text=loaded.text,
        workflow_path=str(loaded.path or ""),
        scope=scope,
        study_uid=study_uid,
        series_uid=series_uid,
        input_series=list(input_series),
        step_ids=[(s.id, s.uses) for s in loaded.workflow.steps],
        jobs_dir=settings.jobs_dir,
        work_dir=work_dir,
        input_instances=input_instances,
    )


def _wanted_by(loaded: LoadedWorkflow, facts: SeriesFacts) -> bool:
    """Whether the workflow's trigger takes the series, or a study workflow requires it."""
    trigger = loaded.workflow.trigger
    return matches_series(trigger, facts) or any(
        r.matches(facts.modality, facts.attributes) for r in trigger.requires
    )


class Assembler:
    """Turns quiet series and studies into jobs of the workflows whose triggers match.

    ``started``: when this daemon started. Time before it never counts as quiet (nor as
    waiting, for ``max_wait``): a series whose sender was cut off by a crash or a restart of
    the daemon gets its whole quiet period afresh, for the sender to send the rest, instead
    of running at once on what had arrived.

    A series-scoped job reads the instances the series held when the job was created. When
    more instances of the series arrive after that (a sender that finishes a cut-off series
    later), the workflow runs again on the whole series, with a warning: the first job's
    results were made on part of it.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        host: PluginHost,
        workflows: Callable[[], list[LoadedWorkflow]],
        started: float = 0.0,
    ):
        self.settings = settings
        self.store = store
        self.host = host
        self.workflows = workflows
        self.started = started
        # what the log and the audit trail were told once already (a study stays pending,
        # and is looked at on every pass, until it is quiet)
        self._said: set[tuple[Any, ...]] = set()

    def tick(self, now: float | None = None) -> list[Job]:
        """One pass; returns the jobs created."""
        now = time.time() if now is None else now
        workflows = self.workflows()
        created: list[Job] = []
        created += self._series_pass(workflows, now)
        created += self._study_pass(workflows, now)
        return created

    def _series_pass(self, workflows: list[LoadedWorkflow], now: float) -> list[Job]:
        defaults = self.settings.completion
        series_workflows = [w for w in workflows if w.workflow.trigger.effective_scope == "series"]
        created = []
        for row in self.store.pending_series():
            facts = series_facts(row, self.started)
            waiting = False
            instances: list[str] | None = None
            for loaded in series_workflows:
                if not matches_series(loaded.workflow.trigger, facts):
                    continue
                if not series_ready(loaded.workflow, facts, now, defaults):
                    waiting = True
                    continue
                if instances is None:
                    instances = [i.sop_uid for i in self.store.instances_of_series(row.series_uid)]
                job = self._series_job(loaded, row, instances)
                if job is not None:
                    created.append(job)
            quiet = now - facts.last_received >= defaults.series_quiet_seconds
            if quiet and not waiting:
                # only as it was seen: an instance that arrived since leaves it pending
                if not self.store.mark_series_complete(
                    row.series_uid, now, instance_count=row.instance_count
                ):
                    continue
                if not any(_wanted_by(w, facts) for w in workflows):
                    log.info(
                        "series %s (%s, %d instances, from %s) is complete; no workflow takes it",
                        row.series_uid,
                        row.modality or "no modality",
                        row.instance_count,
                        row.calling_ae or row.source,
                    )
                self.host.notify(
                    "rtauto_series_complete",
                    series={
                        "series_instance_uid": row.series_uid,
                        "study_instance_uid": row.study_uid,
                        "modality": row.modality,
                        "instance_count": row.instance_count,
                        "source": row.source,
                        "attributes": row.attributes or {},
                    },
                )
        return created

    def _series_job(self, loaded: LoadedWorkflow, row: Series, instances: list[str]) -> Job | None:
        """The job of a series-scoped workflow on a quiet series; None when one ran on these
        instances already."""
        job = self._job_or_rerun(
            loaded,
            base=job_key(loaded, "series", row.study_uid, [row.series_uid]),
            key_instances=instances,
            scope="series",
            study_uid=row.study_uid,
            series_uid=row.series_uid,
            input_series=[row.series_uid],
            key_series=[row.series_uid],
            input_instances=instances,
        )
        if job is not None:
            log.info(
                "job %s: workflow %s on series %s (%d instances)",
                job.id[:8],
                loaded.workflow.name,
                row.series_uid,
                len(instances),
            )
        return job

    def _job_or_rerun(
        self,
        loaded: LoadedWorkflow,
        *,
        base: str,
        key_instances: list[str],
        **kwargs: Any,
    ) -> Job | None:
        """The job keyed ``base``; when it exists already, a further job on what the series
        hold now if ``key_instances`` (those of the series the job is keyed by) grew since it
        was made; else None.

        One job per size the key series reach: a restart never runs one twice (the key is
        hashed: the column holds 128 characters). A job on what is left after retention
        removed some of what the earlier job read would run on part of the data: it is not
        made, and the operator is told to send the whole series again."""
        job = create_job_for(self.store, self.settings, loaded, dedupe_key=base, **kwargs)
        if job is not None:
            return job
        first = self.store.job_by_dedupe_key(base)
        if first is None or first.input_instances is None:
            return None  # a job from before rtauto recorded its instances: left alone
        read = set(first.input_instances)
        if set(key_instances) <= read:
            return None  # nothing new (a re-sent instance does not even reach here)
        name = loaded.workflow.name
        scope = kwargs["scope"]
        uid = kwargs["series_uid"] if scope == "series" else kwargs["study_uid"]
        subject = f"{scope} {uid}"
        lost = read - set(kwargs["input_instances"])
        if lost:
            if not self._first_time(("partial", uid, name, first.id, len(key_instances))):
                return None
            log.warning(
                "%s has %d new instance(s) since job %s of workflow %s ran, but %d of the "
                "instances that job read are no longer held (removed by retention); the "
                "workflow does not run on part of the data: send the whole series again",
                subject,
                len(set(key_instances) - read),
                first.id[:8],
                name,
                len(lost),
            )
            self.store.audit(
                f"{scope}.partial",
                uid,
                f"new instances after {len(lost)} of job {first.id}'s inputs were removed",
                earlier_job=first.id,
            )
            return None
        grown = hashlib.sha256(f"{base}:n{len(key_instances)}".encode()).hexdigest()
        job = create_job_for(
            self.store, self.settings, loaded, dedupe_key=f"grown:{grown}", **kwargs
        )
        if job is None:
            return None
        # an earlier job on part of the data that has not started yet never will
        if scope == "series":
            earlier = self.store.job_ids_of_series(name, uid)
        else:
            earlier = self.store.job_ids_of_study(name, uid)
        held = len(kwargs["input_instances"])
        self.store.supersede_pending_jobs(
            earlier, job.id, f"superseded by job {job.id[:8]}: {subject} grew to {held} instances"
        )
        log.warning(
            "job %s: %s has %d instances now, %d when job %s of workflow %s ran on it; the "
            "workflow runs again on the whole %s (the earlier job's results were made on "
            "part of it)",
            job.id[:8],
            subject,
            held,
            len(read),
            first.id[:8],
            name,
            scope,
        )
        self.store.audit(
            f"{scope}.grown",
            uid,
            f"{held} instances, {len(read)} in job {first.id}",
            job=job.id,
            earlier_job=first.id,
        )
        return job

    def _first_time(self, said: tuple[Any, ...]) -> bool:
        """Whether ``said`` is new (and from now on known)."""
        if said in self._said:
            return False
        self._said.add(said)
        return True

    def _study_pass(self, workflows: list[LoadedWorkflow], now: float) -> list[Job]:
        defaults = self.settings.completion
        study_workflows = [w for w in workflows if w.workflow.trigger.effective_scope == "study"]
        created = []
        for study in self.store.pending_studies():
            series = [
                series_facts(s, self.started) for s in self.store.series_of_study(study.study_uid)
            ]
            waiting = False
            for loaded in study_workflows:
                decision = study_readiness(
                    loaded.workflow,
                    series,
                    now,
                    defaults,
                    max(study.first_received, self.started),
                    max(study.last_received, self.started),
                )
                if decision.expired:
                    wait = ("gave up", study.study_uid, loaded.workflow.name, study.first_received)
                    if self._first_time(wait):
                        self.store.audit(
                            "study.incomplete",
                            study.study_uid,
                            f"workflow {loaded.workflow.name} gave up waiting: {decision.reason}",
                            missing=decision.missing,
                        )
                    continue
                if not decision.ready:
                    if decision.selected or any(
                        matches_series(loaded.workflow.trigger, f) for f in series
                    ):
                        waiting = True
                    continue
                # the job is keyed by the required series: a new plan in the study is a new
                # job, an unrelated late series is not
                requires = loaded.workflow.trigger.requires
                by_uid = {f.series_instance_uid: f for f in series}
                required = [
                    uid
                    for uid in decision.selected
                    if not requires
                    or any(
                        r.matches(by_uid[uid].modality, by_uid[uid].attributes) for r in requires
                    )
                ]
                instances = {
                    uid: [i.sop_uid for i in self.store.instances_of_series(uid)]
                    for uid in decision.selected
                }
                job = self._job_or_rerun(
                    loaded,
                    base=job_key(loaded, "study", study.study_uid, required),
                    key_instances=[sop for uid in required for sop in instances[uid]],
                    scope="study",
                    study_uid=study.study_uid,
                    series_uid=None,
                    input_series=decision.selected,
                    key_series=required,
                    input_instances=[sop for uid in decision.selected for sop in instances[uid]],
                )
                if job is not None:
                    log.info(
                        "job %s: workflow %s on study %s (%d series)",
                        job.id[:8],
                        loaded.workflow.name,
                        study.study_uid,
                        len(decision.selected),
                    )
                    created.append(job)
            quiet = now - max(study.last_received, self.started) >= defaults.study_quiet_seconds
            if quiet and not waiting:
                self.store.mark_study_complete(
                    study.study_uid, now, last_received=study.last_received
                )
        return created
