"""The dashboard, REST API and metrics over a real job store (FastAPI's test client)."""

from __future__ import annotations

import warnings
from pathlib import Path

from rtauto.config import Settings
from rtauto.ingest.spool import free_bytes
from rtauto.store import Store
from rtauto.web.app import create_app

with warnings.catch_warnings():
    # starlette's test client warns about its own httpx dependency on import
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def _client(settings: Settings) -> tuple[TestClient, Store]:
    settings.ensure_dirs()
    store = Store(settings.database_url, migrate=True)
    return TestClient(create_app(store, settings)), store


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
