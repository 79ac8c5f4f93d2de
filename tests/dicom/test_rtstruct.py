"""RTSTRUCT writing and reading: references, holes, any orientation, checked by plastimatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from skimage.measure import find_contours

from rtauto.dicom.geometry import GeometryError, Volume, load_series
from rtauto.dicom.rtstruct import (
    ContourLimitError,
    Structure,
    mask_to_polygons,
    rasterize_even_odd,
    read_rtstruct,
    slice_polygons,
    write_rtstruct,
)
from rtauto.testing import write_ct_series

OBLIQUE = (0.8660254, 0.5, 0.0, 0.0, 0.0, -1.0)
POSITIONS = {
    "HFS": dict(patient_position="HFS", orientation=(1, 0, 0, 0, 1, 0)),
    "HFP": dict(patient_position="HFP", orientation=(-1, 0, 0, 0, -1, 0)),
    "FFS": dict(patient_position="FFS", orientation=(-1, 0, 0, 0, 1, 0)),
    "oblique": dict(patient_position="HFS", orientation=OBLIQUE),
}


def _series(folder: Path, case: str = "HFS") -> Volume:
    series = write_ct_series(folder, rows=72, cols=64, slices=14, **POSITIONS[case])
    return load_series(series.files)


def _structures(volume: Volume) -> list[Structure]:
    """BODY by threshold; an off-centre ring with an island in its hole; a small ellipsoid."""
    z, y, x = np.mgrid[0 : volume.shape[0], 0 : volume.shape[1], 0 : volume.shape[2]]
    radius = np.hypot(y - 30, x - 26)
    ring = ((radius < 14) & (radius > 6)) | (radius < 3)
    ring &= (z >= 2) & (z <= 10)
    ellipsoid = ((z - 7) / 3.2) ** 2 + ((y - 40) / 5.5) ** 2 + ((x - 40) / 4.5) ** 2 <= 1
    return [
        Structure("BODY", volume.array > -300, (0, 255, 0), "EXTERNAL"),
        Structure("Ring", ring, (255, 0, 0), "ORGAN", description="model test@1"),
        Structure("Nodule", ellipsoid, (0, 0, 255), "GTV"),
    ]


@pytest.mark.parametrize("case", sorted(POSITIONS))
@pytest.mark.parametrize("keyhole", [False, True], ids=["even-odd", "keyhole"])
def test_round_trip_through_plastimatch(
    tmp_path: Path, case: str, keyhole: bool, dicom_checks
) -> None:
    volume = _series(tmp_path / "ct", case)
    structures = _structures(volume)
    out = tmp_path / "rtss.dcm"
    write_rtstruct(volume, structures, out, keyhole=keyhole, software_versions=["rtauto 0.1"])

    assert dicom_checks.dciodvfy_errors(out) == []
    images = dicom_checks.plastimatch_masks(out, tmp_path / "ct", tmp_path / "pm", xor=not keyhole)
    assert sorted(images) == sorted(s.name for s in structures)
    for structure in structures:
        image = images[structure.name]
        # plastimatch rasterises on the CT's own grid: same origin, axes and size.
        np.testing.assert_allclose(image.GetOrigin(), volume.origin, atol=1e-3)
        np.testing.assert_allclose(
            np.asarray(image.GetDirection()).reshape(3, 3), volume.direction, atol=1e-4
        )
        import SimpleITK as sitk  # noqa: N813

        theirs = sitk.GetArrayFromImage(image).astype(bool)
        score = dicom_checks.dice(theirs, structure.mask)
        assert score >= 0.98, f"{case} {structure.name}: Dice {score:.4f}"
    # The ring's hole stays a hole and the island in it stays filled.
    ring = sitk.GetArrayFromImage(images["Ring"]).astype(bool)
    assert not ring[6, 30, 26 + 4] and ring[6, 30, 26] and ring[6, 30, 26 + 10]

    ours, _ = read_rtstruct(out, volume)
    for structure, read_back in zip(structures, ours, strict=True):
        assert read_back.name == structure.name
        assert np.array_equal(read_back.mask, structure.mask)
        assert read_back.interpreted_type == structure.interpreted_type
        assert read_back.color == structure.color


def test_references_frame_of_reference_and_every_slice(tmp_path: Path) -> None:
    volume = _series(tmp_path / "ct", "FFS")
    out = tmp_path / "rtss.dcm"
    write_rtstruct(
        volume,
        _structures(volume),
        out,
        manufacturer="rtauto",
        software_versions=["rtauto 0.1.0", "rtauto-autocontour 0.1.0"],
        derivation_description="rtauto workflow demo, step contour",
    )
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT" and ds.ApprovalStatus == "UNAPPROVED"
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.SeriesInstanceUID != volume.series_instance_uid
    assert ds.StudyInstanceUID == volume.study_instance_uid
    assert ds.PatientID == volume.headers[0].PatientID
    assert list(ds.SoftwareVersions) == ["rtauto 0.1.0", "rtauto-autocontour 0.1.0"]
    assert ds.StructureSetDescription.startswith("rtauto workflow demo")
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == volume.frame_of_reference_uid
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == volume.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == (
        volume.sop_instance_uids
    )
    assert {r.ReferencedFrameOfReferenceUID for r in ds.StructureSetROISequence} == {
        volume.frame_of_reference_uid
    }
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == [
        "EXTERNAL",
        "ORGAN",
        "GTV",
    ]
    assert ds.StructureSetROISequence[1].ROIGenerationDescription == "model test@1"
    # Each contour names the slice it lies on, and lies on it.
    normal = volume.direction[:, 2]
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
            k = volume.sop_instance_uids.index(uid)
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            assert contour.NumberOfContourPoints == len(points) >= 3
            np.testing.assert_allclose(
                points @ normal, volume.slice_position(k) @ normal, atol=2e-3
            )


def test_empty_structure_is_kept_without_contours_or_dropped(tmp_path: Path, dicom_checks) -> None:
    volume = _series(tmp_path / "ct")
    empty = Structure("Heart", np.zeros(volume.shape, dtype=bool))
    out = tmp_path / "rtss.dcm"
    write_rtstruct(volume, [Structure("BODY", volume.array > -300), empty], out)
    assert dicom_checks.dciodvfy_errors(out) == []
    ds = pydicom.dcmread(out)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["BODY", "Heart"]
    assert "ContourSequence" not in ds.ROIContourSequence[1]
    structures, _ = read_rtstruct(out, volume)
    assert not structures[1].mask.any()

    dropped = tmp_path / "dropped.dcm"
    write_rtstruct(
        volume, [Structure("BODY", volume.array > -300), empty], dropped, drop_empty=True
    )
    assert [r.ROIName for r in pydicom.dcmread(dropped).StructureSetROISequence] == ["BODY"]


def test_single_pixel_and_diagonal_pixels_trace_to_closed_polygons() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: two separate regions
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2 and all(len(p) >= 3 for p in polygons)


def _cyclic(polygon: np.ndarray) -> tuple[tuple[float, float], ...]:
    """A polygon as a vertex cycle that starts at its smallest vertex (direction kept)."""
    points = [tuple(p) for p in np.round(polygon, 6).tolist()]
    first = points.index(min(points))
    return tuple(points[first:] + points[:first])


def _straight_runs_dropped(points: np.ndarray) -> np.ndarray:
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    a, b = points - before, after - before
    return points[a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] != 0]


def test_tracing_matches_skimage_marching_squares_and_rasterises_back() -> None:
    """The vectorised tracer gives skimage's find_contours polygons (an independent marching
    squares), direction included, on random masks full of saddles and holes, and every
    slice rasterises back to its mask, holes written apart or keyholed."""
    rng = np.random.default_rng(20261122)
    for _ in range(200):
        shape = (3, int(rng.integers(1, 24)), int(rng.integers(1, 24)))
        mask = rng.random(shape) < rng.random()
        traced = slice_polygons(mask)
        for k in range(shape[0]):
            reference = [
                _straight_runs_dropped(c[:-1, ::-1] - 1.0)
                for c in find_contours(np.pad(mask[k].astype(float), 1), 0.5)
            ]
            ours = [p for j, p in traced if j == k]
            assert sorted(map(_cyclic, ours)) == sorted(map(_cyclic, reference))
            for keyhole in (False, True):
                polygons = mask_to_polygons(mask[k], keyhole=keyhole)
                assert np.array_equal(rasterize_even_odd(polygons, *shape[1:]), mask[k])


def test_reader_skips_degenerate_contours_and_refuses_off_slice_ones(tmp_path: Path) -> None:
    volume = _series(tmp_path / "ct")
    out = tmp_path / "rtss.dcm"
    ds = write_rtstruct(volume, [Structure("BODY", volume.array > -300)], out)
    contours = ds.ROIContourSequence[0].ContourSequence
    first = np.asarray(contours[0].ContourData, dtype=float).reshape(-1, 3)
    contours[0].ContourData = [f"{v:.3f}" for v in first[:2].ravel()]  # a 2-point "contour"
    contours[0].NumberOfContourPoints = 2
    structures, _ = read_rtstruct(ds, volume)
    assert structures[0].mask.sum() < (volume.array > -300).sum()

    moved = first.copy()
    moved[:, 2] += volume.spacing[2] / 2  # halfway between two slices
    contours[0].ContourData = [f"{v:.3f}" for v in moved.ravel()]
    contours[0].NumberOfContourPoints = len(moved)
    with pytest.raises(GeometryError, match="lies on no image slice"):
        read_rtstruct(ds, volume)


def test_reader_refuses_another_frame_of_reference(tmp_path: Path) -> None:
    volume = _series(tmp_path / "a")
    other = _series(tmp_path / "b")
    out = tmp_path / "rtss.dcm"
    write_rtstruct(other, [Structure("BODY", other.array > -300)], out)
    with pytest.raises(GeometryError, match="Frame of Reference"):
        read_rtstruct(out, volume)


def test_mask_shape_and_interpreted_type_are_checked(tmp_path: Path) -> None:
    volume = _series(tmp_path / "ct")
    with pytest.raises(ValueError, match="mask shape"):
        write_rtstruct(volume, [Structure("BODY", np.zeros((2, 2, 2), bool))], tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="not a DICOM defined term"):
        write_rtstruct(
            volume, [Structure("BODY", volume.array > 0, interpreted_type="BODY")], tmp_path / "x"
        )
    assert not (tmp_path / "x.dcm").exists() and not (tmp_path / "x").exists()


def test_a_structure_beyond_max_contours_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    volume = _series(tmp_path / "ct")
    scattered = np.zeros(volume.shape, bool)
    scattered[2:12, 4:64:4, 4:60:4] = True  # 15 x 14 separate voxels on each of 10 slices
    structures = [*_structures(volume), Structure("Speckle", scattered)]
    with pytest.raises(ContourLimitError, match="Speckle: 2100 contours on 10 slices"):
        write_rtstruct(volume, structures, tmp_path / "rs.dcm", max_contours=2000)
    assert not (tmp_path / "rs.dcm").exists()
    # the organs of _structures stay far below a limit that stops the speckle
    write_rtstruct(volume, structures[:-1], tmp_path / "rs.dcm", max_contours=100)
    read, _ = read_rtstruct(tmp_path / "rs.dcm", volume)
    assert [s.name for s in read] == ["BODY", "Ring", "Nodule"]


def test_nothing_to_write_is_refused_and_an_unknown_interpreted_type_stays_unknown(
    tmp_path: Path, dicom_checks
):
    from rtauto.dicom.rtstruct import EmptyStructureSetError

    series = write_ct_series(tmp_path / "ct", rows=24, cols=24, slices=3)
    volume = load_series(series.files)
    empty = Structure("SpinalCord", np.zeros(volume.shape, dtype=bool), (255, 0, 0))
    out = tmp_path / "rs.dcm"
    with pytest.raises(EmptyStructureSetError, match="no structure to write"):
        write_rtstruct(volume, [empty], out, drop_empty=True)
    # a structure whose type the source left empty (unknown) is not written as ORGAN
    marker = Structure("Marker", volume.array > -300, (255, 255, 0), interpreted_type="")
    write_rtstruct(volume, [marker], out)
    assert dicom_checks.dciodvfy_errors(out) == []
    assert read_rtstruct(out, volume)[0][0].interpreted_type == ""
