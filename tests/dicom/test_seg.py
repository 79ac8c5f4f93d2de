"""SEG output: dciodvfy clean, and highdicom reads back the same masks on the right slices."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from rtauto.dicom.geometry import GeometryError, load_series
from rtauto.dicom.rtstruct import Structure
from rtauto.dicom.seg import read_seg, write_seg
from rtauto.testing import write_ct_series

OBLIQUE = (0.8660254, 0.5, 0.0, 0.0, 0.0, -1.0)


@pytest.mark.parametrize(
    ("position", "orientation"),
    [("HFS", (1, 0, 0, 0, 1, 0)), ("FFP", (1, 0, 0, 0, -1, 0)), ("HFS", OBLIQUE)],
    ids=["HFS", "FFP", "oblique"],
)
@pytest.mark.parametrize("overlap", [False, True], ids=["labelmap", "overlapping"])
def test_seg_round_trip(
    tmp_path: Path, position: str, orientation: tuple, overlap: bool, dicom_checks
) -> None:
    series = write_ct_series(
        tmp_path / "ct",
        rows=48,
        cols=56,
        slices=9,
        patient_position=position,
        orientation=orientation,
    )
    volume = load_series(series.files)
    z, y, x = np.mgrid[0:9, 0:48, 0:56]
    radius = np.hypot(y - 24, x - 30)
    ring = (radius < 10) & (radius > 4) & (z > 1) & (z < 7)
    body = volume.array > -300
    if not overlap:
        body &= ~ring
    structures = [
        Structure("BODY", body, (0, 255, 0), "EXTERNAL"),
        Structure("Heart", ring, (255, 0, 0)),
        Structure("SpinalCord", np.zeros(volume.shape, dtype=bool), (0, 0, 255)),
    ]
    out = tmp_path / "seg.dcm"
    write_seg(
        volume,
        structures,
        out,
        algorithm_name="demo",
        algorithm_version="1",
        software_versions=["rtauto 0.1.0", "rtauto-autocontour 0.1.0"],
        derivation_description="rtauto step contour",
    )
    assert dicom_checks.dciodvfy_errors(out) == []

    seg = hd.seg.segread(out)
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert seg.StudyInstanceUID == volume.study_instance_uid
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["BODY", "Heart", "SpinalCord"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "38266002"
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=volume.sop_instance_uids, segment_numbers=[1, 2, 3]
    ).astype(bool)
    for index, structure in enumerate(structures):
        assert np.array_equal(pixels[..., index], structure.mask), structure.name
    # Frames carry the CT slice positions (not an assumed axial stack).
    positions = {
        tuple(np.round([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], 2))
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    expected = {tuple(np.round(volume.slice_position(k), 2)) for k in range(volume.shape[0])}
    assert positions <= expected
    # rtauto's reader (autocontour.compare) gives back the same masks
    read = read_seg(out, volume)
    assert [s.name for s in read] == ["BODY", "Heart", "SpinalCord"]
    for ours, original in zip(read, structures, strict=True):
        assert np.array_equal(ours.mask, original.mask), original.name
    other = load_series(write_ct_series(tmp_path / "other", rows=48, cols=56, slices=9).files)
    with pytest.raises(GeometryError, match="Frame of Reference"):
        read_seg(out, other)


def test_seg_refuses_a_wrong_mask_shape(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", rows=16, cols=16, slices=3)
    volume = load_series(series.files)
    with pytest.raises(ValueError, match="mask shape"):
        write_seg(volume, [Structure("BODY", np.zeros((3, 8, 8), bool))], tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_a_japanese_character_set_and_an_unknown_sex_are_carried_over(
    tmp_path: Path, dicom_checks
) -> None:
    """Legal in a received CT, refused by highdicom as they stand: a first character set value
    left empty (ISO 2022 with code extensions) and a Patient's Sex of U (anonymised data)."""
    import pydicom

    from rtauto.dicom.rtstruct import read_rtstruct, write_rtstruct

    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=4)
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = "Yamada^Tarou=山田^太郎"
        ds.PatientSex = "U"
        ds.save_as(path)
    volume = load_series(series.files)
    body = Structure("BODY", volume.array > -300, (0, 255, 0), "EXTERNAL")
    seg_path, rs_path = tmp_path / "seg.dcm", tmp_path / "rs.dcm"
    write_seg(volume, [body], seg_path, algorithm_name="threshold")
    write_rtstruct(volume, [body], rs_path)
    for path in (seg_path, rs_path):
        assert dicom_checks.dciodvfy_errors(path) == []
        written = pydicom.dcmread(path)
        assert "山田^太郎" in str(written.PatientName)
        assert written.PatientSex == ""  # U is not an enumerated value: unknown
    assert read_rtstruct(rs_path, volume)[0][0].mask.sum() == body.mask.sum()


def test_a_series_without_slice_thickness_gets_its_slice_spacing(
    tmp_path: Path, dicom_checks
) -> None:
    import pydicom

    series = write_ct_series(tmp_path / "ct", rows=16, cols=16, slices=4, spacing=(1.0, 1.0, 2.5))
    for path in series.files:  # Type 2: an empty value is legal in the CT
        ds = pydicom.dcmread(path)
        ds.SliceThickness = None
        ds.save_as(path)
    before = [path.read_bytes() for path in series.files]
    volume = load_series(series.files)
    mask = np.zeros(volume.shape, bool)
    mask[1:3, 4:12, 4:12] = True
    path = tmp_path / "seg.dcm"
    write_seg(volume, [Structure("BODY", mask)], path)
    assert dicom_checks.dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(2.5)
    assert [p.read_bytes() for p in series.files] == before  # the images are not touched
    assert "SliceThickness" in volume.headers[0] and not volume.headers[0].SliceThickness
