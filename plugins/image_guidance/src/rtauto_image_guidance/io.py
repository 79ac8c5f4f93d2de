"""Reading a DICOM image series into a SimpleITK image with its exact patient geometry.

Slices are sorted along the slice normal (the cross product of the row and column directions
of ImageOrientationPatient), so any orientation and patient position reads correctly; the image's
origin, spacing and direction come from ImagePositionPatient, PixelSpacing and
ImageOrientationPatient, never from assumptions about axial slices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813  (the library's usual name)

from rtauto.dicom.reg import PATIENT_STUDY_KEYWORDS
from rtauto.errors import StepFailed

__all__ = ["SeriesImage", "read_series"]

# relative tolerance on the distance between neighbouring slices
_GAP_TOLERANCE = 0.02


@dataclass
class SeriesImage:
    """An image series as a SimpleITK image plus what a REG object must reference."""

    image: sitk.Image  # float32, patient coordinates (LPS, mm) of the series' Frame of Reference
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str
    patient_name: str
    patient_position: str
    modality: str
    series_description: str
    # (SOPClassUID, SOPInstanceUID) of every slice, in slice order
    instances: list[tuple[str, str]] = field(default_factory=list)
    # attributes a derived object copies (patient and study module)
    header: pydicom.Dataset = field(default_factory=pydicom.Dataset)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k) to patient coordinates (mm)."""
        direction = np.array(self.image.GetDirection()).reshape(3, 3)
        spacing = np.array(self.image.GetSpacing())
        affine = np.eye(4)
        affine[:3, :3] = direction * spacing
        affine[:3, 3] = self.image.GetOrigin()
        return affine

    def corners(self) -> np.ndarray:
        """The 8 corner voxel centres in patient coordinates, shape (8, 3)."""
        size = np.array(self.image.GetSize()) - 1
        idx = np.array([[i, j, k, 1] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
        idx[:, :3] *= size
        return (self.affine @ idx.T).T[:, :3]

    def center(self) -> np.ndarray:
        """The centre of the image volume in patient coordinates."""
        return self.corners().mean(axis=0)


def _float_list(value: object, count: int, what: str, path: Path) -> np.ndarray:
    try:
        values = np.array([float(v) for v in value], dtype=float)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise StepFailed(f"{path}: {what} is missing or not numeric") from exc
    if values.size != count:
        raise StepFailed(f"{path}: {what} has {values.size} values, expected {count}")
    return values


def read_series(files: Iterable[Path | str], *, label: str = "series") -> SeriesImage:
    """Read one single-frame image series (CT, MR, PT, CBCT as CT) into a :class:`SeriesImage`.

    Raises :class:`StepFailed` for an empty series, mixed series or orientations, multi-frame
    objects, missing geometry or non-uniform slice spacing, naming the offending file.
    """
    paths = sorted(Path(p) for p in files)
    if not paths:
        raise StepFailed(f"the {label} holds no images")
    headers = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # pydicom raises several types for unreadable files
            raise StepFailed(f"{path}: not a readable DICOM file ({exc})") from exc
        if "PixelData" not in ds:
            raise StepFailed(f"{path}: the {label} holds an object without pixel data")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise StepFailed(f"{path}: multi-frame images are not supported in a {label}")
        headers.append((path, ds))

    first_path, first = headers[0]
    series_uid = str(first.get("SeriesInstanceUID", ""))
    orientation = _float_list(
        first.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", first_path
    )
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise StepFailed(f"{first_path}: ImageOrientationPatient is not two orthonormal vectors")
    spacing_rc = _float_list(first.get("PixelSpacing"), 2, "PixelSpacing", first_path)
    rows, cols = int(first.Rows), int(first.Columns)

    positioned = []
    for path, ds in headers:
        if str(ds.get("SeriesInstanceUID", "")) != series_uid:
            raise StepFailed(f"{path}: belongs to another series than {first_path}")
        iop = _float_list(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", path)
        if not np.allclose(iop, orientation, atol=1e-4):
            raise StepFailed(f"{path}: ImageOrientationPatient differs within the {label}")
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise StepFailed(f"{path}: image size differs within the {label}")
        ipp = _float_list(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", path)
        positioned.append((float(ipp @ normal), ipp, path, ds))
    positioned.sort(key=lambda item: item[0])

    distances = np.array([p[0] for p in positioned])
    if len(positioned) > 1:
        gaps = np.diff(distances)
        if np.any(gaps <= 1e-3):
            raise StepFailed(
                f"{positioned[0][2].parent}: the {label} has duplicate slice positions"
            )
        slice_spacing = float(np.median(gaps))
        if np.any(np.abs(gaps - slice_spacing) > _GAP_TOLERANCE * slice_spacing):
            raise StepFailed(
                f"{positioned[0][2].parent}: the {label} has non-uniform slice spacing "
                f"({gaps.min():.3f} to {gaps.max():.3f} mm)"
            )
        # slices must lie along the normal, not sheared
        offsets = np.array([p[1] for p in positioned]) - positioned[0][1]
        lateral = offsets - np.outer(offsets @ normal, normal)
        if np.abs(lateral).max() > 0.01 * max(slice_spacing, 1.0) + 1e-3:
            raise StepFailed(f"{positioned[0][2].parent}: the {label}'s slices are sheared")
    else:
        slice_spacing = float(first.get("SliceThickness", 1.0) or 1.0)

    volume = np.empty((len(positioned), rows, cols), dtype=np.float32)
    for k, (_, _, path, ds) in enumerate(positioned):
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # decoders raise several types
            raise StepFailed(f"{path}: cannot decode pixel data ({exc})") from exc
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        volume[k] = pixels * slope + intercept

    image = sitk.GetImageFromArray(volume)
    # PixelSpacing is (row spacing, column spacing): x (column index) steps by the second value
    image.SetSpacing((float(spacing_rc[1]), float(spacing_rc[0]), slice_spacing))
    image.SetOrigin(tuple(float(v) for v in positioned[0][1]))
    direction = np.column_stack([row_dir, col_dir, normal])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))

    header = pydicom.Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in first:
            setattr(header, keyword, first.get(keyword))

    for_uid = str(first.get("FrameOfReferenceUID", ""))
    if not for_uid:
        raise StepFailed(f"{first_path}: the {label} has no FrameOfReferenceUID")
    return SeriesImage(
        image=image,
        series_instance_uid=series_uid,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=for_uid,
        patient_id=str(first.get("PatientID", "")),
        patient_name=str(first.get("PatientName", "")),
        patient_position=str(first.get("PatientPosition", "") or "").upper(),
        modality=str(first.get("Modality", "")),
        series_description=str(first.get("SeriesDescription", "")),
        instances=[(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for *_, ds in positioned],
        header=header,
    )
