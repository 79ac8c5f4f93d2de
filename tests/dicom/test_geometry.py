"""Volume loading: affine from the headers for any patient position, and refused series."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813

from rtauto.dicom.geometry import GeometryError, load_series, slice_normal
from rtauto.testing import ct_phantom, write_ct_series

OBLIQUE = (0.8660254, 0.5, 0.0, 0.0, 0.0, -1.0)  # rows tilted 30 degrees, columns feet-ward

CASES = {
    "HFS": dict(patient_position="HFS", orientation=(1, 0, 0, 0, 1, 0)),
    "HFP": dict(patient_position="HFP", orientation=(-1, 0, 0, 0, -1, 0)),
    "FFS": dict(patient_position="FFS", orientation=(-1, 0, 0, 0, 1, 0)),
    "FFP": dict(patient_position="FFP", orientation=(1, 0, 0, 0, -1, 0)),
    "oblique": dict(patient_position="HFS", orientation=OBLIQUE),
}


def _write(folder: Path, case: str, slices: int = 12, **kwargs):
    hu = ct_phantom(48, 40, slices, (2.0, 2.5, 3.0), seed=1)
    series = write_ct_series(folder, spacing=(2.0, 2.5, 3.0), hu=hu, **CASES[case], **kwargs)
    return series, hu


@pytest.mark.parametrize("case", sorted(CASES))
def test_affine_places_every_voxel_where_the_headers_say(tmp_path: Path, case: str) -> None:
    series, hu = _write(tmp_path, case)
    files = list(series.files)
    random.Random(3).shuffle(files)
    volume = load_series(files)

    assert volume.shape == hu.shape
    assert volume.spacing == pytest.approx((2.0, 2.5, 3.0), abs=1e-3)
    assert volume.frame_of_reference_uid == series.frame_of_reference_uid
    assert volume.patient_position == CASES[case]["patient_position"]
    # Rescaled HU, in the written order (writer clips to 12 bits).
    np.testing.assert_allclose(volume.array, np.round(np.clip(hu + 1024, 0, 4095)) - 1024, atol=1)
    # Sorted along the normal; slice k's IPP is the affine image of (0, 0, k).
    assert volume.sop_instance_uids == series.sop_instance_uids
    for k, path in enumerate(series.files):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(volume.index_to_patient([0, 0, k])[0], ipp, atol=1e-3)
        row_dir = np.asarray([float(v) for v in ds.ImageOrientationPatient[:3]])
        col_dir = np.asarray([float(v) for v in ds.ImageOrientationPatient[3:]])
        # Pixel (column 5, row 7) per PS3.3 C.7.6.2.1.1.
        expected = ipp + 5 * 2.0 * row_dir + 7 * 2.5 * col_dir
        np.testing.assert_allclose(volume.index_to_patient([5, 7, k])[0], expected, atol=1e-3)
    np.testing.assert_allclose(
        volume.patient_to_index(volume.index_to_patient([[3, 4, 5]])), [[3, 4, 5]], atol=1e-9
    )


@pytest.mark.parametrize("case", ["HFP", "oblique"])
def test_geometry_agrees_with_simpleitk(tmp_path: Path, case: str) -> None:
    series, _ = _write(tmp_path, case)
    volume = load_series(series.files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(
        sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path), series.series_instance_uid)
    )
    image = reader.Execute()
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(volume.spacing, image.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(
        volume.direction, np.asarray(image.GetDirection()).reshape(3, 3), atol=1e-4
    )
    np.testing.assert_allclose(volume.array, sitk.GetArrayFromImage(image), atol=1e-3)


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    series, _ = _write(tmp_path, "HFS", slices=1)
    volume = load_series(series.files)
    assert volume.shape[0] == 1
    assert volume.spacing[2] == pytest.approx(3.0)
    np.testing.assert_allclose(volume.direction[:, 2], slice_normal(CASES["HFS"]["orientation"]))


def test_missing_slice_is_refused_with_the_gap(tmp_path: Path) -> None:
    series, _ = _write(tmp_path, "HFS")
    files = [f for f in series.files if f.name != "CT.0006.dcm"]
    with pytest.raises(GeometryError, match=r"1 slice\(s\) missing between .*CT.0005.dcm"):
        load_series(files)


def _edit(path: Path, **attributes: object) -> None:
    ds = pydicom.dcmread(path)
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(path)


def test_non_uniform_spacing_is_refused(tmp_path: Path) -> None:
    series, _ = _write(tmp_path, "HFS")
    ipp = pydicom.dcmread(series.files[6]).ImagePositionPatient
    _edit(series.files[6], ImagePositionPatient=[ipp[0], ipp[1], float(ipp[2]) + 1.0])
    with pytest.raises(GeometryError, match="non-uniform slice spacing"):
        load_series(series.files)


def test_mixed_orientation_is_refused(tmp_path: Path) -> None:
    series, _ = _write(tmp_path, "HFS")
    _edit(series.files[4], ImageOrientationPatient=[-1, 0, 0, 0, 1, 0])
    with pytest.raises(GeometryError, match="mixed orientations"):
        load_series(series.files)


def test_gantry_tilt_is_refused(tmp_path: Path) -> None:
    series, _ = _write(tmp_path, "HFS")
    for k, path in enumerate(series.files):
        ipp = pydicom.dcmread(path).ImagePositionPatient
        # 10 degree tilt: each slice slides in y by tan(10) * 3 mm.
        _edit(path, ImagePositionPatient=[ipp[0], float(ipp[1]) + k * 0.529, ipp[2]])
    with pytest.raises(GeometryError, match="gantry tilt"):
        load_series(series.files)


def test_duplicate_position_and_mixed_series_are_refused(tmp_path: Path) -> None:
    series, _ = _write(tmp_path / "a", "HFS")
    ipp = pydicom.dcmread(series.files[2]).ImagePositionPatient
    _edit(series.files[3], ImagePositionPatient=ipp)
    with pytest.raises(GeometryError, match="same position"):
        load_series(series.files)
    other, _ = _write(tmp_path / "b", "HFS")
    with pytest.raises(GeometryError, match="2 series"):
        load_series([*other.files, series.files[0]])


def test_real_head_phantom_ct(test_data: Path) -> None:
    files = sorted((test_data / "dcpt-headphantom" / "study").glob("CT*.dcm"))
    volume = load_series(files)
    assert volume.shape == (177, 512, 512)
    assert volume.spacing == pytest.approx((0.5859375, 0.5859375, 1.5))
    assert len(set(volume.sop_instance_uids)) == 177
    assert volume.array.dtype == np.float32


@pytest.mark.parametrize(
    ("bits", "stored", "signed"), [(16, 16, 0), (16, 16, 1), (16, 12, 0), (16, 12, 1), (8, 8, 0)]
)
def test_uncompressed_pixels_match_pydicom(
    tmp_path: Path, bits: int, stored: int, signed: int
) -> None:
    """The direct read of uncompressed pixel data gives what pydicom's decoder gives, high
    bits above BitsStored included (masked, or sign-extended for signed data)."""
    from rtauto.dicom.geometry import _pixels

    series = write_ct_series(tmp_path / "ct", rows=16, cols=16, slices=1)
    ds = pydicom.dcmread(series.files[0])
    rng = np.random.default_rng(5)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    raw = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=(16, 16), endpoint=True)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation = signed
    ds.PixelData = raw.astype(dtype).tobytes()
    assert np.array_equal(_pixels(ds), ds.pixel_array)
