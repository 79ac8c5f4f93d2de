"""RT Structure Set: binary masks to CLOSED_PLANAR contours in patient space, and back.

Writing (:func:`write_rtstruct`): each slice of each mask is traced at the 0.5 iso-line
(marching squares), so the contour separates inside pixel centres from outside ones exactly;
points are mapped through the volume's affine, hence correct for any patient position and
oblique series. Holes are written as separate contours (the even-odd rule that TPSs apply to
contours on one plane) or, with ``keyhole=True``, spliced into their outer contour through a
zero-width channel for systems that do not apply even-odd.

Deliberate choices: an empty structure is written as an ROI without contours (its
``RTROIObservations`` entry is kept so the ROI list matches the model's) unless the caller
drops it; traced contours always have at least 3 points, and polygons of 1 or 2 points met
while reading are skipped with a warning since they enclose no area.

Reading (:func:`read_rtstruct`): contours are rasterised (pixel centre inside, even-odd per
slice) onto a :class:`~rtauto.dicom.geometry.Volume`, matched by position along the slice
normal and by Frame of Reference, not by SOP Instance UID, so a structure set whose image
references were rewritten still reads onto its CT.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian, RTStructureSetStorage
from skimage.measure import points_in_poly

from rtauto.dicom.attributes import patient_sex
from rtauto.dicom.geometry import GeometryError, Volume
from rtauto.uids import new_uid

__all__ = [
    "RTSTRUCT_INTERPRETED_TYPES",
    "ContourLimitError",
    "EmptyStructureSetError",
    "Structure",
    "StructureSetInfo",
    "mask_to_polygons",
    "slice_polygons",
    "read_rtstruct",
    "write_rtstruct",
]

log = logging.getLogger(__name__)


class EmptyStructureSetError(ValueError):
    """Nothing is left to write (every structure empty and left out): a structure set needs
    at least one ROI, so none is written."""


class ContourLimitError(ValueError):
    """A structure traced into more contours than the writer was allowed (``max_contours``):
    a mask of scattered voxels, such as a model whose output is noise, not an organ."""


# PS3.3 C.8.8.8: defined terms of RTROIInterpretedType.
RTSTRUCT_INTERPRETED_TYPES = (
    "EXTERNAL",
    "PTV",
    "CTV",
    "GTV",
    "TREATED_VOLUME",
    "IRRAD_VOLUME",
    "OAR",
    "BOLUS",
    "AVOIDANCE",
    "ORGAN",
    "MARKER",
    "REGISTRATION",
    "ISOCENTER",
    "CONTRAST_AGENT",
    "CAVITY",
    "BRACHY_CHANNEL",
    "BRACHY_ACCESSORY",
    "BRACHY_SRC_APP",
    "BRACHY_CHNL_SHLD",
    "SUPPORT",
    "FIXATION",
    "DOSE_REGION",
    "CONTROL",
    "DOSE_MEASUREMENT",
)

# Study Component Management SOP class: what RTReferencedStudySequence conventionally names.
_STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"
_CONTOUR_DATA = Tag(0x3006, 0x0050)


@dataclass
class Structure:
    """One ROI: a boolean mask (slices, rows, columns) on the referenced volume's grid."""

    name: str
    mask: np.ndarray
    color: tuple[int, int, int] = (255, 0, 0)
    interpreted_type: str = "ORGAN"
    description: str = ""  # e.g. "model thorax-oar@2" (written as ROIGenerationDescription)
    algorithm: str = "AUTOMATIC"  # ROIGenerationAlgorithm: AUTOMATIC | SEMIAUTOMATIC | MANUAL
    number: int | None = None  # ROINumber; assigned 1.. in order when None


@dataclass
class StructureSetInfo:
    """What the structure set says about itself and its references (filled by the reader)."""

    sop_instance_uid: str
    frame_of_reference_uid: str
    referenced_series_uid: str
    referenced_sop_instance_uids: list[str] = field(default_factory=list)
    label: str = ""


# --------------------------------------------------------------------------------------------
# masks -> polygons
# --------------------------------------------------------------------------------------------


def _cell_segments() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marching-squares table for a binary image at the 0.5 iso-line.

    A cell is a 2x2 block of pixels with corners TL=1, TR=2, BR=4, BL=8 (its case is the sum
    of the inside corners); its edges are 0 top, 1 right, 2 bottom, 3 left, and a contour
    crosses an edge at its midpoint where the edge's two pixels differ. Returns, per case, the
    number of segments (0-2) and each segment's entry and exit edge, directed so that the
    inside lies on the same side of every segment: segments then chain head to tail into
    closed polygons, outer boundaries and holes turning opposite ways. In the two saddle
    cases the inside corners are cut off one by one (inside pixels connect through faces,
    outside pixels also through corners), as skimage's ``find_contours`` does by default.
    """
    corner = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # (x, y)
    middle = np.array([[0.5, 0.0], [1.0, 0.5], [0.5, 1.0], [0.0, 0.5]])
    ends = [(0, 1), (1, 2), (2, 3), (3, 0)]  # the corners of each edge
    count = np.zeros(16, dtype=np.int64)
    entry = np.zeros((16, 2), dtype=np.int64)
    exit_ = np.zeros((16, 2), dtype=np.int64)
    for case in range(16):
        inside = [(case >> i) & 1 for i in range(4)]
        crossed = [e for e, (a, b) in enumerate(ends) if inside[a] != inside[b]]
        if len(crossed) == 4:
            pairs = [(3, 0), (1, 2)] if inside[0] else [(0, 1), (2, 3)]
        else:
            pairs = [(crossed[0], crossed[1])] if crossed else []
        for s, (e1, e2) in enumerate(pairs):
            a, b = ends[e1]
            f = corner[a] if inside[a] else corner[b]
            p, d = middle[e1], middle[e2] - middle[e1]
            if d[0] * (f[1] - p[1]) - d[1] * (f[0] - p[0]) < 0:
                e1, e2 = e2, e1
            entry[case, s], exit_[case, s] = e1, e2
        count[case] = len(pairs)
    return count, entry, exit_


_SEGMENTS, _ENTRY, _EXIT = _cell_segments()


def _trace(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every closed contour of a boolean mask (slices, rows, columns), all slices at once.

    Returns ``points`` (N, 2) as (column, row) pixel coordinates, the polygons one after the
    other with vertices on straight runs dropped, ``starts`` (P + 1) where each polygon begins
    in ``points`` (and the end), and ``slices`` (P), the slice of each polygon; polygons come
    slice by slice. The tracing is vectorised: the cells a contour crosses are found with
    array operations over the mask's bounding box, their segments chained by pointer doubling
    (each vertex is the start of one segment and the end of one other).
    """
    mask = np.asarray(mask, dtype=bool)
    empty = np.zeros((0, 2)), np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    if not rows.size:
        return empty
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    r0, c0 = int(rows[0]), int(cols[0])
    # traced on the bounding box only (a small organ on a 512x512 slice), padded with outside
    box = np.pad(mask[:, r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1], ((0, 0), (1, 1), (1, 1)))
    depth, height, width = box.shape
    u = box.view(np.uint8)
    # a cell is named by its top-left pixel (the last row and column start no cell)
    cases = np.zeros(box.shape, dtype=np.uint8)
    top_left, top_right, bottom_right, bottom_left = (
        u[:, :-1, :-1],
        u[:, :-1, 1:],
        u[:, 1:, 1:],
        u[:, 1:, :-1],
    )
    cases[:, :-1, :-1] = top_left | top_right << 1 | bottom_right << 2 | bottom_left << 3
    flat = cases.ravel()
    cells = np.flatnonzero((flat != 0) & (flat != 15))
    case = flat[cells]
    second = np.flatnonzero(_SEGMENTS[case] == 2)  # saddles hold two segments
    cell = np.concatenate([cells, cells[second]])
    case = np.concatenate([case, case[second]])
    slot = np.repeat([0, 1], [len(cells), len(second)])
    # a vertex is named 2 * pixel + 0 for the edge right of that pixel, + 1 for the edge below
    edge_pixel = np.array([0, 1, width, 0])  # top: TL, right: TR, bottom: BL, left: TL
    edge_kind = np.array([0, 1, 0, 1])
    entry, exit_ = _ENTRY[case, slot], _EXIT[case, slot]
    start = 2 * (cell + edge_pixel[entry]) + edge_kind[entry]
    end = 2 * (cell + edge_pixel[exit_]) + edge_kind[exit_]
    order = np.argsort(start)
    start, end = start[order], end[order]
    following = np.searchsorted(start, end)  # the segment that goes on from each one
    n = len(start)
    index = np.arange(n)
    # each polygon is named by its smallest segment: the minimum over 1, 2, 4, ... segments
    # ahead, until a doubling changes nothing (then it holds for the whole cycle)
    label, ahead = index, following
    while True:
        smaller = np.minimum(label, label[ahead])
        if np.array_equal(smaller, label):
            break
        label, ahead = smaller, ahead[ahead]
    # steps from each segment to its polygon's first one (list ranking by pointer jumping)
    first = label == index
    steps = (~first).astype(np.int64)
    jump = np.where(first, index, following)
    while True:
        further = jump[jump]
        if np.array_equal(further, jump):
            break
        steps = steps + steps[jump]
        jump = further
    order = np.lexsort((-steps, label))  # each polygon in its own order, from its first segment
    vertex, label = start[order], label[order]
    begins = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    pixel, kind = vertex >> 1, vertex & 1
    x = pixel % width + 0.5 * (1 - kind) + (c0 - 1)
    y = (pixel // width) % height + 0.5 * kind + (r0 - 1)
    points = np.column_stack([x, y])
    slices = pixel[begins] // (height * width)
    # drop vertices on the straight line through their neighbours (the cross product is exact:
    # coordinates are multiples of 0.5)
    stops = np.r_[begins[1:], n]
    length = stops - begins
    polygon = np.repeat(np.arange(len(begins)), length)
    position = np.arange(n) - begins[polygon]
    before = begins[polygon] + (position - 1) % length[polygon]
    after = begins[polygon] + (position + 1) % length[polygon]
    a, b = points - points[before], points[after] - points[before]
    keep = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] != 0
    # every traced polygon keeps at least 4 corners (a single pixel gives a diamond)
    kept = np.add.reduceat(keep.astype(np.int64), begins)
    return points[keep], np.r_[0, np.cumsum(kept)], slices


def _keyhole(polygons: list[np.ndarray]) -> list[np.ndarray]:
    """Splice every hole into its enclosing outer polygon through a zero-width channel."""
    if len(polygons) < 2:
        return polygons
    # Nesting depth by containment of one vertex: even depth = outer boundary, odd = hole.
    depth = [0] * len(polygons)
    parents: list[list[int]] = [[] for _ in polygons]
    for a, inner in enumerate(polygons):
        for b, outer in enumerate(polygons):
            if a != b and points_in_poly(inner[:1], outer)[0]:
                depth[a] += 1
                parents[a].append(b)
    merged = {i: polygons[i] for i in range(len(polygons)) if depth[i] % 2 == 0}
    for hole in (i for i in range(len(polygons)) if depth[i] % 2 == 1):
        parent = next(p for p in parents[hole] if depth[p] == depth[hole] - 1)
        outer, inner = merged[parent], polygons[hole]
        distance = np.linalg.norm(outer[:, None, :] - inner[None, :, :], axis=2)
        a, b = np.unravel_index(int(np.argmin(distance)), distance.shape)
        merged[parent] = np.concatenate(
            [outer[: a + 1], inner[b:], inner[: b + 1], outer[a:]], axis=0
        )
    return list(merged.values())


def mask_to_polygons(mask2d: np.ndarray, *, keyhole: bool = False) -> list[np.ndarray]:
    """Closed polygons (N, 2) as (column, row) pixel coordinates tracing a 2-D boolean mask.

    Outer boundaries and holes come as separate polygons (even-odd) unless ``keyhole``.
    """
    return [polygon for _, polygon in slice_polygons(np.asarray(mask2d)[None], keyhole=keyhole)]


def slice_polygons(mask: np.ndarray, *, keyhole: bool = False) -> list[tuple[int, np.ndarray]]:
    """``(slice, polygon)`` for every contour of a mask (slices, rows, columns), slice by slice;
    polygons (N, 2) as (column, row) pixel coordinates, holes separate unless ``keyhole``."""
    points, starts, slices = _trace(mask)
    polygons = [
        (k, points[a:b])
        for k, a, b in zip(slices.tolist(), starts[:-1].tolist(), starts[1:].tolist(), strict=True)
    ]
    if not keyhole:
        return polygons
    return [
        (k, polygon)
        for k, group in itertools.groupby(polygons, key=lambda item: item[0])
        for polygon in _keyhole([p for _, p in group])
    ]


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------


def _contour_data_element(points: np.ndarray) -> RawDataElement:
    """ContourData encoded once, as DS text (0.001 mm, far below any image resolution).

    Built raw because pydicom would validate every value of every contour one by one;
    Implicit VR keeps the 32-bit value length a long contour may need.
    """
    values = np.round(points, 3).ravel().tolist()  # Python floats format faster than numpy's
    return _raw(_CONTOUR_DATA, "DS", "\\".join(map("{:.3f}".format, values)))


def _raw(tag: int, vr: str, text: str, pad: bytes = b" ") -> RawDataElement:
    value = text.encode("ascii")
    if len(value) % 2:
        value += pad
    return RawDataElement(Tag(tag), vr, len(value), value, 0, True, True)


def _encoded_item(elements: Sequence[RawDataElement]) -> Dataset:
    """A sequence item of elements already encoded as the file is written (implicit VR
    little endian, ASCII values), so the writer copies them instead of converting each."""
    item = Dataset()
    for element in elements:
        item[element.tag] = element
    item.set_original_encoding(True, True, item._character_set)
    return item


def _contour_item(sop_class: str, sop_instance: str, number: int, points: np.ndarray) -> Dataset:
    """One ContourSequence item: a CLOSED_PLANAR polygon (N, 3) in patient coordinates on the
    image ``sop_instance``."""
    image = _encoded_item(
        [_raw(0x00081150, "UI", sop_class, b"\0"), _raw(0x00081155, "UI", sop_instance, b"\0")]
    )
    contour = _encoded_item(
        [
            _raw(0x30060042, "CS", "CLOSED_PLANAR"),
            _raw(0x30060046, "IS", str(len(points))),
            _raw(0x30060048, "IS", str(number)),
            _contour_data_element(points),
        ]
    )
    contour.ContourImageSequence = DicomSequence([image])
    return contour


def _copy_attributes(target: Dataset, source: Dataset, names: Sequence[str]) -> None:
    for name in names:
        setattr(target, name, source.get(name, ""))


def write_rtstruct(
    volume: Volume,
    structures: Sequence[Structure],
    path: Path | str,
    *,
    label: str = "rtauto",
    series_description: str = "rtauto structures",
    series_number: int = 9001,
    manufacturer: str = "rtauto",
    software_versions: Sequence[str] = (),
    derivation_description: str = "",
    keyhole: bool = False,
    drop_empty: bool = False,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    max_contours: int | None = None,
) -> Dataset:
    """Write an RTSTRUCT referencing ``volume``'s images; returns the written dataset.

    Every mask must have ``volume.shape``. ContourImageSequence entries name the CT slice
    each contour lies on; the referenced Frame of Reference, study and series are
    ``volume``'s. ``derivation_description`` goes into StructureSetDescription (the RT
    Structure Set IOD has no DerivationDescription). New UIDs come from
    :func:`rtauto.uids.new_uid` unless given (a step retried after a crash passes its own).

    ``max_contours``: a structure that traces into more contours raises
    :class:`ContourLimitError` before anything is written.
    """
    if not volume.headers:
        raise GeometryError("the volume carries no image headers to reference")
    names = [s.name for s in structures]
    if len(set(names)) != len(names):
        raise ValueError(f"structure names must be unique: {names}")
    for structure in structures:
        if structure.mask.shape != volume.shape:
            raise ValueError(
                f"structure {structure.name}: mask shape {structure.mask.shape} "
                f"is not the volume's {volume.shape}"
            )
        kind = structure.interpreted_type  # empty: unknown (the attribute is Type 2)
        if kind and kind not in RTSTRUCT_INTERPRETED_TYPES:
            raise ValueError(
                f"structure {structure.name}: RTROIInterpretedType "
                f"{structure.interpreted_type!r} is not a DICOM defined term"
            )
    first = volume.headers[0]
    sop_uid = sop_instance_uid or new_uid()
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_uid
    # Patient and General Study modules: copied from the image so the TPS files it together.
    _copy_attributes(ds, first, ["PatientName", "PatientID", "PatientBirthDate"])
    ds.PatientSex = patient_sex(first)
    _copy_attributes(
        ds,
        first,
        ["StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"],
    )
    ds.StudyInstanceUID = volume.study_instance_uid
    if "StudyDescription" in first:
        ds.StudyDescription = first.StudyDescription
    # Frame of Reference module (part of the RT Structure Set IOD since 2019).
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    # RT Series and General Equipment modules.
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid or new_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    if software_versions:
        ds.SoftwareVersions = [v[:64] for v in software_versions]
    # Structure Set module.
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = label[:64]
    if derivation_description:
        ds.StructureSetDescription = derivation_description[:1024]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.InstanceNumber = 1

    image_classes = [str(header.SOPClassUID) for header in volume.headers]
    contour_images = DicomSequence()
    for sop_class, uid in zip(image_classes, volume.sop_instance_uids, strict=True):
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        contour_images.append(item)
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = volume.series_instance_uid
    series_ref.ContourImageSequence = contour_images
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_REFERENCE_CLASS
    study_ref.ReferencedSOPInstanceUID = volume.study_instance_uid
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = volume.frame_of_reference_uid
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    roi_items, contour_items, observation_items = [], [], []
    number = 0
    for structure in structures:
        number = structure.number or number + 1
        contour_sequence = DicomSequence()
        polygons = slice_polygons(structure.mask, keyhole=keyhole)
        if max_contours is not None and len(polygons) > max_contours:
            on_slices = len({k for k, _ in polygons})
            raise ContourLimitError(
                f"structure {structure.name}: {len(polygons)} contours on {on_slices} slices, "
                f"more than the limit of {max_contours}; the mask is scattered voxels, not "
                "an organ"
            )
        if polygons:
            # every point of the structure mapped through the affine at once
            counts = [len(polygon) for _, polygon in polygons]
            slices = np.repeat([k for k, _ in polygons], counts)
            ijk = np.column_stack([np.concatenate([p for _, p in polygons]), slices])
            patient = np.split(volume.index_to_patient(ijk), np.cumsum(counts)[:-1])
            for (k, _), points in zip(polygons, patient, strict=True):
                contour_sequence.append(
                    _contour_item(
                        image_classes[k],
                        volume.sop_instance_uids[k],
                        len(contour_sequence) + 1,
                        points,
                    )
                )
        if not contour_sequence and drop_empty:
            log.info("structure %s is empty and is left out", structure.name)
            continue
        if not contour_sequence:
            log.warning("structure %s is empty: written as an ROI without contours", structure.name)

        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
        roi.ROIName = structure.name[:64]
        if structure.description:
            roi.ROIDescription = structure.description[:1024]
            roi.ROIGenerationDescription = structure.description[:64]
        roi.ROIGenerationAlgorithm = structure.algorithm
        roi_items.append(roi)

        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = [int(c) for c in structure.color]
        if contour_sequence:
            roi_contour.ContourSequence = contour_sequence
        roi_contour.ReferencedROINumber = number
        contour_items.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.ROIObservationLabel = structure.name[:16]
        observation.RTROIInterpretedType = structure.interpreted_type
        observation.ROIInterpreter = ""
        observation_items.append(observation)

    if not roi_items:
        # the three ROI sequences are Type 1: a structure set needs at least one ROI
        raise EmptyStructureSetError(
            "no structure to write: every structure is empty and drop_empty leaves them out"
        )
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    # Approval module: a machine's contours are never approved.
    ds.ApprovalStatus = "UNAPPROVED"

    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return ds


# --------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------


def rasterize_even_odd(polygons: Sequence[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """Pixels whose centre lies inside an odd number of the closed polygons (x, y) (N, 2).

    Scanline parity: every edge toggles the pixels right of where it crosses a row of pixel
    centres, edges half-open in y so a vertex on a row counts once. Linear in the edges.
    """
    toggles = np.zeros((rows, cols + 1), dtype=np.int32)
    for polygon in polygons:
        x0, y0 = polygon[:, 0], polygon[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        low, high = np.minimum(y0, y1), np.maximum(y0, y1)
        first = np.clip(np.ceil(low), 0, rows).astype(np.int64)
        last = np.clip(np.ceil(high), 0, rows).astype(np.int64)  # exclusive
        counts = np.maximum(last - first, 0)
        if not counts.any():
            continue
        edge = np.repeat(np.arange(len(x0)), counts)
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        row = first[edge] + offsets
        t = (row - y0[edge]) / (y1[edge] - y0[edge])
        x = x0[edge] + t * (x1[edge] - x0[edge])
        column = np.clip(np.ceil(x), 0, cols).astype(np.int64)
        np.add.at(toggles, (row, column), 1)
    return (np.cumsum(toggles, axis=1)[:, :cols] % 2).astype(bool)


def _contour_points(contour: Dataset) -> np.ndarray:
    """ContourData as an (N, 3) array, parsed from the raw value when pydicom has not yet."""
    raw = contour.get_item(0x30060050)
    if raw is not None and isinstance(raw.value, bytes):
        text = raw.value.decode("ascii").strip(" \x00")
        values = np.array(text.split("\\"), dtype=float) if text else np.empty(0)
    else:
        values = np.asarray([float(v) for v in contour.get("ContourData", [])], dtype=float)
    return values.reshape(-1, 3)


def read_rtstruct(
    path: Path | str | Dataset,
    volume: Volume,
    *,
    names: Sequence[str] | None = None,
    check_frame_of_reference: bool = True,
) -> tuple[list[Structure], StructureSetInfo]:
    """Rasterise the ROIs of an RTSTRUCT onto ``volume``'s grid.

    A contour is placed on the slice whose position along the normal it lies on (within a
    quarter of the slice spacing); one off every slice, or not parallel to the slices, raises
    :class:`GeometryError`. Contours of a slice combine by the even-odd rule. ``names``
    restricts the ROIs read. The Frame of Reference must be the volume's unless
    ``check_frame_of_reference`` is false.
    """
    ds = path if isinstance(path, Dataset) else pydicom.dcmread(path)
    frame_uids = [
        str(item.FrameOfReferenceUID) for item in ds.get("ReferencedFrameOfReferenceSequence", [])
    ]
    referenced_series = ""
    referenced_images: list[str] = []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                referenced_series = referenced_series or str(series.SeriesInstanceUID)
                referenced_images += [
                    str(i.ReferencedSOPInstanceUID) for i in series.get("ContourImageSequence", [])
                ]
    info = StructureSetInfo(
        sop_instance_uid=str(ds.SOPInstanceUID),
        frame_of_reference_uid=frame_uids[0] if frame_uids else "",
        referenced_series_uid=referenced_series,
        referenced_sop_instance_uids=referenced_images,
        label=str(ds.get("StructureSetLabel", "")),
    )
    roi_frames = {
        int(roi.ROINumber): str(roi.get("ReferencedFrameOfReferenceUID", ""))
        for roi in ds.get("StructureSetROISequence", [])
    }
    if check_frame_of_reference:
        found = set(roi_frames.values()) | set(frame_uids)
        found.discard("")
        if found and found != {volume.frame_of_reference_uid}:
            raise GeometryError(
                f"the structure set's Frame of Reference {sorted(found)} is not the image's "
                f"{volume.frame_of_reference_uid}"
            )

    rois = {int(roi.ROINumber): roi for roi in ds.get("StructureSetROISequence", [])}
    types = {
        int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "")
        for o in ds.get("RTROIObservationsSequence", [])
    }
    inverse = np.linalg.inv(volume.affine)
    depth, rows, cols = volume.shape
    structures = []
    for roi_contour in ds.get("ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        roi = rois.get(number)
        name = str(roi.ROIName) if roi is not None else f"ROI {number}"
        if names is not None and name not in names:
            continue
        mask = np.zeros(volume.shape, dtype=bool)
        planes: dict[int, list[np.ndarray]] = {}
        for contour in roi_contour.get("ContourSequence", []):
            points = _contour_points(contour)
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR"))
            if kind not in ("CLOSED_PLANAR", "OPEN_PLANAR") or len(points) < 3:
                log.warning(
                    "ROI %s: %s contour of %d point(s) skipped (encloses no area)",
                    name,
                    kind,
                    len(points),
                )
                continue
            ijk = points @ inverse[:3, :3].T + inverse[:3, 3]
            k_values = ijk[:, 2]
            k = int(round(float(k_values.mean())))
            if np.ptp(k_values) > 0.25:
                raise GeometryError(
                    f"ROI {name}: a contour is not parallel to the image slices "
                    f"(spans {np.ptp(k_values) * volume.spacing[2]:.2f} mm along the normal)"
                )
            if abs(k_values.mean() - k) > 0.25 or not 0 <= k < depth:
                raise GeometryError(
                    f"ROI {name}: a contour at {k_values.mean() * volume.spacing[2]:.2f} mm "
                    "along the normal lies on no image slice"
                )
            planes.setdefault(k, []).append(ijk[:, :2])
        for k, polygons in planes.items():
            mask[k] = rasterize_even_odd(polygons, rows, cols)
        color = tuple(int(c) for c in roi_contour.get("ROIDisplayColor", [255, 0, 0]))
        structures.append(
            Structure(
                name=name,
                mask=mask,
                color=color,  # type: ignore[arg-type]
                interpreted_type=types.get(number, ""),  # empty: the source did not say
                description=str(roi.get("ROIGenerationDescription", "")) if roi else "",
                algorithm=str(roi.get("ROIGenerationAlgorithm", "")) if roi else "",
                number=number,
            )
        )
    return structures, info
