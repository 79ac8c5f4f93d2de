"""REG and Deformable REG objects: valid for dciodvfy, and an independent reader gets them back.

The independent reader (conftest.py) walks the objects by tag number, following the attribute
definitions of PS3.3 C.20.2 (Spatial Registration) and C.20.3 (Deformable Spatial
Registration); it shares no code with ``rtauto.dicom.reg``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from rtauto_image_guidance.testing import dciodvfy_errors, dciodvfy_output

from rtauto.dicom.reg import (
    RegisteredSeries,
    read_registration,
    write_deformable_registration,
    write_spatial_registration,
)
from rtauto.testing import write_ct_series


def _series(tmp_path: Path, name: str, **kw) -> tuple[RegisteredSeries, pydicom.Dataset]:
    s = write_ct_series(tmp_path / name, rows=32, cols=32, slices=6, **kw)
    header = pydicom.dcmread(s.files[0], stop_before_pixels=True)
    series = RegisteredSeries(
        frame_of_reference_uid=s.frame_of_reference_uid,
        study_instance_uid=s.study_instance_uid,
        series_instance_uid=s.series_instance_uid,
        instances=[(str(header.SOPClassUID), uid) for uid in s.sop_instance_uids],
    )
    return series, header


def _rigid(
    angles_deg: tuple[float, float, float], translation: tuple[float, float, float]
) -> np.ndarray:
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx
    m[:3, 3] = translation
    return m


@pytest.mark.parametrize("same_study", [True, False])
def test_spatial_registration_is_valid_and_reads_back(
    tmp_path: Path, same_study: bool, independent_matrices
) -> None:
    fixed, fixed_header = _series(
        tmp_path, "plan", patient_id="P1", series_description="Planning CT"
    )
    moving, moving_header = _series(
        tmp_path,
        "daily",
        patient_id="P1",
        series_description="CBCT",
        study_instance_uid=fixed.study_instance_uid if same_study else None,
    )
    matrix = _rigid((1.5, -2.0, 0.7), (3.25, -7.5, 12.125))
    out = tmp_path / "reg.dcm"
    ds = write_spatial_registration(
        out,
        fixed=fixed,
        moving=moving,
        matrix=matrix,
        study=moving_header,
        software_versions=["rtauto 0.1.0", "rtauto-image-guidance 0.1.0"],
        derivation_description="test",
    )
    assert dciodvfy_errors(out) == [], dciodvfy_output(out)
    registered_rcs, matrices = independent_matrices(out)
    assert registered_rcs == fixed.frame_of_reference_uid
    fixed_key = (fixed.frame_of_reference_uid, frozenset(uid for _, uid in fixed.instances))
    moving_key = (moving.frame_of_reference_uid, frozenset(uid for _, uid in moving.instances))
    assert np.allclose(matrices[fixed_key], np.eye(4))
    assert np.allclose(matrices[moving_key], matrix, atol=1e-9)
    # provenance and new UIDs
    assert ds.Manufacturer == "rtauto"
    assert list(ds.SoftwareVersions) == ["rtauto 0.1.0", "rtauto-image-guidance 0.1.0"]
    assert ds.SOPInstanceUID not in {uid for _, uid in fixed.instances + moving.instances}
    assert ds.SeriesInstanceUID not in (fixed.series_instance_uid, moving.series_instance_uid)
    assert ds.PatientID == "P1" and ds.StudyInstanceUID == moving.study_instance_uid
    # Common Instance Reference: every referenced series, grouped by study
    referenced = {s.SeriesInstanceUID for s in ds.get("ReferencedSeriesSequence", [])}
    for study in ds.get("StudiesContainingOtherReferencedInstancesSequence", []):
        assert study.StudyInstanceUID != ds.StudyInstanceUID
        referenced |= {s.SeriesInstanceUID for s in study.ReferencedSeriesSequence}
    assert referenced == {fixed.series_instance_uid, moving.series_instance_uid}
    # rtauto's own reader agrees
    reg = read_registration(out)
    assert np.allclose(reg.matrix_for(moving.frame_of_reference_uid), matrix, atol=1e-9)


def test_registration_refuses_a_non_rigid_matrix(tmp_path: Path) -> None:
    fixed, header = _series(tmp_path, "plan", patient_id="P1")
    moving, _ = _series(tmp_path, "daily", patient_id="P1")
    scaled = np.diag([1.1, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="orthonormal"):
        write_spatial_registration(
            tmp_path / "reg.dcm", fixed=fixed, moving=moving, matrix=scaled, study=header
        )
    assert not (tmp_path / "reg.dcm").exists()


def test_deformable_registration_is_valid_and_reads_back(tmp_path: Path, tags) -> None:
    fixed, _ = _series(tmp_path, "plan", patient_id="P2")
    moving, moving_header = _series(tmp_path, "daily", patient_id="P2")
    rng = np.random.default_rng(3)
    vectors = rng.normal(0, 2.0, (3, 4, 5, 3)).astype(np.float32)  # planes, rows, columns
    direction = np.eye(3)
    out = tmp_path / "dreg.dcm"
    write_deformable_registration(
        out,
        fixed=fixed,
        moving=moving,
        vectors=vectors,
        grid_origin=(-10.0, -20.0, -30.0),
        grid_spacing=(4.0, 5.0, 6.0),
        grid_direction=direction,
        study=moving_header,
        software_versions=["rtauto 0.1.0"],
    )
    assert dciodvfy_errors(out) == [], dciodvfy_output(out)
    ds = pydicom.dcmread(out)
    assert str(ds[tags.FRAME_OF_REFERENCE_UID].value) == fixed.frame_of_reference_uid
    item = ds[tags.DEFORMABLE_REGISTRATION_SEQUENCE].value[0]
    assert str(item[tags.SOURCE_FRAME_OF_REFERENCE_UID].value) == moving.frame_of_reference_uid
    grid = item[tags.GRID_SEQUENCE].value[0]
    columns, rows, planes = (int(v) for v in grid[tags.GRID_DIMENSIONS].value)
    assert (columns, rows, planes) == (5, 4, 3)
    assert [float(v) for v in grid[tags.GRID_RESOLUTION].value] == [4.0, 5.0, 6.0]
    assert [float(v) for v in grid[tags.IMAGE_POSITION].value] == [-10.0, -20.0, -30.0]
    raw = grid[tags.VECTOR_GRID_DATA].value
    assert len(raw) == columns * rows * planes * 3 * 4
    # vector of grid point (i=2, j=1, k=2): x fastest, then rows, then planes (C.20.3.1.3)
    offset = ((2 * rows + 1) * columns + 2) * 3 * 4
    vector = struct.unpack("<3f", raw[offset : offset + 12])
    assert np.allclose(vector, vectors[2, 1, 2])
    reg = read_registration(out)
    assert np.allclose(reg.deformable_items[0].vectors, vectors)
