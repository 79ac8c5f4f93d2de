"""The daemon's background retry of dead letters: the TPS is down when a job routes and comes
up later; the daemon delivers what waited by itself, and the job ends OK."""

from __future__ import annotations

import json
import urllib.request

import pytest

from rtauto.testing import ReceivingSCP, free_port, storescu, wait_until, write_ct_series

pytestmark = pytest.mark.integration

# the image of the day to the TPS, then a step that needs it there (as a REG does)
TO_TPS = """\
name: to-tps
trigger: {{modality: CT}}
completion: {{series_quiet: 1s}}
steps:
  - id: prepare
    uses: site.sleep
    with: {{seconds: 0}}
  - id: send-image
    uses: route.dicom
    needs: [prepare]
    with: {{destination: tps, send: inputs}}
    retry: {{max_attempts: 2, backoff: 0.5s}}
  - id: after
    uses: site.sleep
    needs: [send-image]
    with: {{seconds: 0}}
destinations:
  tps: {{ae_title: TPS, host: 127.0.0.1, port: {port}, timeout: 5}}
"""


def test_dead_letters_are_delivered_by_the_daemon_once_the_tps_is_back(daemon_factory, tmp_path):
    web_port = free_port()
    tps = ReceivingSCP(tmp_path / "tps", ae_title="TPS")  # nothing listens on its port yet
    daemon = daemon_factory(
        {
            "web": {"enabled": True, "port": web_port},
            # a pass every 2 s, for jobs that ended within the hour
            "dead_letters": {"retry_every_minutes": 2 / 60, "retry_for_hours": 1},
        }
    )
    daemon.add_workflow("to-tps", TO_TPS.format(port=tps.port))
    daemon.start()
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=5)
    storescu(daemon.port, series.files)
    [job] = daemon.wait_for_jobs("to-tps")
    assert job.status == "fail", daemon.log()[-4000:]

    def get(path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}{path}", timeout=10) as r:
            return r.read().decode()

    def retried_while_down() -> bool:
        store = daemon.store()
        try:
            dead = [d for d in store.deliveries_of(job.id) if d.status == "dead"]
            return len(dead) == 5 and all(d.last_error.startswith("retry: ") for d in dead)
        finally:
            store.close()

    # passes while the TPS is down leave the job FAIL, its items in the dead-letter list
    wait_until(retried_while_down, timeout=120, interval=0.3)
    assert [j.status for j in daemon.jobs("to-tps")] == ["fail"]
    metrics = get("/metrics")
    assert "rtauto_dead_letter_jobs 1" in metrics and 'rtauto_jobs{status="fail"} 1' in metrics
    assert "still undelivered" in daemon.log()

    with tps:

        def ended_ok() -> bool:
            return [j.status for j in daemon.jobs("to-tps")] == ["ok"]

        try:
            wait_until(ended_ok, timeout=180, interval=0.3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{daemon.log()[-6000:]}") from None
        received = list(tps.received)

    assert sorted(received) == sorted(series.sop_instance_uids)  # each slice once
    store = daemon.store()
    try:
        steps = {s.step_id: s for s in store.steps_of(job.id)}
        assert {s.status for s in steps.values()} == {"ok"}
        assert steps["prepare"].attempts == 1  # ended ok before: not run again
        # the routing step ran again and found every slice delivered by the retry
        assert steps["send-image"].outputs["already_delivered"] == 5
        assert steps["send-image"].outputs["delivered"] == 0
        assert {d.status for d in store.deliveries_of(job.id)} == {"delivered"}
        [event] = store.audit_events("job.resumed")
        assert (event.subject, event.data["by"]) == (job.id, "daemon")
        assert event.data["steps"] == ["send-image", "after"]
        [retried] = store.audit_events("delivery.retried")
        assert "delivered 5 of 5" in retried.message
    finally:
        store.close()
    metrics = get("/metrics")
    assert "rtauto_dead_letter_jobs 0" in metrics
    assert 'rtauto_deliveries{status="dead"} 0' in metrics
    assert json.loads(get("/api/dead-letters")) == []
    assert "Resumed jobs" in get("/") and f"resumed job(s) {job.id[:8]}" in daemon.log()
    assert "Traceback" not in daemon.log()
