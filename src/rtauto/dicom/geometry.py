"""Image geometry: a series of 2-D slices loaded as one volume with its patient-space affine.

The affine is built from ImagePositionPatient, ImageOrientationPatient and PixelSpacing only:
no fixed rotations and no assumption of an axial head-first-supine patient, so HFS, HFP, FFS,
FFP, decubitus and oblique series all map voxels to the right place in patient space (LPS, mm).

Index convention: ``array[k, j, i]`` is column ``i``, row ``j`` of slice ``k``; the affine maps
``(i, j, k, 1)`` to patient ``(x, y, z, 1)``. Slices are sorted along the slice normal
(row direction x column direction), so ``k`` increases along that normal.

A series that cannot be one regular volume raises :class:`GeometryError` with the reason:
missing slices, non-uniform spacing, mixed orientations, gantry tilt, several series or
Frames of Reference, duplicate positions, differing image sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from rtauto.errors import RtautoError

__all__ = ["GeometryError", "Volume", "load_series", "slice_normal"]

# Positions and directions in DICOM headers are decimal strings rounded to a few digits.
ORIENTATION_TOLERANCE = 1e-4
SPACING_TOLERANCE_MM = 0.01


class GeometryError(RtautoError):
    """A series cannot be loaded as one regular volume; the message says why and where."""


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane: row direction x column direction."""
    row_dir = np.asarray(orientation[:3], dtype=float)
    col_dir = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row_dir, col_dir)
    return normal / np.linalg.norm(normal)


@dataclass
class Volume:
    """A regular 3-D image in patient space.

    ``array``: (slices, rows, columns) float32 in rescaled units (HU for CT).
    ``affine``: 4x4, voxel index (i = column, j = row, k = slice) to patient LPS mm.
    ``spacing``: (column spacing, row spacing, slice spacing) in mm, i.e. along i, j, k.
    ``direction``: 3x3 whose columns are the unit vectors along i, j and k.
    ``origin``: patient position of voxel (0, 0, 0), the centre of the first pixel.
    ``sop_instance_uids`` and ``headers`` follow the slice order (headers hold no pixel data).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    direction: np.ndarray
    origin: np.ndarray
    sop_instance_uids: list[str]
    frame_of_reference_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_position: str
    headers: list[Dataset] = field(default_factory=list, repr=False)
    sop_class_uid: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def orientation(self) -> list[float]:
        """ImageOrientationPatient of every slice (row direction, column direction)."""
        return [float(v) for v in (*self.direction[:, 0], *self.direction[:, 1])]

    def index_to_patient(self, ijk: np.ndarray) -> np.ndarray:
        """Patient coordinates (N, 3) of voxel indices (N, 3) given as (i, j, k), may be float."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous voxel indices (N, 3) as (i, j, k) of patient points (N, 3)."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=float))
        inverse = np.linalg.inv(self.affine)
        return xyz @ inverse[:3, :3].T + inverse[:3, 3]

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        return self.affine[:3, 3] + k * self.affine[:3, 2]


def _read_headers(files: Iterable[Path | str | Dataset]) -> list[tuple[str, Dataset]]:
    headers = []
    for item in files:
        if isinstance(item, Dataset):
            headers.append((str(getattr(item, "filename", "") or "<dataset>"), item))
        else:
            path = Path(item)
            try:
                headers.append((str(path), pydicom.dcmread(path)))
            except Exception as exc:
                raise GeometryError(f"{path}: not a readable DICOM file ({exc})") from exc
    return headers


_NATIVE_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


def _pixels(ds: Dataset) -> np.ndarray:
    """The stored values of a single-frame image, as pydicom gives them (bits above
    BitsStored masked, or sign-extended for signed data); uncompressed little endian data are
    read straight from the buffer, anything else goes through pydicom."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    bits = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", 0) or 0)
    if (
        syntax in _NATIVE_LITTLE_ENDIAN
        and bits in (8, 16, 32)
        and 0 < stored <= bits
        and int(ds.get("SamplesPerPixel", 1) or 1) == 1
        and int(ds.get("NumberOfFrames", 1) or 1) == 1
        and "PixelData" in ds
    ):
        rows, cols = int(ds.Rows), int(ds.Columns)
        signed = bool(int(ds.get("PixelRepresentation", 0) or 0))
        data = ds.PixelData
        if len(data) >= rows * cols * bits // 8:
            dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
            values = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
            if stored < bits:
                shift = bits - stored
                if signed:
                    values = (values << shift) >> shift
                else:
                    values = values & dtype.type((1 << stored) - 1)
            return values
    return np.asarray(ds.pixel_array)


def _require(ds: Dataset, name: str, where: str) -> object:
    value = ds.get(name)
    if value is None or value == "":
        raise GeometryError(f"{where}: {name} is missing; the slice cannot be placed in space")
    return value


def load_series(files: Iterable[Path | str | Dataset]) -> Volume:
    """Load one image series (one file per slice) as a :class:`Volume`.

    ``files`` are paths or already-read datasets of a single series, in any order. Raises
    :class:`GeometryError` for anything that would put voxels in the wrong place.
    """
    files = list(files)
    headers = _read_headers(files)
    owned = {
        where
        for (where, _), item in zip(headers, files, strict=True)
        if not isinstance(item, Dataset)
    }
    if not headers:
        raise GeometryError("the series holds no image")
    where0, first = headers[0]
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series_uids) > 1:
        raise GeometryError(f"the files belong to {len(series_uids)} series: {sorted(series_uids)}")
    for_uids = {str(ds.get("FrameOfReferenceUID", "")) for _, ds in headers}
    if len(for_uids) > 1:
        raise GeometryError(f"the slices name {len(for_uids)} Frames of Reference")
    frame_of_reference_uid = for_uids.pop()
    if not frame_of_reference_uid:
        raise GeometryError(f"{where0}: FrameOfReferenceUID is missing")

    orientation = np.asarray(
        [float(v) for v in _require(first, "ImageOrientationPatient", where0)], dtype=float
    )
    if orientation.shape != (6,):
        raise GeometryError(f"{where0}: ImageOrientationPatient must hold 6 values")
    row_dir, col_dir = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(row_dir @ col_dir) > 1e-3
    ):
        raise GeometryError(f"{where0}: ImageOrientationPatient is not two orthonormal vectors")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)

    pixel_spacing = [float(v) for v in _require(first, "PixelSpacing", where0)]
    size = (int(_require(first, "Rows", where0)), int(_require(first, "Columns", where0)))
    positions = []
    for where, ds in headers:
        iop = np.asarray([float(v) for v in _require(ds, "ImageOrientationPatient", where)])
        if np.max(np.abs(iop - orientation)) > ORIENTATION_TOLERANCE * 10:
            raise GeometryError(
                f"{where}: ImageOrientationPatient {list(iop)} differs from the series' "
                f"{list(orientation)} (mixed orientations in one series)"
            )
        ps = [float(v) for v in _require(ds, "PixelSpacing", where)]
        if max(abs(a - b) for a, b in zip(ps, pixel_spacing, strict=True)) > 1e-4:
            raise GeometryError(f"{where}: PixelSpacing {ps} differs from {pixel_spacing}")
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise GeometryError(f"{where}: image size differs from the series' {size}")
        positions.append(
            np.asarray([float(v) for v in _require(ds, "ImagePositionPatient", where)])
        )

    distances = np.asarray([p @ normal for p in positions])
    order = np.argsort(distances, kind="stable")
    headers = [headers[i] for i in order]
    positions = [positions[i] for i in order]
    distances = distances[order]

    if len(headers) > 1:
        steps = np.diff(distances)
        if np.any(steps < SPACING_TOLERANCE_MM):
            dup = int(np.argmin(steps))
            raise GeometryError(
                f"{headers[dup][0]} and {headers[dup + 1][0]} lie at the same position "
                f"({distances[dup]:.3f} mm along the normal)"
            )
        # In-plane drift between consecutive slices means the stack is sheared (gantry tilt).
        for n in range(len(positions) - 1):
            delta = positions[n + 1] - positions[n]
            in_plane = delta - (delta @ normal) * normal
            if np.linalg.norm(in_plane) > max(SPACING_TOLERANCE_MM, 1e-3 * abs(delta @ normal)):
                raise GeometryError(
                    f"{headers[n + 1][0]}: slice positions are not along the slice normal "
                    f"(gantry tilt or sheared stack, offset {np.round(in_plane, 3).tolist()} mm); "
                    "resample the series before use"
                )
        slice_spacing = float(np.median(steps))
        # Decimal rounding of positions allows a small jitter, never a gap or a different step.
        tolerance = max(SPACING_TOLERANCE_MM, 0.01 * slice_spacing)
        bad = np.flatnonzero(np.abs(steps - slice_spacing) > tolerance)
        if bad.size:
            n = int(bad[0])
            ratio = steps[n] / slice_spacing
            if abs(ratio - round(ratio)) < 0.05 and round(ratio) >= 2:
                missing = int(round(ratio)) - 1
                raise GeometryError(
                    f"{missing} slice(s) missing between {headers[n][0]} and "
                    f"{headers[n + 1][0]} ({steps[n]:.3f} mm gap, spacing {slice_spacing:.3f} mm)"
                )
            raise GeometryError(
                f"non-uniform slice spacing: {steps[n]:.3f} mm between {headers[n][0]} and "
                f"{headers[n + 1][0]}, {slice_spacing:.3f} mm elsewhere"
            )
        # The end-to-end mean averages out the per-slice rounding of the positions.
        slice_spacing = float((distances[-1] - distances[0]) / (len(distances) - 1))
    else:
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        slice_spacing = float(thickness)

    array = np.empty((len(headers), *size), dtype=np.float32)  # filled in place: one copy
    for k, (where, ds) in enumerate(headers):
        try:
            pixels = _pixels(ds)
        except Exception as exc:
            raise GeometryError(f"{where}: pixel data cannot be decoded ({exc})") from exc
        if pixels.shape != size:
            raise GeometryError(f"{where}: pixel data holds {pixels.shape}, not {size}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        np.multiply(pixels, np.float32(slope), out=array[k], casting="unsafe")
        array[k] += np.float32(intercept)

    spacing = (float(pixel_spacing[1]), float(pixel_spacing[0]), slice_spacing)
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    origin = positions[0].astype(float)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing)
    affine[:3, 3] = origin

    stripped = []
    for where, ds in headers:
        if where in owned:
            # read here: the pixel data (in ``array`` now) is dropped from the dataset itself,
            # leaving the other elements encoded until someone reads them
            del ds[0x7FE00010]
            stripped.append(ds)
            continue
        header = Dataset()  # the caller's dataset is left as it is
        for elem in ds:
            if elem.tag != 0x7FE00010:  # pixel data lives in ``array`` only
                header.add(elem)
        header.file_meta = getattr(ds, "file_meta", Dataset())
        stripped.append(header)

    return Volume(
        array=array,
        affine=affine,
        spacing=spacing,
        direction=direction,
        origin=origin,
        sop_instance_uids=[str(ds.SOPInstanceUID) for _, ds in headers],
        frame_of_reference_uid=frame_of_reference_uid,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=series_uids.pop(),
        patient_position=str(first.get("PatientPosition", "")),
        headers=stripped,
        sop_class_uid=str(first.get("SOPClassUID", "")),
    )
