"""The assembler on its own: index rows in, jobs out, with the clock in the test's hands."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rtauto.config import Settings
from rtauto.hooks import build_plugin_manager
from rtauto.ingest.assembler import Assembler
from rtauto.store import InstanceRecord, Store
from rtauto.uids import new_uid
from rtauto.workflow import LoadedWorkflow, load_workflow_text

T0 = 1_800_000_000.0  # the time the first instance arrives

SERIES_WORKFLOW = """\
name: contour-ct
trigger: {modality: CT}
completion: {series_quiet: 10s}
steps:
  - id: copy
    uses: route.folder
    with: {path: /tmp/rtauto-unused, send: inputs}
"""

STUDY_WORKFLOW = """\
name: check-plan
trigger:
  modality: RTPLAN
  requires: [{modality: CT}, {modality: RTPLAN}]
completion: {series_quiet: 5s, study_quiet: 30s, max_wait: 10m}
steps:
  - id: copy
    uses: route.folder
    with: {path: /tmp/rtauto-unused, send: inputs}
"""


@pytest.fixture
def host():
    return build_plugin_manager()


def loaded(text: str, host) -> LoadedWorkflow:
    return load_workflow_text(text, "test.yaml", host.steps)


class Site:
    """A store and an assembler over it, and a way to 'receive' instances at a given time."""

    def __init__(self, settings: Settings, store: Store, host, workflows: list[LoadedWorkflow]):
        self.store = store
        self.assembler = Assembler(settings, store, host, lambda: workflows, started=T0 - 3600)
        self.study = new_uid()

    def receive(
        self, series: str, modality: str, count: int, at: float, sops: list[str] | None = None
    ) -> list[str]:
        sops = sops or [new_uid() for _ in range(count)]
        self.store.record_instances(
            [
                InstanceRecord(
                    sop_instance_uid=sop,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    series_instance_uid=series,
                    study_instance_uid=self.study,
                    patient_id="PAT-1",
                    modality=modality,
                    transfer_syntax="1.2.840.10008.1.2.1",
                    path=f"{self.study}/{series}/{sop}.dcm",
                    size=1,
                    source="scp",
                    received_at=at,
                )
                for sop in sops
            ]
        )
        return sops

    def jobs(self) -> list:
        return sorted(self.store.list_jobs(), key=lambda j: j.created_at)


@pytest.fixture
def site(tmp_path: Path, host):
    def make(*texts: str) -> Site:
        settings = Settings(home=tmp_path / "home")
        settings.ensure_dirs()
        store = Store(settings.database_url, migrate=True)
        made.append(store)
        return Site(settings, store, host, [loaded(t, host) for t in texts])

    made: list[Store] = []
    yield make
    for store in made:
        store.close()


def test_a_series_becomes_one_job_once_quiet(site):
    s = site(SERIES_WORKFLOW)
    ct = new_uid()
    sops = s.receive(ct, "CT", 5, T0)
    assert s.assembler.tick(T0 + 9) == []  # not quiet yet
    s.receive(ct, "CT", 1, T0 + 8)  # a late slice restarts the quiet period
    assert s.assembler.tick(T0 + 17) == []
    [job] = s.assembler.tick(T0 + 18.5)
    assert job.scope == "series" and job.series_uid == ct
    assert len(job.input_instances) == 6 and set(sops) <= set(job.input_instances)
    assert s.assembler.tick(T0 + 60) == []  # a second look makes nothing
    assert s.store.get_series(ct).completed_at is not None


def test_time_before_the_daemon_started_is_not_quiet_time(site):
    s = site(SERIES_WORKFLOW)
    ct = new_uid()
    s.receive(ct, "CT", 3, T0)
    s.assembler.started = T0 + 3600  # the daemon was down for an hour after the push
    assert s.assembler.tick(T0 + 3601) == []  # the sender gets a whole quiet period afresh
    assert len(s.assembler.tick(T0 + 3611)) == 1


def test_a_series_that_grows_runs_again_once_and_a_resend_changes_nothing(site, caplog):
    s = site(SERIES_WORKFLOW)
    ct = new_uid()
    first_sops = s.receive(ct, "CT", 4, T0)
    [first] = s.assembler.tick(T0 + 11)
    s.receive(ct, "CT", 2, T0 + 100)
    with caplog.at_level(logging.WARNING, logger="rtauto.assembler"):
        [second] = s.assembler.tick(T0 + 111)
    assert len(second.input_instances) == 6
    assert "the workflow runs again on the whole series" in caplog.text
    # the first job had not started: it never will
    assert s.store.get_job(first.id).status == "fail"
    assert "superseded" in s.store.get_job(first.id).error
    [event] = s.store.audit_events("series.grown")
    assert event.data == {"job": second.id, "earlier_job": first.id}
    # the first instances sent again: indexed already, so no third job
    s.receive(ct, "CT", 4, T0 + 200, sops=first_sops)
    assert s.store.get_series(ct).instance_count == 6
    assert s.assembler.tick(T0 + 300) == []
    assert len(s.jobs()) == 2


def test_a_study_job_waits_for_its_required_series_and_is_keyed_by_them(site):
    s = site(STUDY_WORKFLOW)
    ct, plan, mr = new_uid(), new_uid(), new_uid()
    s.receive(ct, "CT", 3, T0)
    assert s.assembler.tick(T0 + 60) == []  # no plan yet
    s.receive(plan, "RTPLAN", 1, T0 + 120)
    assert s.assembler.tick(T0 + 122) == []  # the plan is not quiet yet
    [job] = s.assembler.tick(T0 + 126)
    assert job.scope == "study" and set(job.input_series) == {ct, plan}
    # an unrelated late series is no reason to check the plan again
    s.receive(mr, "MR", 2, T0 + 200)
    assert s.assembler.tick(T0 + 300) == []
    # a new plan in the study is
    plan2 = new_uid()
    s.receive(plan2, "RTPLAN", 1, T0 + 400)
    [again] = s.assembler.tick(T0 + 406)
    assert plan2 in again.input_series


def test_a_study_gives_up_waiting_after_max_wait(site):
    s = site(STUDY_WORKFLOW)
    s.assembler.settings.completion.study_quiet_seconds = 1200  # complete only after 20 min
    s.receive(new_uid(), "RTPLAN", 1, T0)  # a plan whose CT never comes
    assert s.assembler.tick(T0 + 60) == []
    assert s.store.audit_events("study.incomplete") == []
    for second in range(601, 700):  # said once, though the study is not quiet yet
        assert s.assembler.tick(T0 + second) == []
    [event] = s.store.audit_events("study.incomplete")
    assert "check-plan gave up waiting" in event.message
    assert s.jobs() == []


def test_a_complete_series_no_workflow_takes_is_logged(site, caplog):
    s = site(SERIES_WORKFLOW)
    s.receive(new_uid(), "MR", 2, T0)
    with caplog.at_level(logging.INFO, logger="rtauto.assembler"):
        assert s.assembler.tick(T0 + 60) == []
    assert "no workflow takes it" in caplog.text


def test_a_study_job_runs_again_once_when_a_required_series_grows(site, caplog):
    s = site(STUDY_WORKFLOW)
    ct, plan = new_uid(), new_uid()
    first_sops = s.receive(ct, "CT", 3, T0)  # a CT cut off by a crash of its sender
    s.receive(plan, "RTPLAN", 1, T0 + 1)
    [first] = s.assembler.tick(T0 + 10)
    assert len(first.input_instances) == 4  # it reads what the study held then
    s.receive(ct, "CT", 2, T0 + 100)  # the rest of the CT
    with caplog.at_level(logging.WARNING, logger="rtauto.assembler"):
        [second] = s.assembler.tick(T0 + 110)
    assert second.scope == "study" and set(second.input_series) == {ct, plan}
    assert len(second.input_instances) == 6
    assert "the workflow runs again on the whole study" in caplog.text
    assert s.store.get_job(first.id).status == "fail"  # it had not started: superseded
    [event] = s.store.audit_events("study.grown")
    assert event.subject == s.study
    assert event.data == {"job": second.id, "earlier_job": first.id}
    # sent again, or an unrelated series: no third job, at a restart neither
    s.receive(ct, "CT", 3, T0 + 200, sops=first_sops)
    s.receive(new_uid(), "MR", 2, T0 + 200)
    assert s.assembler.tick(T0 + 300) == []
    s.store.set_job_status(second.id, "ok")
    assert s.assembler.tick(T0 + 301) == []
    assert len(s.jobs()) == 2


def forget(s: Site, series: str) -> None:
    """What retention does to a series it removes: its instance rows go, its row stays empty."""
    from rtauto.retention import _forget_instances

    _forget_instances(s.store, series, [i.sop_uid for i in s.store.instances_of_series(series)])


def planned_study(s: Site) -> tuple[str, str]:
    """A CT and its plan, run once by the study workflow, the study then complete."""
    ct, plan = new_uid(), new_uid()
    s.receive(ct, "CT", 3, T0)
    s.receive(plan, "RTPLAN", 1, T0 + 1)
    assert len(s.assembler.tick(T0 + 10)) == 1
    assert s.assembler.tick(T0 + 100) == []  # the study is quiet: complete
    return ct, plan


def test_a_series_emptied_by_retention_counts_for_no_trigger(site):
    s = site(STUDY_WORKFLOW)
    ct, plan = planned_study(s)
    forget(s, ct)
    forget(s, plan)
    # months later a new plan in the study: its CT is gone, so no job on a CT of 0 slices
    s.receive(new_uid(), "RTPLAN", 1, T0 + 1000)
    assert s.assembler.tick(T0 + 1010) == []
    # it waits max_wait from its own arrival, not from the study's first months ago
    assert s.store.audit_events("study.incomplete") == []
    assert s.assembler.tick(T0 + 1000 + 599) == []
    assert s.store.audit_events("study.incomplete") == []
    assert s.assembler.tick(T0 + 1000 + 601) == []
    [event] = s.store.audit_events("study.incomplete")
    assert "missing CT" in event.message
    assert len(s.jobs()) == 1


def test_a_series_sent_in_part_after_retention_does_not_run_on_that_part(site, caplog):
    s = site(SERIES_WORKFLOW)
    ct = new_uid()
    sops = s.receive(ct, "CT", 4, T0)
    [first] = s.assembler.tick(T0 + 11)
    s.store.set_job_status(first.id, "ok")
    forget(s, ct)
    # one new slice of the emptied series: running now would run on that one slice
    late = s.receive(ct, "CT", 1, T0 + 1000)
    with caplog.at_level(logging.WARNING, logger="rtauto.assembler"):
        assert s.assembler.tick(T0 + 1011) == []
    assert "send the whole series again" in caplog.text
    [event] = s.store.audit_events("series.partial")
    assert event.subject == ct and event.data == {"earlier_job": first.id}
    # a part of it sent again: what the first job read already, nothing new to run
    forget(s, ct)
    s.receive(ct, "CT", 2, T0 + 2000, sops=sops[:2])
    assert s.assembler.tick(T0 + 2011) == []
    # the whole series sent again, with the new slice: the workflow runs on all of it
    s.receive(ct, "CT", 3, T0 + 3000, sops=[*sops[2:], *late])
    [again] = s.assembler.tick(T0 + 3011)
    assert set(again.input_instances) == {*sops, *late}


def test_a_study_sent_in_part_after_retention_is_reported_once(site):
    s = site(STUDY_WORKFLOW)
    ct, plan = planned_study(s)
    forget(s, ct)
    s.receive(ct, "CT", 1, T0 + 1000)  # one new slice of the emptied CT
    for second in range(1006, 1040):  # the study stays pending until it is quiet
        assert s.assembler.tick(T0 + second) == []
    [event] = s.store.audit_events("study.partial")
    assert event.subject == s.study
    assert len(s.jobs()) == 1
