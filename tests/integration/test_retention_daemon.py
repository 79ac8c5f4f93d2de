"""Retention in a running daemon: what passed its period goes while it keeps receiving."""

from __future__ import annotations

import json
import urllib.request

import pytest

from rtauto.testing import free_port, storescu, wait_until, write_ct_series

from .test_daemon import count_workflow

pytestmark = pytest.mark.integration

# periods of a few seconds (days are floats) so that the test sees several passes
SECONDS = 1 / 86400


def test_the_daemon_removes_what_passed_its_period_and_keeps_receiving(daemon_factory, tmp_path):
    web_port = free_port()
    daemon = daemon_factory(
        {
            "web": {"enabled": True, "port": web_port},
            "retention": {
                # long enough for the checks between a job's end and the removal, under load
                "received_days": 20 * SECONDS,
                "jobs_days": 20 * SECONDS,
                "interval_minutes": 1 / 60,
            },
        }
    )
    daemon.add_workflow("count", count_workflow("2s"))
    daemon.start()
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=10)
    spool = daemon.home / "spool" / series.study_instance_uid

    storescu(daemon.port, series.files)
    [job] = daemon.wait_for_jobs("count-ct")
    assert job.status == "ok", daemon.log()[-4000:]
    assert len(list(spool.glob("*/*.dcm"))) == 10

    def purged() -> bool:
        store = daemon.store()
        try:
            return (
                store.get_job(job.id) is None
                and store.get_series(series.series_instance_uid).instance_count == 0
                and not spool.exists()
            )
        finally:
            store.close()

    try:
        wait_until(purged, timeout=120, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{daemon.log()[-4000:]}") from None
    assert "retention removed 10 instance(s) in 1 series of 1 patient(s)" in daemon.log()
    assert not (daemon.home / "jobs" / job.id).exists()
    store = daemon.store()
    try:
        events = store.audit_events("retention.purged")
        assert sum(e.data["instances"] for e in events) == 10
        assert sum(e.data["jobs"] for e in events) == 1
    finally:
        store.close()

    def get(path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}{path}", timeout=10) as r:
            return r.read().decode()

    assert "rtauto_instances_stored 0" in get("/metrics")
    retention = json.loads(get("/api/status"))["retention"]
    assert retention["enabled"] is True
    assert retention["last_removed"]["summary"].startswith("retention removed ")

    # the same series again: stored afresh (into the folders retention removed), indexed with
    # the header attributes its series row keeps, and run again (its job was removed)
    assert daemon.echo()
    storescu(daemon.port, series.files)
    again = daemon.wait_for_jobs("count-ct")
    assert [j.status for j in again] == ["ok"] and again[0].id != job.id
    store = daemon.store()
    try:
        assert store.steps_of(again[0].id)[0].outputs["instances"] == 10
    finally:
        store.close()
    assert "Traceback" not in daemon.log()
