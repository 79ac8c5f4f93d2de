"""Fixtures shared by rtauto's tests and the first-party plugins' tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _test_data_root() -> Path:
    return Path(os.environ.get("RTAUTO_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real DICOM-RT data sets (read in place, never copied into the project).

    Set ``RTAUTO_TEST_DATA`` to their folder; tests that need them skip where it is absent.
    """
    root = _test_data_root()
    if not (root / "README.md").is_file():
        pytest.skip(f"real DICOM-RT test data not found at {root} (set RTAUTO_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


def require_tool(name: str) -> str:
    """Path of an external program the test needs; skips with the reason when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make install installs it)")
    return path
