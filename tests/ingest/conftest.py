"""Fixtures for the ingest tests: settings under tmp_path, a migrated store, a small CT series."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rtauto.config import Settings
from rtauto.store import Store
from rtauto.testing import SyntheticSeries, write_ct_series


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Daemon settings with every folder under ``tmp_path/home`` and the SCP on a free port."""
    s = Settings(home=tmp_path / "home")
    s.scp.port = 0
    s.scp.processes = 1
    s.ensure_dirs()
    return s


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    """The job store, migrated (as the daemon opens it before ingest starts)."""
    handle = Store(settings.database_url, migrate=True)
    yield handle
    handle.close()


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSeries:
    """Eight synthetic 64x64 CT slices written by rtauto.testing (explicit VR little endian)."""
    return write_ct_series(tmp_path_factory.mktemp("ct"), rows=64, cols=64, slices=8)
