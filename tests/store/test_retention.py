"""Retention: what goes once its period has passed, and what is kept whatever its age."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import update

from rtauto.config import RetentionSettings, Settings
from rtauto.ingest.spool import RefusedInstance, Spool
from rtauto.locks import exclusive_lock
from rtauto.retention import (
    DAY,
    KEPT_ARRIVED,
    KEPT_FILE_MISSING,
    KEPT_INCOMPLETE,
    KEPT_RECEIVED_AGAIN,
    KEPT_STUDY_HELD,
    KEPT_UNDELIVERED,
    KEPT_UNFINISHED_JOB,
    LOCK_FILE,
    PurgeRunning,
    purge,
)
from rtauto.store import Store
from rtauto.store.models import AuditEvent, Instance, Job, Series, Study
from rtauto.testing import SyntheticSeries, write_ct_series
from rtauto.uids import new_uid

RECEIVED = RetentionSettings(received_days=30)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(home=tmp_path / "home")
    s.ensure_dirs()
    return s


@pytest.fixture
def store(settings: Settings):
    handle = Store(settings.database_url, migrate=True)
    yield handle
    handle.close()


def receive(settings: Settings, store: Store, series: SyntheticSeries) -> None:
    """Ingest a series as a drop folder does, indexed and seen complete by the assembler."""
    spool = Spool(settings)
    try:
        store.record_instances([spool.ingest_file(f) for f in series.files])
    finally:
        spool.close()
    assert store.mark_series_complete(series.series_instance_uid)


def age(settings: Settings, store: Store, series: SyntheticSeries, days: float) -> None:
    """Make a received series look ``days`` old: its rows and its spool files."""
    then = time.time() - days * DAY
    with store.session() as s:
        s.execute(
            update(Series)
            .where(Series.series_uid == series.series_instance_uid)
            .values(first_received=then, last_received=then)
        )
        s.execute(
            update(Instance)
            .where(Instance.series_uid == series.series_instance_uid)
            .values(received_at=then)
        )
        s.execute(
            update(Study)
            .where(Study.study_uid == series.study_instance_uid)
            .values(first_received=then, last_received=then)
        )
    for path in spool_files(settings, series):
        os.utime(path, (then, then))


def spool_files(settings: Settings, series: SyntheticSeries) -> list[Path]:
    folder = settings.spool_dir / series.study_instance_uid / series.series_instance_uid
    return sorted(folder.glob("*.dcm"))


def ct(tmp_path: Path, name: str, patient: str, **kw) -> SyntheticSeries:
    return write_ct_series(
        tmp_path / name, rows=16, cols=16, slices=4, patient_id=patient, seed=len(name), **kw
    )


def one_more_slice(tmp_path: Path, series: SyntheticSeries) -> Path:
    """A further instance of ``series`` (a slice its sender sends late)."""
    ds = pydicom.dcmread(series.files[-1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    ds.InstanceNumber = len(series.files) + 1
    path = tmp_path / "late.dcm"
    ds.save_as(path)
    return path


def make_job(settings: Settings, store: Store, study_uid: str, status: str, **kw) -> Job:
    job = store.create_job(
        dedupe_key=os.urandom(8).hex(),
        workflow_name="wf",
        workflow_hash="0" * 64,
        workflow_text="name: wf",
        workflow_path="",
        scope="study",
        study_uid=study_uid,
        series_uid=None,
        input_series=[],
        step_ids=[("a", "route.folder")],
        jobs_dir=settings.jobs_dir,
        **kw,
    )
    assert job is not None
    store.set_job_status(job.id, status)
    return job


def end_job(store: Store, job: Job, days_ago: float) -> None:
    with store.session() as s:
        s.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(
                created_at=time.time() - days_ago * DAY, finished_at=time.time() - days_ago * DAY
            )
        )


def test_a_patient_is_removed_whole_once_nothing_of_theirs_arrived_for_the_period(
    tmp_path, settings, store
):
    old_ct = ct(tmp_path, "old-ct", "PAT-OLD")
    old_cbct = ct(tmp_path, "old-cbct", "PAT-OLD")  # another study of the same patient
    recent = ct(tmp_path, "recent", "PAT-NEW")
    for series in (old_ct, old_cbct, recent):
        receive(settings, store, series)
    age(settings, store, old_ct, 60)
    age(settings, store, old_cbct, 31)
    age(settings, store, recent, 29)

    report = purge(settings, store, retention=RECEIVED)

    assert (report.patients, report.series, report.instances) == (1, 2, 8)
    assert report.instance_bytes == sum(f.stat().st_size for f in old_ct.files + old_cbct.files)
    for gone in (old_ct, old_cbct):
        assert not (settings.spool_dir / gone.study_instance_uid).exists()
        # the series row stays, emptied: a re-send keeps the attributes triggers match on
        assert store.get_series(gone.series_instance_uid).instance_count == 0
        assert store.get_series(gone.series_instance_uid).attributes
        assert store.instances_of_series(gone.series_instance_uid) == []
    assert len(spool_files(settings, recent)) == 4
    assert store.get_series(recent.series_instance_uid).instance_count == 4
    assert store.get_study(recent.study_instance_uid) is not None
    events = store.audit_events("retention.purged")
    assert len(events) == 1 and events[0].data["instances"] == 8


def test_the_planning_ct_stays_while_the_patient_keeps_arriving(tmp_path, settings, store):
    planning = ct(tmp_path, "planning", "PAT-1")
    cbct = ct(tmp_path, "cbct", "PAT-1")
    receive(settings, store, planning)
    receive(settings, store, cbct)
    age(settings, store, planning, 45)
    age(settings, store, cbct, 1)

    report = purge(settings, store, retention=RECEIVED)

    assert report.instances == 0
    assert len(spool_files(settings, planning)) == 4
    assert store.get_series(planning.series_instance_uid) is not None


def test_a_pending_or_running_job_keeps_its_patient(tmp_path, settings, store):
    series = ct(tmp_path, "ct", "PAT-1")
    receive(settings, store, series)
    age(settings, store, series, 40)
    job = make_job(settings, store, series.study_instance_uid, "running")

    report = purge(settings, store, retention=RECEIVED)
    assert report.instances == 0 and report.kept == {KEPT_UNFINISHED_JOB: 1}
    assert len(spool_files(settings, series)) == 4

    store.set_job_status(job.id, "ok")
    assert purge(settings, store, retention=RECEIVED).instances == 4
    assert spool_files(settings, series) == []


def test_a_result_not_delivered_keeps_the_patients_received_data(tmp_path, settings, store):
    # a workflow that forwards its inputs: rtauto replay sends the spool's files again
    series = ct(tmp_path, "ct", "PAT-1")
    receive(settings, store, series)
    age(settings, store, series, 40)
    job = make_job(settings, store, series.study_instance_uid, "fail")
    dead = store.delivery(job.id, "a", "1.2.3", str(spool_files(settings, series)[0]), "tps")
    store.update_delivery(dead.id, status="dead")

    report = purge(settings, store, retention=RECEIVED)
    assert report.instances == 0 and report.kept == {KEPT_UNFINISHED_JOB: 1}
    assert len(spool_files(settings, series)) == 4

    store.update_delivery(dead.id, status="delivered")  # replayed
    assert purge(settings, store, retention=RECEIVED).instances == 4


def test_an_item_an_alternate_destination_took_counts_as_delivered(tmp_path, settings, store):
    series = ct(tmp_path, "ct", "PAT-1")
    receive(settings, store, series)
    age(settings, store, series, 40)
    job = make_job(settings, store, series.study_instance_uid, "ok")
    end_job(store, job, 100)
    primary = store.delivery(job.id, "a", "1.2.3", "RS.dcm", "tps")
    store.update_delivery(primary.id, status="failed")  # the TPS was down
    alternate = store.delivery(job.id, "a", "1.2.3", "RS.dcm", "tps-backup")
    store.update_delivery(alternate.id, status="delivered")

    report = purge(settings, store, retention=RetentionSettings(received_days=30, jobs_days=90))

    assert (report.instances, report.jobs) == (4, 1) and report.kept == {}
    assert store.get_job(job.id) is None


def test_a_series_not_yet_seen_complete_keeps_its_patient(tmp_path, settings, store):
    series = ct(tmp_path, "ct", "PAT-1")
    receive(settings, store, series)
    age(settings, store, series, 40)
    with store.session() as s:
        s.execute(update(Series).values(completed_at=None))

    report = purge(settings, store, retention=RECEIVED)

    assert report.instances == 0 and report.kept == {KEPT_INCOMPLETE: 1}
    assert len(spool_files(settings, series)) == 4


def test_an_instance_received_again_within_the_period_keeps_its_patient_whole(
    tmp_path, settings, store
):
    series = ct(tmp_path, "ct", "PAT-1")
    other = ct(tmp_path, "cbct", "PAT-1")
    for each in (series, other):
        receive(settings, store, each)
        age(settings, store, each, 40)
    kept = spool_files(settings, series)[0]
    content = kept.read_bytes()
    resent = next(f for f in series.files if f.read_bytes() == content)
    spool = Spool(settings)
    record = spool.ingest_file(resent)  # the same instance again: no second file
    spool.close()
    assert not store.record_instances([record])[0]
    assert kept.stat().st_mtime > time.time() - 60  # received now

    report = purge(settings, store, retention=RECEIVED)

    # no series goes in part (a partial series would pass for a complete one)
    assert report.instances == report.series == report.patients == 0
    assert report.kept == {KEPT_RECEIVED_AGAIN: 1}
    assert len(spool_files(settings, series)) == len(spool_files(settings, other)) == 4
    assert kept.read_bytes() == content
    assert store.get_series(series.series_instance_uid).instance_count == 4

    # once the re-send is past the period too, the patient goes whole
    then = time.time() - 31 * DAY
    os.utime(kept, (then, then))
    report = purge(settings, store, retention=RECEIVED)
    assert (report.patients, report.series, report.instances) == (1, 2, 8)
    assert spool_files(settings, series) == spool_files(settings, other) == []


def test_a_series_with_a_file_missing_is_kept_and_an_unmounted_spool_loses_no_row(
    tmp_path, settings, store
):
    series = ct(tmp_path, "ct", "PAT-1")
    other = ct(tmp_path, "other", "PAT-2")
    for each in (series, other):
        receive(settings, store, each)
        age(settings, store, each, 40)
    spool_files(settings, series)[0].unlink()  # removed by hand

    report = purge(settings, store, retention=RECEIVED)

    assert (report.patients, report.series, report.instances) == (1, 1, 4)  # PAT-2 only
    assert report.kept == {KEPT_FILE_MISSING: 1}
    assert len(store.instances_of_series(series.series_instance_uid)) == 4
    assert len(spool_files(settings, series)) == 3

    # the spool's files out of reach (a share not mounted): every row stays
    receive(settings, store, other)  # PAT-2 again
    age(settings, store, other, 40)
    settings.spool_dir.rename(tmp_path / "spool-elsewhere")
    settings.spool_dir.mkdir()
    report = purge(settings, store, retention=RECEIVED)
    assert report.instances == 0 and report.kept == {KEPT_FILE_MISSING: 2}
    assert store.counts()["instances"] == 8


def test_a_file_named_in_the_series_while_the_pass_runs_keeps_it_whole(
    tmp_path, settings, store, monkeypatch
):
    from rtauto.retention import _Pass

    series = ct(tmp_path, "ct", "PAT-1")
    late = one_more_slice(tmp_path, series)
    receive(settings, store, series)
    age(settings, store, series, 40)
    listed = _Pass._files_of

    def then_a_slice_arrives(self, root, series_uid, cutoff):
        found = listed(self, root, series_uid, cutoff)
        spool = Spool(settings)
        spool.ingest_file(late)  # named in the spool; its row is not indexed yet
        spool.close()
        return found

    monkeypatch.setattr(_Pass, "_files_of", then_a_slice_arrives)
    report = purge(settings, store, retention=RECEIVED)

    assert report.instances == 0 and report.kept == {KEPT_ARRIVED: 1}
    assert len(spool_files(settings, series)) == 5
    assert len(store.instances_of_series(series.series_instance_uid)) == 4


def test_a_patient_who_comes_back_while_the_pass_runs_keeps_everything(
    tmp_path, settings, store, monkeypatch
):
    from rtauto.retention import _Pass

    planning = ct(tmp_path, "planning", "PAT-1")
    receive(settings, store, planning)
    age(settings, store, planning, 40)
    cbct = ct(tmp_path, "cbct", "PAT-1")  # another study of the same patient
    listed = _Pass._files_of

    def then_the_patient_comes_back(self, root, series_uid, cutoff):
        found = listed(self, root, series_uid, cutoff)
        receive(settings, store, cbct)  # the image of the day arrives now...
        make_job(settings, store, cbct.study_instance_uid, "pending")  # ...to read the CT
        return found

    monkeypatch.setattr(_Pass, "_files_of", then_the_patient_comes_back)
    report = purge(settings, store, retention=RECEIVED)

    assert report.instances == 0 and report.kept == {KEPT_ARRIVED: 1}
    assert len(spool_files(settings, planning)) == 4
    assert [r.series_uid for r in store.series_of_patient("PAT-1", modality="CT")] == [
        cbct.series_instance_uid,
        planning.series_instance_uid,
    ]


def test_a_crash_while_files_are_removed_leaves_no_row_naming_a_missing_file(
    tmp_path, settings, store, monkeypatch
):
    series = ct(tmp_path, "ct", "PAT-1")
    receive(settings, store, series)
    age(settings, store, series, 40)
    unlink = Path.unlink
    removed = []

    def killed_after_the_first(self, *args, **kwargs):
        if removed:
            raise SystemExit("kill -9")  # the daemon dies here
        removed.append(self)
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_after_the_first)
    with pytest.raises(SystemExit):
        purge(settings, store, retention=RECEIVED)
    monkeypatch.undo()
    # the rows went first: the files left are indexed again at the start, and go next time
    assert store.instances_of_series(series.series_instance_uid) == []
    assert len(spool_files(settings, series)) == 3
    spool = Spool(settings)
    spool.reconcile(store)
    spool.close()
    assert len(store.instances_of_series(series.series_instance_uid)) == 3
    store.mark_series_complete(series.series_instance_uid)
    age(settings, store, series, 40)
    report = purge(settings, store, retention=RECEIVED)
    assert report.instances == 3 and spool_files(settings, series) == []
    assert store.get_series(series.series_instance_uid).instance_count == 0


def test_removing_a_series_counts_down_by_the_rows_deleted(tmp_path, settings, store):
    from rtauto.retention import _forget_instances

    series = ct(tmp_path, "ct", "PAT-1")
    receive(settings, store, series)
    gone = [i.sop_uid for i in store.instances_of_series(series.series_instance_uid)]
    late = one_more_slice(tmp_path, series)
    spool = Spool(settings)
    # indexed by a receiving process between the pass's look and its delete
    assert store.record_instances([spool.ingest_file(late)]) == [True]
    spool.close()

    _forget_instances(store, series.series_instance_uid, [*gone, "1.2.3.404"])

    assert store.get_series(series.series_instance_uid).instance_count == 1
    assert len(store.instances_of_series(series.series_instance_uid)) == 1


def test_an_emptied_series_is_absent_until_it_is_sent_again(tmp_path, settings, store):
    planning = ct(tmp_path, "planning", "PAT-1")
    receive(settings, store, planning)
    age(settings, store, planning, 40)
    assert purge(settings, store, retention=RECEIVED).series == 1

    # a study trigger (CT + plan) and a step looking up the patient's CT see no CT
    assert store.series_of_study(planning.study_instance_uid) == []
    assert store.series_of_patient("PAT-1", modality="CT") == []
    assert store.get_series(planning.series_instance_uid) is not None  # the row stays

    receive(settings, store, planning)  # sent again
    assert [r.series_uid for r in store.series_of_study(planning.study_instance_uid)] == [
        planning.series_instance_uid
    ]
    assert len(store.series_of_patient("PAT-1", modality="CT")) == 1


def test_a_job_record_stays_while_its_study_holds_received_data(tmp_path, settings, store):
    series = ct(tmp_path, "ct", "PAT-1")
    receive(settings, store, series)
    job = make_job(settings, store, series.study_instance_uid, "ok")
    Path(job.work_dir).mkdir(parents=True)
    (Path(job.work_dir) / "RS.dcm").write_bytes(b"x" * 100)
    end_job(store, job, 100)
    jobs_only = RetentionSettings(jobs_days=90)

    report = purge(settings, store, retention=jobs_only)

    # the folder goes; the record stays: it keeps a series sent again from running again
    assert (report.jobs, report.job_folders, report.job_bytes) == (0, 1, 100)
    assert report.kept == {KEPT_STUDY_HELD: 1}
    assert not Path(job.work_dir).exists() and store.get_job(job.id) is not None
    again = purge(settings, store, retention=jobs_only)
    assert (again.jobs, again.job_folders) == (0, 0) and not again.removed_anything

    # once the study's received data is gone, the record goes in the same pass
    age(settings, store, series, 40)
    both = RetentionSettings(received_days=30, jobs_days=90)
    dry = purge(settings, store, retention=both, dry_run=True)
    real = purge(settings, store, retention=both)
    assert (dry.series, dry.jobs) == (real.series, real.jobs) == (1, 1)
    assert store.get_job(job.id) is None


def test_the_lock_files_are_taken_read_only(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root, to make a lock file that another user may read but not write")
    folder = Path(tempfile.mkdtemp(prefix="rtauto-lock-"))
    try:
        folder.chmod(0o755)
        lock = folder / "retention.lock"
        os.close(exclusive_lock(lock))  # made by root, 0644
        home = Settings(home=folder / "home")
        with Spool(home).exclusive() as held:  # the spool's lock file, made by root too
            assert held
        child = os.fork()
        if child == 0:  # the daemon's own user, without write access to the lock files
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                code = 0 if exclusive_lock(lock) is not None else 4
                with Spool(home).exclusive(timeout=5) as held:
                    code = code if held else 5
            finally:
                os._exit(code)
        _pid, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(folder)


def test_a_dry_run_removes_nothing_and_reports_what_would_go(tmp_path, settings, store):
    series = ct(tmp_path, "ct", "PAT-1")
    receive(settings, store, series)
    age(settings, store, series, 40)
    job = make_job(settings, store, series.study_instance_uid, "ok")
    end_job(store, job, 100)
    retention = RetentionSettings(received_days=30, jobs_days=90)

    dry = purge(settings, store, retention=retention, dry_run=True)
    assert len(spool_files(settings, series)) == 4
    assert store.get_job(job.id) is not None
    assert store.audit_events("retention.purged") == []

    real = purge(settings, store, retention=retention)
    assert dry.dry_run and not real.dry_run
    assert (
        (dry.patients, dry.series, dry.instances, dry.instance_bytes, dry.jobs)
        == (
            real.patients,
            real.series,
            real.instances,
            real.instance_bytes,
            real.jobs,
        )
        == (1, 1, 4, real.instance_bytes, 1)
    )


def test_ended_jobs_go_with_their_folders_unless_a_result_is_undelivered(tmp_path, settings, store):
    retention = RetentionSettings(jobs_days=90)

    def job_with_folder(days_ago: float, status: str = "ok", **kw) -> tuple[Job, Path]:
        job = make_job(settings, store, "1.2.3", status, **kw)
        folder = Path(job.work_dir)
        (folder / "contour").mkdir(parents=True)
        (folder / "contour" / "RS.dcm").write_bytes(b"x" * 1000)
        artifact = {"path": folder / "contour" / "RS.dcm", "kind": "dicom", "modality": "RTSTRUCT"}
        store.finish_step(job.id, "a", status="ok", summary="done", artifacts=[artifact])
        end_job(store, job, days_ago)
        return job, folder

    old, old_folder = job_with_folder(100)
    delivered = store.delivery(old.id, "a", "1.2.3.4", "RS.dcm", "tps")
    store.update_delivery(delivered.id, status="delivered")
    dead, dead_folder = job_with_folder(100, "fail")
    store.update_delivery(
        store.delivery(dead.id, "a", "1.2.3.5", "RS.dcm", "tps").id, status="dead"
    )
    recent, recent_folder = job_with_folder(10)
    outside = tmp_path / "run-out"
    theirs, theirs_folder = job_with_folder(100, work_dir=outside)
    unfinished = make_job(settings, store, "1.2.3", "pending")
    end_job(store, unfinished, 100)

    report = purge(settings, store, retention=retention)

    assert report.jobs == 2 and report.kept == {KEPT_UNDELIVERED: 1}
    assert report.job_bytes == 1000  # the folder outside HOME/jobs is not counted: not removed
    assert not old_folder.exists() and store.get_job(old.id) is None
    assert store.deliveries_of(old.id) == [] and store.steps_of(old.id) == []
    assert store.artifacts_of(old.id) == [] and len(store.artifacts_of(dead.id)) == 1
    assert theirs_folder.exists() and store.get_job(theirs.id) is None
    for kept, folder in ((dead, dead_folder), (recent, recent_folder)):
        assert folder.exists() and store.get_job(kept.id) is not None
    assert store.get_job(unfinished.id) is not None
    assert settings.jobs_dir.is_dir()


def test_quarantine_and_audit_go_by_age(tmp_path, settings, store):
    spool = Spool(settings)
    refused = []
    for name in ("old.txt", "new.txt"):
        path = tmp_path / name
        path.write_text("not DICOM")
        with pytest.raises(RefusedInstance) as exc:
            spool.ingest_file(path)
        refused.append(exc.value.quarantined)
    spool.close()
    then = time.time() - 40 * DAY
    for path in (refused[0], refused[0].with_suffix(".json")):
        os.utime(path, (then, then))
    with store.session() as s:
        s.add(AuditEvent(ts=datetime.now(UTC) - timedelta(days=400), kind="job.created"))
    store.audit("job.created", "recent")

    report = purge(settings, store, retention=RetentionSettings(quarantine_days=30, audit_days=365))

    assert report.quarantined_files == 1 and report.audit_events == 1
    assert sorted(p.name for p in settings.quarantine_dir.iterdir()) == sorted(
        [refused[1].name, refused[1].with_suffix(".json").name]
    )
    assert [e.subject for e in store.audit_events("job.created")] == ["recent"]


def test_a_receiver_waits_while_retention_removes_files(tmp_path, settings, store):
    series = ct(tmp_path, "ct", "PAT-1")
    spool = Spool(settings)
    done = threading.Event()

    def receive_one() -> None:
        spool.ingest_file(series.files[0])
        done.set()

    with Spool(settings).exclusive() as held:
        assert held
        worker = threading.Thread(target=receive_one)
        worker.start()
        assert not done.wait(0.5)  # it cannot name its file while the lock is held
    worker.join(30)
    assert done.is_set() and len(spool_files(settings, series)) == 1
    with spool.exclusive(timeout=5) as held:
        assert held  # the receiver let go of its shared hold
    spool.close()


def test_one_pass_at_a_time(settings, store):
    fd = exclusive_lock(settings.home / LOCK_FILE)
    try:
        with pytest.raises(PurgeRunning):
            purge(settings, store, retention=RECEIVED)
        # a dry run only reads
        assert purge(settings, store, retention=RECEIVED, dry_run=True).instances == 0
    finally:
        os.close(fd)


def test_rtauto_purge_command(tmp_path, settings, store):
    series = ct(tmp_path, "ct", "PAT-1")
    receive(settings, store, series)
    age(settings, store, series, 40)
    cmd = [sys.executable, "-m", "rtauto.cli", "purge", "--home", str(settings.home)]

    nothing = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert nothing.returncode == 1 and "no retention period is set" in nothing.stderr

    dry = subprocess.run(
        [*cmd, "--received-days", "30", "--dry-run", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["instances"] == 4
    assert len(spool_files(settings, series)) == 4

    real = subprocess.run(
        [*cmd, "--received-days", "30"], capture_output=True, text=True, check=False
    )
    assert real.returncode == 0, real.stderr
    assert real.stdout.startswith("retention removed 4 instance(s) in 1 series of 1 patient(s)")
    assert spool_files(settings, series) == []

    bad = subprocess.run(
        [*cmd, "--received-days", "0"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "received_days" in bad.stderr
