"""The job store on its embedded default (SQLite, WAL) and on a real PostgreSQL server."""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from rtauto.store import InstanceRecord, Store
from rtauto.testing import free_port, instance_record

TABLES = {
    "instances",
    "series",
    "studies",
    "jobs",
    "steps",
    "artifacts",
    "deliveries",
    "audit",
    "watched_files",
}


def record(sop: str, series: str = "1.2.3.2", study: str = "1.2.3.1") -> InstanceRecord:
    return instance_record(sop, series, study, attributes={"SeriesDescription": "Planning CT"})


def exercise(store: Store, tmp_path: Path) -> None:
    """The store operations the daemon relies on, on any backend."""
    assert set(inspect(store.engine).get_table_names()) >= TABLES
    assert store.record_instance(record("1.2.3.4"))
    assert not store.record_instance(record("1.2.3.4")), "a re-sent instance is indexed once"
    assert store.record_instance(record("1.2.3.5"))
    [series] = store.pending_series()
    assert series.instance_count == 2
    assert series.attributes["SeriesDescription"] == "Planning CT"
    store.mark_series_complete(series.series_uid)
    assert store.pending_series() == []
    store.record_instance(record("1.2.3.6"))  # a late instance opens the series again
    assert [s.series_uid for s in store.pending_series()] == ["1.2.3.2"]

    # one transaction for the rows of concurrent associations: a known instance, a repeat
    # within the batch and a new series are told apart, counts add only new instances
    later = dataclasses.replace(record("1.2.3.8"), attributes={})  # series row exists
    first_of_new = record("1.2.3.9", series="1.2.3.20")
    flags = store.record_instances(
        [record("1.2.3.7"), record("1.2.3.4"), later, record("1.2.3.7"), first_of_new]
    )
    assert flags == [True, False, True, False, True]
    assert store.get_series("1.2.3.2").instance_count == 5
    assert store.get_series("1.2.3.2").attributes["SeriesDescription"] == "Planning CT"
    assert store.get_series("1.2.3.20").instance_count == 1
    assert store.get_series("1.2.3.20").attributes["SeriesDescription"] == "Planning CT"
    assert store.record_instances([]) == []

    # a study's waiting clock (max_wait) starts at its first arrival since it was complete
    def arrive(sop: str, at: float) -> None:
        store.record_instances([dataclasses.replace(record(sop, study="1.2.9"), received_at=at)])

    arrive("1.2.9.1", 1000.0)
    arrive("1.2.9.2", 1010.0)
    assert store.get_study("1.2.9").first_received == 1000.0  # still pending: unchanged
    assert store.mark_study_complete("1.2.9")
    arrive("1.2.9.3", 5000.0)  # a new plan months later
    assert store.get_study("1.2.9").first_received == 5000.0
    assert store.get_study("1.2.9").completed_at is None

    kwargs = dict(
        dedupe_key="wf:abc:series:1.2.3.2",
        workflow_name="wf",
        workflow_hash="abc",
        workflow_text="name: wf",
        workflow_path="wf.yaml",
        scope="series",
        study_uid="1.2.3.1",
        series_uid="1.2.3.2",
        input_series=["1.2.3.2"],
        step_ids=[("a", "x.a"), ("b", "x.b")],
        jobs_dir=tmp_path,
    )
    job = store.create_job(**kwargs)
    assert job is not None
    assert store.create_job(**kwargs) is None, "one job per workflow version and series"
    assert store.get_job(job.id[:8]).id == job.id
    store.finish_step(
        job.id,
        "a",
        status="ok",
        outputs={"outcome": "pass"},
        artifacts=[{"path": str(tmp_path / "a.dcm"), "kind": "RTSTRUCT", "sha256": "0" * 64}],
    )
    assert [s.status for s in sorted(store.steps_of(job.id), key=lambda s: s.step_id)] == [
        "ok",
        "pending",
    ]
    first = store.delivery(job.id, "a", "1.2.3.9", "a.dcm", "tps")
    again = store.delivery(job.id, "a", "1.2.3.9", "a.dcm", "tps")
    assert first.id == again.id
    store.update_delivery(first.id, status="delivered", attempts=1, delivered_at=time.time())
    assert [d.status for d in store.deliveries_of(job.id)] == ["delivered"]
    store.audit("test.event", job.id, "hello", value=1)
    assert store.audit_events("test.")[0].data == {"value": 1}

    # the instances a job reads, and a newer job that supersedes one not yet started
    newer = store.create_job(
        **{**kwargs, "dedupe_key": "wf:newer", "input_instances": ["1.2.3.4", "1.2.3.5"]}
    )
    assert store.get_job(newer.id).input_instances == ["1.2.3.4", "1.2.3.5"]
    assert store.get_job(job.id).input_instances is None
    waiting = store.create_job(**{**kwargs, "dedupe_key": "wf:waiting"})
    assert store.job_ids_of_series("wf", "1.2.3.2") == [job.id, newer.id, waiting.id]
    store.set_job_status(job.id, "running")  # begun: runs to its end
    ended = store.supersede_pending_jobs([job.id, waiting.id], newer.id, "superseded")
    assert ended == [waiting.id]
    assert store.job_statuses([job.id, waiting.id, newer.id]) == {
        job.id: "running",
        waiting.id: "fail",
        newer.id: "pending",
    }
    assert {s.status for s in store.steps_of(waiting.id)} == {"skipped"}

    # jobs that failed only for want of delivery: each failed step left dead letters
    def failed_job(key: str, dead: bool, series: str | None = None) -> str:
        # each on its own series: a newer job of the workflow on the same one replaces it
        series = series or f"1.2.3.{key}"
        made = store.create_job(
            **{**kwargs, "dedupe_key": key, "series_uid": series, "input_series": [series]}
        )
        store.finish_step(made.id, "a", status="ok")
        store.update_step(made.id, "b", attempts=3)
        store.finish_step(made.id, "b", status="fail", error="tps: cannot connect")
        if dead:
            row = store.delivery(made.id, "b", "1.2.3.4", "x.dcm", "tps")
            store.update_delivery(row.id, status="dead", attempts=3)
        store.set_job_status(made.id, "fail", error="step b failed")
        return made.id

    undelivered = failed_job("wf:undelivered", dead=True)
    failed_job("wf:bad-data", dead=False)
    failed_job("run:0123", dead=True)  # rtauto run's: no daemon runs it
    # a record left half sent: the step ended otherwise (a timeout), not retried in the
    # background
    half_sent = failed_job("wf:half-sent", dead=True)
    store.delivery(half_sent, "b", "1.2.3.5", "y.dcm", "tps")
    # a step that failed after it had delivered its items (on something else) gave up
    # delivering nothing: not retried either
    after_delivery = failed_job("wf:after-delivery", dead=False)
    row = store.delivery(after_delivery, "b", "1.2.3.4", "x.dcm", "tps")
    store.update_delivery(row.id, status="delivered", delivered_at=time.time() - 60)
    assert store.delivery_failed_jobs() == [undelivered]
    assert store.delivery_failed_jobs(with_dead_letters=True) == [undelivered]
    assert store.delivery_failed_jobs(ended_after=time.time() + 60) == []
    assert store.delivery_failed_jobs(ended_before=time.time() - 60) == []
    # its dead letters delivered since (a replay): no longer waiting, still to be resumed
    redelivered = failed_job("wf:redelivered", dead=True)
    for row in store.deliveries_of(redelivered):
        store.update_delivery(row.id, status="delivered", delivered_at=time.time())
    assert store.delivery_failed_jobs() == [undelivered, redelivered]
    assert store.delivery_failed_jobs(with_dead_letters=True) == [undelivered]
    # delivered by the same step to another destination (rtauto replay --to): no dead letter
    # is left, though the record at the destination that gave up stays dead
    elsewhere = failed_job("wf:elsewhere", dead=True)
    row = store.delivery(elsewhere, "b", "1.2.3.4", "x.dcm", "folder:/backup")
    store.update_delivery(row.id, status="delivered", delivered_at=time.time())
    assert store.delivery_failed_jobs() == [undelivered, redelivered, elsewhere]
    assert store.delivery_failed_jobs(with_dead_letters=True) == [undelivered]
    assert store.dead_letters_of(elsewhere) == []
    assert [d.item_key for d in store.dead_letters_of(undelivered)] == ["1.2.3.4"]

    # a newer job of the workflow on the same series replaced a job (the series grew, or
    # rtauto rerun): its dead letters are not retried, nor is it awaiting redelivery
    grown = failed_job("wf:grown-from", dead=True, series="1.2.3.40")
    assert store.replacing_job(grown) is None
    failed_job("run:4567", dead=False, series="1.2.3.40")  # rtauto run's replaces nothing
    other = store.create_job(
        **{**kwargs, "dedupe_key": "other", "workflow_name": "other", "series_uid": "1.2.3.40"}
    )  # another workflow's replaces nothing
    assert grown in store.delivery_failed_jobs(with_dead_letters=True)
    newer = store.create_job(**{**kwargs, "dedupe_key": "grown:1", "series_uid": "1.2.3.40"})
    assert grown not in store.delivery_failed_jobs()
    assert grown not in store.delivery_failed_jobs(with_dead_letters=True)
    assert store.replacing_job(grown).id == newer.id
    assert store.replacing_job(newer.id) is None and store.replacing_job(other.id) is None
    rerun = store.create_job(**{**kwargs, "dedupe_key": "rerun:1", "series_uid": "1.2.3.40"})
    assert store.replacing_job(grown).id == rerun.id  # the newest
    # study scope: a newer job of the workflow on the same study, whatever its series
    study_kwargs = {**kwargs, "scope": "study", "series_uid": None, "study_uid": "1.2.8"}
    study_job = store.create_job(**{**study_kwargs, "dedupe_key": "study:1"})
    store.create_job(**{**study_kwargs, "dedupe_key": "study:other", "study_uid": "1.2.7"})
    assert store.replacing_job(study_job.id) is None
    study_newer = store.create_job(**{**study_kwargs, "dedupe_key": "grown:2"})
    assert store.replacing_job(study_job.id).id == study_newer.id

    # the instances still indexed of those a job read
    assert store.held_instances(["1.2.3.4", "1.2.3.5", "1.2.3.4", "9.9.9"]) == {
        "1.2.3.4",
        "1.2.3.5",
    }

    # resumed once, however many ask at once: the update holds only while it is failed
    barrier = threading.Barrier(4)

    def resume(who: int) -> bool:
        barrier.wait()
        return store.resume_job(undelivered, ["b"], by=f"operator {who}", reason="test")

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(resume, range(4))) == [False, False, False, True]
    resumed = store.get_job(undelivered)
    assert (resumed.status, resumed.error, resumed.finished_at) == ("pending", None, None)
    steps = {s.step_id: s for s in store.steps_of(undelivered)}
    assert (steps["a"].status, steps["b"].status, steps["b"].attempts) == ("ok", "pending", 0)
    [event] = store.audit_events("job.resumed", subject=undelivered)
    assert event.data["steps"] == ["b"] and event.data["earlier_error"] == "step b failed"
    assert event.data["earlier_steps"]["b"]["attempts"] == 3
    assert event.message == f"resumed by {event.data['by']}: test; step(s) run again: b (fail)"
    assert store.delivery_failed_jobs() == [redelivered, elsewhere]
    assert not store.resume_job(job.id, ["a"], by="operator", reason="not failed")

    # a series is marked complete only as the caller saw it
    row = store.get_series("1.2.3.20")
    assert not store.mark_series_complete(row.series_uid, instance_count=row.instance_count + 1)
    assert store.mark_series_complete(row.series_uid, instance_count=row.instance_count)

    # what the folder watcher has read, per folder (a file read again replaces its record)
    drop = tmp_path / "drop"
    store.remember_watched_file(drop / "a.dcm", 10, 1_700_000_000_123_456_789, "ingested")
    store.remember_watched_file(drop / "b.txt", 5, 2, "refused")
    store.remember_watched_file(tmp_path / "drop2" / "c.dcm", 7, 3, "ingested")
    store.remember_watched_file(drop / "a.dcm", 11, 4, "ingested")
    assert store.watched_files(drop) == {str(drop / "a.dcm"): (11, 4), str(drop / "b.txt"): (5, 2)}
    store.forget_watched_files([drop / "a.dcm", drop / "never-seen"])
    assert store.watched_files(drop) == {str(drop / "b.txt"): (5, 2)}
    assert store.watched_files(tmp_path / "drop2") == {str(tmp_path / "drop2" / "c.dcm"): (7, 3)}
    # the folder is a prefix, not a pattern: '_' and '%' in it match only themselves
    assert store.watched_files(tmp_path / "dr_p") == {}
    assert store.watched_files(tmp_path / "dr%") == {}


def test_sqlite_store_is_in_wal_mode(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'rtauto.db'}", migrate=True)
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    exercise(store, tmp_path)
    store.close()
    # migrating an up-to-date store again is a no-op
    Store(f"sqlite:///{tmp_path / 'rtauto.db'}", migrate=True).close()


def test_the_portable_index_path_indexes_as_the_upserts_do(tmp_path):
    # the path for databases other than SQLite and PostgreSQL, run here on SQLite
    store = Store(f"sqlite:///{tmp_path / 'rtauto.db'}", migrate=True)
    try:
        at = [
            dataclasses.replace(record(f"1.2.9.{n}", study="1.2.9"), received_at=t)
            for n, t in ((1, 1000.0), (2, 1010.0), (3, 5000.0))
        ]
        assert store._record_instance_orm(at[0])
        assert not store._record_instance_orm(at[0])
        assert store._record_instance_orm(at[1])
        assert store.get_study("1.2.9").first_received == 1000.0
        assert store.get_series("1.2.3.2").instance_count == 2
        assert store.mark_study_complete("1.2.9")
        assert store._record_instance_orm(at[2])  # a new plan months later: waits afresh
        assert store.get_study("1.2.9").first_received == 5000.0
        assert store.get_study("1.2.9").completed_at is None
    finally:
        store.close()


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL server of this machine's installation, on loopback, for this test only."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries are not installed (make install installs them)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres system user to run the server as")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install rtauto[postgres])")
    # the server runs as the postgres user, who cannot enter pytest's private tmp folders
    root = Path(tempfile.mkdtemp(prefix="rtauto-pg-"))
    root.chmod(0o755)
    data = root / "pgdata"
    data.mkdir()
    shutil.chown(data, "postgres", "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(
        [*as_postgres, initdb, "-D", str(data), "-U", "rtauto", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    socket_dir = root / "sock"
    socket_dir.mkdir()
    shutil.chown(socket_dir, "postgres", "postgres")
    options = f"-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *as_postgres,
            pg_ctl,
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(data / "log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://rtauto@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_postgres, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def test_postgresql_store_by_url(postgres, tmp_path):
    store = Store(postgres, migrate=True)
    exercise(store, tmp_path)
    store.close()
    Store(postgres, migrate=True).close()
