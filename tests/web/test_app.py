"""The dashboard, REST API and metrics over a real job store (FastAPI's test client)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from rtauto.config import Settings
from rtauto.ingest.spool import free_bytes
from rtauto.store import Store
from rtauto.store.models import Delivery, Job
from rtauto.web.app import create_app

with warnings.catch_warnings():
    # starlette's test client warns about its own httpx dependency on import
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def _client(settings: Settings) -> tuple[TestClient, Store]:
    settings.ensure_dirs()
    store = Store(settings.database_url, migrate=True)
    return TestClient(create_app(store, settings)), store


def _routing_job(settings: Settings, store: Store) -> Job:
    """A job of one routing step, as the assembler makes it."""
    return store.create_job(
        dedupe_key="k",
        workflow_name="w",
        workflow_hash="0" * 64,
        workflow_text="",
        workflow_path="",
        scope="series",
        study_uid="1.2",
        series_uid="1.2.1",
        input_series=["1.2.1"],
        step_ids=[("send", "route.dicom")],
        jobs_dir=settings.jobs_dir,
    )


def _dead_letter(store: Store, job_id: str, **values: Any) -> None:
    """An item the job's routing step gave up on (a dead letter)."""
    with store.session() as s:
        s.add(
            Delivery(
                job_id=job_id,
                step_id="send",
                item_key="1.2.3",
                path="/x/RS.dcm",
                destination="tps",
                status="dead",
                updated_at=1.0,
                **values,
            )
        )


def test_ingest_pause_below_the_free_space_reserve_is_shown(tmp_path: Path):
    settings = Settings(home=tmp_path / "home")
    client, store = _client(settings)
    try:
        assert client.get("/api/status").json()["ingest_paused"] is False
        assert "rtauto_ingest_paused 0" in client.get("/metrics").text
        assert "Ingest paused" not in client.get("/").text

        settings.min_free_mb = free_bytes(settings.home) / 1e6 + 1e6  # more than there is
        status = client.get("/api/status").json()
        assert status["ingest_paused"] is True
        assert status["min_free_bytes"] == int(settings.min_free_mb * 1e6)
        assert "rtauto_ingest_paused 1" in client.get("/metrics").text
        page = client.get("/").text
        assert "Ingest paused: the disk is nearly full" in page and "0xA700" in page

        settings.min_free_mb = 0  # the reserve turned off: never paused
        assert client.get("/api/status").json()["ingest_paused"] is False
    finally:
        store.close()


def test_metrics_name_every_job_and_delivery_status_and_dead_letters_are_listed(tmp_path: Path):
    settings = Settings(home=tmp_path / "home")
    client, store = _client(settings)
    try:
        metrics = client.get("/metrics").text
        # a fresh daemon: zeros, so an alert on failures sees 0 rather than nothing
        for status in ("pending", "running", "ok", "fail"):
            assert f'rtauto_jobs{{status="{status}"}} 0' in metrics
        assert 'rtauto_deliveries{status="dead"} 0' in metrics
        assert client.get("/api/dead-letters").json() == []

        job = _routing_job(settings, store)
        _dead_letter(store, job.id, attempts=3, last_error="TPS@127.0.0.1:104: cannot connect")
        assert 'rtauto_deliveries{status="dead"} 1' in client.get("/metrics").text
        [dead] = client.get("/api/dead-letters").json()
        assert dead["destination"] == "tps" and "cannot connect" in dead["error"]
    finally:
        store.close()


def test_jobs_awaiting_redelivery_and_resumed_jobs_are_shown(tmp_path: Path):
    settings = Settings(home=tmp_path / "home")
    client, store = _client(settings)
    try:
        assert "rtauto_dead_letter_jobs 0" in client.get("/metrics").text
        job = _routing_job(settings, store)
        store.finish_step(job.id, "send", status="fail", error="1 of 1 item(s) ... dead-letter")
        store.set_job_status(job.id, "fail", error="step send failed")
        _dead_letter(store, job.id, attempts=10)
        assert "rtauto_dead_letter_jobs 1" in client.get("/metrics").text
        status = client.get("/api/status").json()["dead_letters"]
        assert status == {
            "retry_enabled": True,
            "retry_every_minutes": 15.0,
            "retry_for_hours": 72.0,
            "jobs_retried": 1,
        }
        assert "jobs awaiting redelivery<br><b>1</b>" in client.get("/").text
        assert "Resumed jobs" not in client.get("/").text

        assert store.resume_job(job.id, ["send"], by="daemon", reason="delivered")
        assert "rtauto_dead_letter_jobs 0" in client.get("/metrics").text
        page = client.get("/").text
        assert "<h2>Resumed jobs</h2>" in page and f"<code>{job.id[:12]}</code>" in page
        [resume] = client.get(f"/api/jobs/{job.id}").json()["resumes"]
        assert resume["by"] == "daemon" and resume["steps"] == ["send"]
        assert resume["earlier_error"] == "step send failed"

        settings.dead_letters.retry_for_hours = 0  # no background retry: none awaited
        assert client.get("/api/status").json()["dead_letters"]["retry_enabled"] is False
    finally:
        store.close()
