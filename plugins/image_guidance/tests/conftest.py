"""Fixtures for the image_guidance tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real DICOM-RT data sets (read in place); skips where they are absent."""
    root = Path(os.environ.get("RTAUTO_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "README.md").is_file():
        pytest.skip(f"real DICOM-RT test data not found at {root} (set RTAUTO_TEST_DATA)")
    return root
