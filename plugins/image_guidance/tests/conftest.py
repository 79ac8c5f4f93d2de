"""Fixtures for the image_guidance tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.tag import Tag

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real DICOM-RT data sets (read in place); skips where they are absent."""
    root = Path(os.environ.get("RTAUTO_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "README.md").is_file():
        pytest.skip(f"real DICOM-RT test data not found at {root} (set RTAUTO_TEST_DATA)")
    return root


class _Tags:
    """Tags of PS3.3 C.20.2/C.20.3 attributes, by number (no keyword dictionary involved)."""

    REGISTRATION_SEQUENCE = Tag(0x0070, 0x0308)
    MATRIX_REGISTRATION_SEQUENCE = Tag(0x0070, 0x0309)
    MATRIX_SEQUENCE = Tag(0x0070, 0x030A)
    MATRIX = Tag(0x3006, 0x00C6)
    MATRIX_TYPE = Tag(0x0070, 0x030C)
    FRAME_OF_REFERENCE_UID = Tag(0x0020, 0x0052)
    REFERENCED_IMAGE_SEQUENCE = Tag(0x0008, 0x1140)
    REFERENCED_SOP_INSTANCE_UID = Tag(0x0008, 0x1155)
    DEFORMABLE_REGISTRATION_SEQUENCE = Tag(0x0064, 0x0002)
    SOURCE_FRAME_OF_REFERENCE_UID = Tag(0x0064, 0x0003)
    GRID_SEQUENCE = Tag(0x0064, 0x0005)
    GRID_DIMENSIONS = Tag(0x0064, 0x0007)
    GRID_RESOLUTION = Tag(0x0064, 0x0008)
    VECTOR_GRID_DATA = Tag(0x0064, 0x0009)
    IMAGE_POSITION = Tag(0x0020, 0x0032)
    IMAGE_ORIENTATION = Tag(0x0020, 0x0037)


def _independent_matrices(path: Path) -> tuple[str, dict[tuple[str, frozenset[str]], np.ndarray]]:
    """(Registered RCS UID, {(item FoR, referenced SOP UIDs): matrix}) read by tag number."""
    ds = pydicom.dcmread(path)
    out = {}
    for item in ds[_Tags.REGISTRATION_SEQUENCE].value:
        matrix = np.eye(4)
        for m in item[_Tags.MATRIX_REGISTRATION_SEQUENCE].value[0][_Tags.MATRIX_SEQUENCE].value:
            assert m[_Tags.MATRIX_TYPE].value in ("RIGID", "RIGID_SCALE", "AFFINE")
            values = [float(v) for v in m[_Tags.MATRIX].value]
            assert len(values) == 16
            matrix = np.array(values).reshape(4, 4) @ matrix
        sops = frozenset(
            str(r[_Tags.REFERENCED_SOP_INSTANCE_UID].value)
            for r in item[_Tags.REFERENCED_IMAGE_SEQUENCE].value
        )
        out[(str(item[_Tags.FRAME_OF_REFERENCE_UID].value), sops)] = matrix
    return str(ds[_Tags.FRAME_OF_REFERENCE_UID].value), out


@pytest.fixture(scope="session")
def independent_matrices():
    """Reads a REG's Registered RCS and matrices by tag number: ``(rcs, {(FoR, SOPs): M})``."""
    return _independent_matrices


@pytest.fixture(scope="session")
def tags() -> type[_Tags]:
    return _Tags
