"""The assembler: decides when a series or study is complete and creates the matching jobs.

A series is complete for a workflow once no instance arrived for the workflow's series quiet
period; a study once its required series are all present (each quiet) or its study quiet
period has passed. Jobs are keyed by (workflow, series | study and its required series): a
restart, a resend, a second look or a workflow edit never creates a job twice; the job
records the workflow version it ran.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rtauto.config import Settings
from rtauto.hooks import PluginHost
from rtauto.store import Store
from rtauto.store.models import Job, Series
from rtauto.workflow import LoadedWorkflow
from rtauto.workflow.triggers import SeriesFacts, matches_series, series_ready, study_readiness

log = logging.getLogger("rtauto.assembler")


def series_facts(row: Series) -> SeriesFacts:
    return SeriesFacts(
        series_instance_uid=row.series_uid,
        study_instance_uid=row.study_uid,
        modality=row.modality,
        attributes=row.attributes or {},
        calling_ae=row.calling_ae,
        called_ae=row.called_ae,
        source=row.source,
        first_received=row.first_received,
        last_received=row.last_received,
        instance_count=row.instance_count,
    )


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
        digest = hashlib.sha256("|".join(sorted(key_series)).encode()).hexdigest()[:24]
        # keyed by workflow name, not version: an edit applies to series that complete after
        # it, and a series already matched is not run again because its workflow changed
        dedupe_key = f"{loaded.workflow.name}:{scope}:{study_uid}:{digest}"
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


class Assembler:
    """Turns quiet series and studies into jobs of the workflows whose triggers match."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        host: PluginHost,
        workflows: Callable[[], list[LoadedWorkflow]],
    ):
        self.settings = settings
        self.store = store
        self.host = host
        self.workflows = workflows

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
            facts = series_facts(row)
            waiting = False
            for loaded in series_workflows:
                if not matches_series(loaded.workflow.trigger, facts):
                    continue
                if not series_ready(loaded.workflow, facts, now, defaults):
                    waiting = True
                    continue
                job = create_job_for(
                    self.store,
                    self.settings,
                    loaded,
                    scope="series",
                    study_uid=row.study_uid,
                    series_uid=row.series_uid,
                    input_series=[row.series_uid],
                    key_series=[row.series_uid],
                )
                if job is not None:
                    log.info(
                        "job %s: workflow %s on series %s (%d instances)",
                        job.id[:8],
                        loaded.workflow.name,
                        row.series_uid,
                        row.instance_count,
                    )
                    created.append(job)
            quiet = now - row.last_received >= defaults.series_quiet_seconds
            if quiet and not waiting:
                self.store.mark_series_complete(row.series_uid, now)
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

    def _study_pass(self, workflows: list[LoadedWorkflow], now: float) -> list[Job]:
        defaults = self.settings.completion
        study_workflows = [w for w in workflows if w.workflow.trigger.effective_scope == "study"]
        created = []
        for study in self.store.pending_studies():
            series = [series_facts(s) for s in self.store.series_of_study(study.study_uid)]
            waiting = False
            for loaded in study_workflows:
                decision = study_readiness(
                    loaded.workflow,
                    series,
                    now,
                    defaults,
                    study.first_received,
                    study.last_received,
                )
                if decision.expired:
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
                job = create_job_for(
                    self.store,
                    self.settings,
                    loaded,
                    scope="study",
                    study_uid=study.study_uid,
                    series_uid=None,
                    input_series=decision.selected,
                    key_series=required,
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
            quiet = now - study.last_received >= defaults.study_quiet_seconds
            if quiet and not waiting:
                self.store.mark_study_complete(study.study_uid, now)
        return created
