"""DICOM Spatial Registration (REG) and Deformable Spatial Registration objects: writing, reading.

Conventions (PS3.3 C.20):

* A Spatial Registration object has its own Frame of Reference, the *Registered RCS*. rtauto
  writes the reference (fixed, e.g. planning CT) image's Frame of Reference there. Each item of
  the Registration Sequence names a set of images (Referenced Image Sequence) and their Frame of
  Reference, and a matrix ``M`` that maps a point of those images' patient coordinates to the
  Registered RCS: ``x_registered = M @ x_source`` (homogeneous, row-major in the file). The
  reference series' item carries the identity; the moving series' item the registration.
* A Deformable Spatial Registration object maps the Registered RCS to the Source RCS: a point
  ``P`` of the Registered RCS corresponds to ``M_post(M_pre(P) + D(P))`` in the source images'
  patient coordinates, ``D`` being the vector grid (mm, x fastest over grid columns, then rows,
  then planes; vectors located at voxel centres).

Every object gets new UIDs from :func:`rtauto.uids.new_uid` and rtauto's provenance
(Manufacturer, SoftwareVersions, ContentDescription / DerivationDescription).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from rtauto.dicom.attributes import patient_sex
from rtauto.uids import new_uid

__all__ = [
    "DEFORMABLE_SPATIAL_REGISTRATION_STORAGE",
    "SPATIAL_REGISTRATION_STORAGE",
    "DeformableItem",
    "RegisteredSeries",
    "RegistrationItem",
    "RegistrationObject",
    "read_registration",
    "write_deformable_registration",
    "write_spatial_registration",
]

SPATIAL_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.1"
DEFORMABLE_SPATIAL_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.3"

# the Patient and General Study attributes a derived object copies from its source series
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


@dataclass(frozen=True)
class RegisteredSeries:
    """An image series a registration object references."""

    frame_of_reference_uid: str
    study_instance_uid: str
    series_instance_uid: str
    instances: Sequence[tuple[str, str]]  # (SOPClassUID, SOPInstanceUID)


@dataclass
class RegistrationItem:
    """One item of a Spatial Registration object, as read back."""

    frame_of_reference_uid: str
    matrix: np.ndarray  # 4x4, source patient coordinates -> Registered RCS
    matrix_type: str
    referenced_sop_instance_uids: list[str]


@dataclass
class DeformableItem:
    """One item of a Deformable Spatial Registration object, as read back."""

    source_frame_of_reference_uid: str
    pre_matrix: np.ndarray
    post_matrix: np.ndarray
    referenced_sop_instance_uids: list[str]
    grid_origin: np.ndarray | None = None
    grid_orientation: np.ndarray | None = None  # 6 values, as ImageOrientationPatient
    grid_dimensions: tuple[int, int, int] | None = None
    grid_resolution: np.ndarray | None = None
    vectors: np.ndarray | None = None  # (planes, rows, columns, 3) in mm


@dataclass
class RegistrationObject:
    """A REG or Deformable REG object: its Registered RCS and items."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str
    items: list[RegistrationItem] = field(default_factory=list)
    deformable_items: list[DeformableItem] = field(default_factory=list)

    def matrix_for(
        self, frame_of_reference_uid: str, sop_instance_uid: str | None = None
    ) -> np.ndarray:
        """The matrix of the item for a Frame of Reference (and an image, when FoRs repeat)."""
        for item in self.items:
            if item.frame_of_reference_uid != frame_of_reference_uid:
                continue
            if sop_instance_uid is None or sop_instance_uid in item.referenced_sop_instance_uids:
                return item.matrix
        raise KeyError(f"no registration item for {frame_of_reference_uid}")


def _matrix_values(matrix: np.ndarray) -> list[str]:
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError("a registration matrix is 4x4")
    # DS holds 16 characters: format each value to fit
    return [_ds(v) for v in matrix.ravel()]


def _ds(value: float) -> str:
    value = 0.0 if abs(value) < 1e-12 else float(value)
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.1e}"


def _matrix_item(matrix: np.ndarray, matrix_type: str) -> Dataset:
    item = Dataset()
    item.FrameOfReferenceTransformationMatrixType = matrix_type
    item.FrameOfReferenceTransformationMatrix = _matrix_values(matrix)
    return item


def _image_refs(series: RegisteredSeries) -> DicomSequence:
    refs = []
    for sop_class, sop_uid in series.instances:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = sop_uid
        refs.append(ref)
    return DicomSequence(refs)


def _registration_type(rigid: bool) -> DicomSequence:
    code = Dataset()
    # DCM 125024 "Image Content-based Alignment" (CID 7100 Registration Method)
    code.CodeValue = "125024"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Image Content-based Alignment"
    return DicomSequence([code])


def _base_dataset(
    sop_class_uid: str,
    *,
    study: Dataset,
    frame_of_reference_uid: str,
    series_description: str,
    series_number: int,
    content_label: str,
    content_description: str,
    software_versions: Sequence[str],
    derivation_description: str,
) -> Dataset:
    now = _dt.datetime.now()
    sop_uid = new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in study:
            setattr(ds, keyword, study.get(keyword))
    ds.PatientSex = patient_sex(ds)  # an out-of-range value (anonymised data) is left empty
    for keyword in ("PatientName", "PatientBirthDate", "StudyDate", "StudyTime"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    for keyword in ("StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "StudyInstanceUID" not in ds or not ds.StudyInstanceUID:
        raise ValueError("the study dataset has no StudyInstanceUID")
    ds.Modality = "REG"
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:64]
    # Type 2C: dciodvfy requires it where the body part may be paired (an empty value is only
    # a warning where it is not), so it is always present and empty
    ds.Laterality = ""
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "rtauto"
    ds.ManufacturerModelName = "rtauto image registration"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = [v[:64] for v in software_versions] or ["rtauto"]
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.InstanceNumber = 1
    ds.ContentLabel = content_label.upper().replace(" ", "_")[:16]
    ds.ContentDescription = content_description[:64]
    ds.ContentCreatorName = "rtauto^automation"
    if derivation_description:
        ds.DerivationDescription = derivation_description[:1024]
    return ds


def _common_instance_reference(ds: Dataset, series_list: Sequence[RegisteredSeries]) -> None:
    # PS3.3 C.12.2: series of the object's own study, then those of other studies
    def series_item(series: RegisteredSeries) -> Dataset:
        item = Dataset()
        item.SeriesInstanceUID = series.series_instance_uid
        item.ReferencedInstanceSequence = _image_refs(series)
        return item

    unique: dict[str, RegisteredSeries] = {}
    for series in series_list:
        unique.setdefault(series.series_instance_uid, series)
    own = [s for s in unique.values() if s.study_instance_uid == ds.StudyInstanceUID]
    others: dict[str, list[RegisteredSeries]] = {}
    for series in unique.values():
        if series.study_instance_uid != ds.StudyInstanceUID:
            others.setdefault(series.study_instance_uid, []).append(series)
    if own:
        ds.ReferencedSeriesSequence = DicomSequence([series_item(s) for s in own])
    if others:
        studies = []
        for study_uid, members in others.items():
            study_item = Dataset()
            study_item.StudyInstanceUID = study_uid
            study_item.ReferencedSeriesSequence = DicomSequence([series_item(s) for s in members])
            studies.append(study_item)
        ds.StudiesContainingOtherReferencedInstancesSequence = DicomSequence(studies)


def _check_rigid(matrix: np.ndarray) -> None:
    rotation = np.asarray(matrix, float)[:3, :3]
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-6) or not np.isclose(
        np.linalg.det(rotation), 1.0, atol=1e-6
    ):
        raise ValueError("a RIGID registration matrix needs an orthonormal rotation")
    if not np.allclose(np.asarray(matrix, float)[3], [0, 0, 0, 1]):
        raise ValueError("the last row of a registration matrix is 0 0 0 1")


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_spatial_registration(
    path: Path | str,
    *,
    fixed: RegisteredSeries,
    moving: RegisteredSeries,
    matrix: np.ndarray,
    study: Dataset,
    software_versions: Sequence[str] = (),
    derivation_description: str = "",
    content_description: str = "rtauto rigid registration",
    series_description: str = "rtauto registration",
    series_number: int = 900,
    comment: str = "",
) -> Dataset:
    """Write a Spatial Registration object registering ``moving`` onto ``fixed``.

    ``matrix`` (4x4, rigid) maps the moving series' patient coordinates to the fixed series'
    patient coordinates. The object's Frame of Reference is the fixed series' one; patient and
    study attributes come from ``study`` (the object joins that study). Returns the dataset.
    """
    _check_rigid(matrix)
    ds = _base_dataset(
        SPATIAL_REGISTRATION_STORAGE,
        study=study,
        frame_of_reference_uid=fixed.frame_of_reference_uid,
        series_description=series_description,
        series_number=series_number,
        content_label="RTAUTO_REG",
        content_description=content_description,
        software_versions=software_versions,
        derivation_description=derivation_description,
    )
    items = []
    for series, item_matrix, text in (
        (fixed, np.eye(4), "reference images (identity)"),
        (moving, np.asarray(matrix, float), comment or "moving images to the reference"),
    ):
        item = Dataset()
        item.FrameOfReferenceUID = series.frame_of_reference_uid
        item.ReferencedImageSequence = _image_refs(series)
        matrix_reg = Dataset()
        matrix_reg.FrameOfReferenceTransformationComment = text[:1024]
        matrix_reg.RegistrationTypeCodeSequence = _registration_type(rigid=True)
        matrix_reg.MatrixSequence = DicomSequence([_matrix_item(item_matrix, "RIGID")])
        item.MatrixRegistrationSequence = DicomSequence([matrix_reg])
        items.append(item)
    ds.RegistrationSequence = DicomSequence(items)
    _common_instance_reference(ds, [fixed, moving])
    _save(ds, Path(path))
    return ds


def write_deformable_registration(
    path: Path | str,
    *,
    fixed: RegisteredSeries,
    moving: RegisteredSeries,
    vectors: np.ndarray,
    grid_origin: Sequence[float],
    grid_spacing: Sequence[float],
    grid_direction: np.ndarray,
    study: Dataset,
    pre_matrix: np.ndarray | None = None,
    post_matrix: np.ndarray | None = None,
    software_versions: Sequence[str] = (),
    derivation_description: str = "",
    content_description: str = "rtauto deformable registration",
    series_description: str = "rtauto deformable registration",
    series_number: int = 900,
) -> Dataset:
    """Write a Deformable Spatial Registration object from ``fixed`` (registered) to ``moving``.

    ``vectors`` has shape (planes, rows, columns, 3): the displacement in mm at each grid
    point, so that a point ``P`` of the fixed series corresponds to
    ``post_matrix(pre_matrix(P) + D(P))`` in the moving series' patient coordinates. The grid
    lies in the fixed series' Frame of Reference: ``grid_origin`` is the first point,
    ``grid_direction`` a 3x3 matrix whose columns are the column, row and plane directions,
    ``grid_spacing`` the step along each.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 4 or vectors.shape[3] != 3:
        raise ValueError("vectors must have shape (planes, rows, columns, 3)")
    direction = np.asarray(grid_direction, float).reshape(3, 3)
    pre = np.eye(4) if pre_matrix is None else np.asarray(pre_matrix, float)
    post = np.eye(4) if post_matrix is None else np.asarray(post_matrix, float)
    _check_rigid(pre)
    _check_rigid(post)
    ds = _base_dataset(
        DEFORMABLE_SPATIAL_REGISTRATION_STORAGE,
        study=study,
        frame_of_reference_uid=fixed.frame_of_reference_uid,
        series_description=series_description,
        series_number=series_number,
        content_label="RTAUTO_DREG",
        content_description=content_description,
        software_versions=software_versions,
        derivation_description=derivation_description,
    )
    item = Dataset()
    item.SourceFrameOfReferenceUID = moving.frame_of_reference_uid
    item.ReferencedImageSequence = _image_refs(moving)
    item.RegistrationTypeCodeSequence = _registration_type(rigid=False)
    pre_item = _matrix_item(pre, "RIGID")
    post_item = _matrix_item(post, "RIGID")
    item.PreDeformationMatrixRegistrationSequence = DicomSequence([pre_item])
    item.PostDeformationMatrixRegistrationSequence = DicomSequence([post_item])
    grid = Dataset()
    grid.ImagePositionPatient = [_ds(v) for v in grid_origin]
    grid.ImageOrientationPatient = [
        _ds(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])
    ]
    grid.GridDimensions = [int(vectors.shape[2]), int(vectors.shape[1]), int(vectors.shape[0])]
    grid.GridResolution = [float(v) for v in grid_spacing]
    grid.VectorGridData = vectors.astype("<f4").tobytes()
    item.DeformableRegistrationGridSequence = DicomSequence([grid])
    ds.DeformableRegistrationSequence = DicomSequence([item])
    _common_instance_reference(ds, [fixed, moving])
    _save(ds, Path(path))
    return ds


def _read_matrix(item: Any) -> np.ndarray:
    return np.array([float(v) for v in item.FrameOfReferenceTransformationMatrix]).reshape(4, 4)


def read_registration(path: Path | str) -> RegistrationObject:
    """Read a Spatial Registration or Deformable Spatial Registration object's transforms."""
    ds = dcmread(path)
    reg = RegistrationObject(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        frame_of_reference_uid=str(ds.FrameOfReferenceUID),
        patient_id=str(ds.get("PatientID", "")),
    )
    for item in ds.get("RegistrationSequence", []):
        matrix_seq = item.MatrixRegistrationSequence[0].MatrixSequence
        matrix = np.eye(4)
        types = []
        # several matrices in one item apply in order (PS3.3 C.20.2.1.1)
        for m in matrix_seq:
            matrix = _read_matrix(m) @ matrix
            types.append(str(m.FrameOfReferenceTransformationMatrixType))
        reg.items.append(
            RegistrationItem(
                frame_of_reference_uid=str(item.get("FrameOfReferenceUID", "")),
                matrix=matrix,
                matrix_type="/".join(types),
                referenced_sop_instance_uids=[
                    str(r.ReferencedSOPInstanceUID) for r in item.get("ReferencedImageSequence", [])
                ],
            )
        )
    for item in ds.get("DeformableRegistrationSequence", []):
        pre = item.get("PreDeformationMatrixRegistrationSequence")
        post = item.get("PostDeformationMatrixRegistrationSequence")
        deformable = DeformableItem(
            source_frame_of_reference_uid=str(item.SourceFrameOfReferenceUID),
            pre_matrix=_read_matrix(pre[0]) if pre else np.eye(4),
            post_matrix=_read_matrix(post[0]) if post else np.eye(4),
            referenced_sop_instance_uids=[
                str(r.ReferencedSOPInstanceUID) for r in item.get("ReferencedImageSequence", [])
            ],
        )
        grids = item.get("DeformableRegistrationGridSequence")
        if grids:
            grid = grids[0]
            dims = tuple(int(v) for v in grid.GridDimensions)
            deformable.grid_dimensions = dims  # type: ignore[assignment]
            deformable.grid_origin = np.array([float(v) for v in grid.ImagePositionPatient])
            deformable.grid_orientation = np.array([float(v) for v in grid.ImageOrientationPatient])
            deformable.grid_resolution = np.array([float(v) for v in grid.GridResolution])
            data = np.frombuffer(grid.VectorGridData, dtype="<f4")
            deformable.vectors = data.reshape(dims[2], dims[1], dims[0], 3)
        reg.deformable_items.append(deformable)
    return reg
