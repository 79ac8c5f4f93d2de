"""The DVH engine: dose interpolated to the structure, volumes from the contours.

A structure is a stack of axial contour planes. Each plane is sampled on a regular in-plane
lattice finer than the dose grid (``supersample``) and the tissue between two neighbouring
planes at several heights (``z_supersample``): there the two contours are blended so the
cross-section area follows a monotone cubic through the plane areas (a power law fitted to the
next planes where an end plane has no area of its own: the surface touches that plane); the
cells inside one contour only join or leave in the order a morph of the two contours' signed
distances reaches them (shape-based interpolation), so a shape that moves in plane follows. The
dose is interpolated trilinearly at every sample; every sample carries its share of the plane
area from the exact polygon areas (even-odd rule for holes), spread over the dose range its
cell spans. End capping decides how far the first and last planes reach: ``"half"`` (half a
slice beyond the end contour, as treatment planning systems and the analytic Nelms references
do) or ``"none"`` (the structure stops at the end contour).

Typical use::

    dose = DoseGrid.from_dataset(pydicom.dcmread("rtdose.dcm"))
    structures = read_structures(pydicom.dcmread("rtss.dcm"))
    dvh = compute_dvh(structures[4], dose)
    dvh.d_percent(95), dvh.d_cc(0.03), dvh.v_gy(20), dvh.mean
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from scipy.interpolate import PchipInterpolator
from scipy.ndimage import distance_transform_cdt, map_coordinates

__all__ = [
    "DVH",
    "DoseGrid",
    "Structure",
    "compute_dvh",
    "polygon_area",
    "read_structures",
]

EndCap = Literal["half", "none"]

# Planes closer than this (mm) are the same plane (contour z values carry rounding noise).
_PLANE_TOLERANCE_MM = 0.01


def polygon_area(points: np.ndarray) -> float:
    """Unsigned area (mm²) of a closed polygon given as an (N, 2) array (shoelace formula)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _points_in_polygon(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd ray casting of (M, 2) points against one (N, 2) polygon."""
    x, y = points[:, 0:1], points[:, 1:2]
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    straddles = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    return np.count_nonzero(straddles & (x < x_cross), axis=1) % 2 == 1


@dataclass(frozen=True)
class DoseGrid:
    """An RTDOSE grid in patient coordinates (Gy), sampled by trilinear interpolation."""

    values: np.ndarray  # (frames, rows, columns), Gy
    origin: np.ndarray  # ImagePositionPatient of the first frame
    row_direction: np.ndarray  # direction of increasing column index
    column_direction: np.ndarray  # direction of increasing row index
    normal: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    frame_offsets: np.ndarray  # position of each frame along ``normal``, relative to origin
    frame_of_reference_uid: str = ""
    sop_instance_uid: str = ""
    referenced_plan_uids: tuple[str, ...] = ()
    summation_type: str = ""
    units: str = ""

    @classmethod
    def from_dataset(cls, ds: Dataset) -> DoseGrid:
        """Build from an RTDOSE dataset (single- or multi-frame; any orientation)."""
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        row_dir, col_dir = iop[:3], iop[3:]
        normal = np.cross(row_dir, col_dir)
        origin = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
        pixels = ds.pixel_array.astype(np.float32)
        if pixels.ndim == 2:
            pixels = pixels[np.newaxis]
        pixels *= np.float32(float(ds.get("DoseGridScaling", 1.0)))
        offsets = np.asarray(
            [float(v) for v in ds.get("GridFrameOffsetVector", None) or [0.0]], dtype=float
        )
        # PS3.3 C.8.8.3.2: offsets may be absolute when the first one equals the origin's
        if offsets[0] != 0.0 and abs(offsets[0] - float(np.dot(origin, normal))) < 1e-3:
            offsets = offsets - offsets[0]
        if len(offsets) > 1 and offsets[1] < offsets[0]:
            pixels = pixels[::-1].copy()
            origin = origin + offsets[-1] * normal
            offsets = offsets[::-1] - offsets[-1]
        spacing = tuple(float(v) for v in ds.PixelSpacing)
        plans = tuple(
            str(item.ReferencedSOPInstanceUID)
            for item in ds.get("ReferencedRTPlanSequence", [])
            if "ReferencedSOPInstanceUID" in item
        )
        return cls(
            values=pixels,
            origin=origin,
            row_direction=row_dir,
            column_direction=col_dir,
            normal=normal,
            pixel_spacing=(spacing[0], spacing[1]),
            frame_offsets=offsets,
            frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            referenced_plan_uids=plans,
            summation_type=str(ds.get("DoseSummationType", "")),
            units=str(ds.get("DoseUnits", "")),
        )

    @property
    def frame_spacing(self) -> float:
        """Mean distance between frames (mm); 0 for a single frame."""
        if len(self.frame_offsets) < 2:
            return 0.0
        return float(self.frame_offsets[-1] - self.frame_offsets[0]) / (len(self.frame_offsets) - 1)

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous (frame, row, column) indices of (N, 3) patient points."""
        rel = points - self.origin
        col = rel @ self.row_direction / self.pixel_spacing[1]
        row = rel @ self.column_direction / self.pixel_spacing[0]
        along = rel @ self.normal
        frames = np.arange(len(self.frame_offsets), dtype=float)
        if len(frames) == 1:
            frame = np.where(np.abs(along) < 1e-3, 0.0, np.inf)
        elif np.allclose(np.diff(self.frame_offsets), self.frame_spacing, atol=1e-4):
            # evenly spaced frames; within half a frame beyond the ends: the edge frame's dose
            frame = along / self.frame_spacing
            last = float(frames[-1])
            in_reach = (frame >= -0.5) & (frame <= last + 0.5)
            frame = np.where(in_reach, np.clip(frame, 0.0, last), np.inf)
        else:
            frame = np.interp(along, self.frame_offsets, frames, left=np.nan, right=np.nan)
            # points within half a frame beyond the first/last frame take the edge frame's dose
            half = 0.5 * self.frame_spacing
            frame = np.where(np.isnan(frame) & (along < 0) & (along >= -half), 0.0, frame)
            top = self.frame_offsets[-1]
            frame = np.where(
                np.isnan(frame) & (along > top) & (along <= top + half), frames[-1], frame
            )
            frame = np.where(np.isnan(frame), np.inf, frame)
        return np.stack([frame, row, col], axis=1)

    def inside(self, index: np.ndarray) -> np.ndarray:
        """Which (N, 3) indices lie within the grid (half a voxel margin in plane)."""
        shape = np.asarray(self.values.shape, dtype=float)
        return np.all((index >= -0.5) & (index <= shape - 0.5), axis=1)

    def sample(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Doses (Gy) at (N, 3) patient points and the mask of points inside the grid."""
        index = self.to_index(points)
        inside = self.inside(index)
        doses = np.zeros(len(points), dtype=np.float64)
        if inside.any():
            doses[inside] = map_coordinates(
                self.values, index[inside].T, order=1, mode="nearest", prefilter=False
            )
        return doses, inside

    def sample_with_gradient(self, points: np.ndarray) -> tuple[np.ndarray, ...]:
        """Doses (Gy), inside mask and dose gradients (Gy/mm, patient axes, (N, 3); those of
        the nearest voxel, exact in a linear field) at (N, 3) patient points."""
        index = self.to_index(points)
        inside = self.inside(index)
        doses = np.zeros(len(points), dtype=np.float64)
        gradient = np.zeros((len(points), 3))
        if inside.any():
            within = index[inside]
            doses[inside] = map_coordinates(
                self.values, within.T, order=1, mode="nearest", prefilter=False
            )
            gradient[inside] = self._voxel_gradients(within)
        return doses, inside, gradient

    def _voxel_gradients(self, index: np.ndarray) -> np.ndarray:
        """Central-difference gradients (Gy/mm, patient axes) at the voxels nearest to (N, 3)
        continuous indices inside the grid."""
        last = np.asarray(self.values.shape) - 1
        nearest = np.clip(np.rint(index), 0, last).astype(np.intp)
        steps = (self.frame_spacing or 1.0, self.pixel_spacing[0], self.pixel_spacing[1])
        directions = (self.normal, self.column_direction, self.row_direction)
        flat_values = self.values.reshape(-1)
        strides = (self.values.shape[1] * self.values.shape[2], self.values.shape[2], 1)
        flat = nearest @ np.asarray(strides, dtype=np.intp)
        gradient = np.zeros((len(index), 3))
        for axis in range(3):
            if last[axis] == 0:
                continue
            up = nearest[:, axis] < last[axis]
            down = nearest[:, axis] > 0
            rise = flat_values.take(flat + up * strides[axis])
            rise -= flat_values.take(flat - down * strides[axis])
            along = rise / ((up.astype(np.float32) + down) * np.float32(steps[axis]))
            for k in np.flatnonzero(directions[axis]):
                gradient[:, k] += along * directions[axis][k]
        return gradient

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned patient-coordinate box (min, max corners) of the voxel centres."""
        frames, rows, cols = self.values.shape
        corners = []
        for f in (0, frames - 1):
            for r in (0, rows - 1):
                for c in (0, cols - 1):
                    corners.append(
                        self.origin
                        + c * self.pixel_spacing[1] * self.row_direction
                        + r * self.pixel_spacing[0] * self.column_direction
                        + self.frame_offsets[f] * self.normal
                    )
        stacked = np.asarray(corners)
        return stacked.min(axis=0), stacked.max(axis=0)

    def max_point(self) -> tuple[float, np.ndarray]:
        """The maximum dose (Gy) of the grid and its voxel centre in patient coordinates."""
        flat = int(np.argmax(self.values))
        f, r, c = np.unravel_index(flat, self.values.shape)
        point = (
            self.origin
            + c * self.pixel_spacing[1] * self.row_direction
            + r * self.pixel_spacing[0] * self.column_direction
            + self.frame_offsets[f] * self.normal
        )
        return float(self.values[f, r, c]), point


@dataclass
class Structure:
    """One ROI of a structure set: its axial contour planes (z -> list of (N, 2) polygons)."""

    number: int
    name: str
    interpreted_type: str = ""
    planes: dict[float, list[np.ndarray]] = field(default_factory=dict)
    points: list[np.ndarray] = field(default_factory=list)  # POINT contours (x, y, z)
    non_axial: int = 0  # contours whose points do not share one z (not used for volumes)
    color: tuple[int, int, int] = (0, 0, 0)
    default_thickness: float = 0.0  # slice spacing of the structure set, for 1-plane ROIs
    _areas: dict[float, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_empty(self) -> bool:
        return not self.planes

    def plane_z(self) -> np.ndarray:
        return np.asarray(sorted(self.planes), dtype=float)

    def plane_area(self, z: float) -> float:
        """Area (mm²) of one plane: polygons inside an odd number of others are holes."""
        cached = self._areas.get(z)
        if cached is not None:
            return cached
        polygons = self.planes[z]
        total = 0.0
        for i, poly in enumerate(polygons):
            depth = sum(
                1
                for j, other in enumerate(polygons)
                if j != i and _points_in_polygon(poly[:1], other)[0]
            )
            total += polygon_area(poly) * (-1.0 if depth % 2 else 1.0)
        self._areas[z] = max(total, 0.0)
        return self._areas[z]

    def slabs(self, end_cap: EndCap = "half") -> list[tuple[float, float, float]]:
        """(z, bottom, top) of the slab each plane stands for, in mm."""
        zs = self.plane_z()
        if len(zs) == 0:
            return []
        gaps = np.diff(zs)
        typical = float(np.median(gaps)) if len(gaps) else self.default_thickness
        if typical <= 0:
            typical = self.default_thickness or 1.0
        slabs = []
        for i, z in enumerate(zs):
            below = gaps[i - 1] if i > 0 else None
            above = gaps[i] if i < len(gaps) else None
            # a gap much wider than the slice spacing separates two parts of the structure
            lo = below / 2 if below is not None and below <= 1.5 * typical else None
            hi = above / 2 if above is not None and above <= 1.5 * typical else None
            cap = typical / 2 if end_cap == "half" else 0.0
            slabs.append(
                (
                    float(z),
                    float(z - (lo if lo is not None else cap)),
                    float(z + (hi if hi is not None else cap)),
                )
            )
        return slabs

    def volume_cc(self, end_cap: EndCap = "half") -> float:
        """Volume from the contours (cc): plane areas times slab heights. (A DVH's volume
        integrates the smooth area profile between the planes, so it differs slightly.)"""
        return (
            sum(self.plane_area(z) * (top - bottom) for z, bottom, top in self.slabs(end_cap))
            / 1000.0
        )

    def contains(self, point: Sequence[float], end_cap: EndCap = "half") -> bool:
        """Whether a patient point lies inside the structure (slab model, even-odd rule)."""
        x, y, z = (float(v) for v in point)
        for plane_z, bottom, top in self.slabs(end_cap):
            if bottom <= z <= top or abs(z - plane_z) < _PLANE_TOLERANCE_MM:
                inside = 0
                for poly in self.planes[plane_z]:
                    inside ^= int(_points_in_polygon(np.asarray([[x, y]]), poly)[0])
                if inside:
                    return True
        return False

    def bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Axis-aligned box (min, max corners) of the contour points, or None when empty."""
        if self.is_empty:
            return None
        xy = np.concatenate([p for polys in self.planes.values() for p in polys])
        zs = self.plane_z()
        return (
            np.asarray([xy[:, 0].min(), xy[:, 1].min(), zs.min()]),
            np.asarray([xy[:, 0].max(), xy[:, 1].max(), zs.max()]),
        )


def _contour_points(contour: Dataset) -> np.ndarray | None:
    """ContourData as (N, 3) floats, parsed from the raw DS bytes when still raw (fast)."""
    tag = 0x30060050
    if tag not in contour:
        return None
    raw = contour.get_item(tag)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes | bytearray):
        numbers = np.array(value.replace(b"\\", b" ").split(), dtype=float)
    else:
        numbers = np.asarray([float(v) for v in contour.ContourData], dtype=float)
    if numbers.size < 3:
        return None
    return numbers[: numbers.size // 3 * 3].reshape(-1, 3)


def read_structures(ds: Dataset) -> dict[int, Structure]:
    """The ROIs of an RTSTRUCT dataset by ROI number, with their contours in mm."""
    structures: dict[int, Structure] = {}
    for roi in ds.get("StructureSetROISequence", []):
        number = int(roi.ROINumber)
        structures[number] = Structure(number=number, name=str(roi.get("ROIName", "")).strip())
    for obs in ds.get("RTROIObservationsSequence", []):
        number = int(obs.get("ReferencedROINumber", -1))
        if number in structures:
            structures[number].interpreted_type = str(obs.get("RTROIInterpretedType", "") or "")
    all_z: list[float] = []
    for roi_contour in ds.get("ROIContourSequence", []):
        number = int(roi_contour.get("ReferencedROINumber", -1))
        structure = structures.get(number)
        if structure is None:
            continue
        color = roi_contour.get("ROIDisplayColor")
        if color is not None and len(color) == 3:
            structure.color = tuple(int(c) for c in color)  # type: ignore[assignment]
        for contour in roi_contour.get("ContourSequence", []):
            xyz = _contour_points(contour)
            if xyz is None:
                continue
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR"))
            if kind == "POINT" or len(xyz) == 1:
                structure.points.append(xyz[0])
                continue
            if np.ptp(xyz[:, 2]) > _PLANE_TOLERANCE_MM:
                structure.non_axial += 1
                continue
            z = round(float(xyz[0, 2]), 2)
            structure.planes.setdefault(z, []).append(xyz[:, :2])
            all_z.append(z)
    # slice spacing of the whole set: the slab height of an ROI drawn on one plane only
    unique_z = np.unique(np.asarray(all_z))
    spacing = float(np.median(np.diff(unique_z))) if len(unique_z) > 1 else 0.0
    for structure in structures.values():
        structure.default_thickness = spacing
    return structures


@dataclass
class DVH:
    """A cumulative DVH, kept as a piecewise-linear curve.

    Doses in Gy, volumes in cc. ``cumulative[i]`` is the volume receiving at least
    ``doses[i]`` (doses fall, volumes grow); values between the knots are linear. ``volume`` is
    the structure volume from its contours; ``outside_grid`` the volume that lies outside the
    dose grid (counted at 0 Gy).
    """

    name: str
    volume: float
    doses: np.ndarray  # knots of the curve, from highest to lowest dose
    cumulative: np.ndarray  # volume (cc) receiving at least doses[i]
    minimum: float
    maximum: float
    mean: float
    outside_grid: float = 0.0

    def d_cc(self, volume_cc: float) -> float:
        """The minimum dose (Gy) to the hottest ``volume_cc`` cc of the structure."""
        if self.volume <= 0 or len(self.doses) == 0:
            return float("nan")
        if volume_cc >= self.volume:
            return self.minimum
        if volume_cc <= 0:
            return self.maximum
        return float(np.interp(volume_cc, self.cumulative, self.doses))

    def d_percent(self, percent: float) -> float:
        """The minimum dose (Gy) to the hottest ``percent`` % of the structure."""
        return self.d_cc(self.volume * percent / 100.0)

    def v_gy(self, dose_gy: float) -> float:
        """Volume (cc) receiving at least ``dose_gy`` (the inverse of :meth:`d_cc`)."""
        if len(self.doses) == 0 or dose_gy > self.maximum:
            return 0.0
        if dose_gy <= self.minimum:
            return self.volume
        value = np.interp(-dose_gy, -self.doses, self.cumulative, left=0.0, right=self.volume)
        return float(min(max(value, 0.0), self.volume))

    def v_gy_percent(self, dose_gy: float) -> float:
        """Percent of the structure volume receiving at least ``dose_gy``."""
        return 100.0 * self.v_gy(dose_gy) / self.volume if self.volume > 0 else float("nan")

    @property
    def d_max_003cc(self) -> float:
        """Dmax as the minimum dose to the hottest 0.03 cc (ICRU 83 near-maximum)."""
        return self.d_cc(0.03)

    def curve(self, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """(dose Gy, volume %) of the cumulative DVH on ``points`` evenly spaced doses."""
        top = max(self.maximum, 1e-6)
        dose_axis = np.linspace(0.0, top, points)
        if len(self.doses) == 0:
            return dose_axis, np.zeros(points)
        vols = np.interp(-dose_axis, -self.doses, self.cumulative, left=0.0, right=self.volume)
        return dose_axis, 100.0 * vols / self.volume if self.volume > 0 else vols

    def metric(self, name: str) -> float:
        """A metric by name: ``Dmean``, ``Dmax``, ``Dmin``, ``D0.03cc``, ``D95%``, ``V20Gy``
        (cc), ``V20Gy%`` (percent), ``Volume``."""
        key = name.strip().replace(" ", "")
        lower = key.lower()
        if lower == "dmean":
            return self.mean
        if lower == "dmax":
            return self.d_max_003cc
        if lower == "dmin":
            return self.minimum
        if lower == "volume":
            return self.volume
        if lower.startswith("d") and lower.endswith("cc"):
            return self.d_cc(float(key[1:-2]))
        if lower.startswith("d") and lower.endswith("%"):
            return self.d_percent(float(key[1:-1]))
        if lower.startswith("v") and lower.endswith("gy%"):
            return self.v_gy_percent(float(key[1:-3]))
        if lower.startswith("v") and lower.endswith("gy"):
            return self.v_gy(float(key[1:-2]))
        raise ValueError(f"unknown DVH metric {name!r}")


# An end plane whose area is below this share of its neighbour's touches the surface.
_TANGENT_AREA_RATIO = 0.01

# Knots of the cumulative curve, evenly spaced from Dmin to Dmax (0.4 cGy apart for 30 Gy).
_DOSE_KNOTS = 1 << 13

# Samples per structure the automatic step aims at: accurate D-points, bounded run time.
SAMPLE_BUDGET = 30_000


def _auto_step(structure: Structure, dose: DoseGrid, supersample: int | None, volume: float):
    """In-plane sample step (mm): the dose pixel spacing divided by ``supersample``, or (auto)
    about ``SAMPLE_BUDGET`` samples over the structure volume, between 0.1 mm and 3 times the
    dose pixel spacing (a divisor of the pixel spacing when finer than it)."""
    pixel = min(dose.pixel_spacing)
    if supersample:
        return pixel / supersample
    target = max((max(volume, 1e-6) * 1000.0 / SAMPLE_BUDGET) ** (1 / 3), 0.1)
    if target >= pixel:
        return min(target, 3 * pixel)
    return pixel / max(math.floor(pixel / target), 1)


def _plane_mask(polygons: list[np.ndarray], lo: np.ndarray, step: float, shape: tuple[int, int]):
    """Lattice points (index i at ``lo + i * step``) inside the polygons, even-odd rule.

    Scanline fill, vectorised: every edge crossing of a lattice row toggles the parity from
    the first column right of the crossing on; a running sum of toggles along the row gives
    the parity (holes need no special case).
    """
    starts = np.concatenate(polygons)
    ends = np.concatenate([np.roll(p, -1, axis=0) for p in polygons])
    x1, y1 = (starts[:, 0] - lo[0]) / step, (starts[:, 1] - lo[1]) / step
    x2, y2 = (ends[:, 0] - lo[0]) / step, (ends[:, 1] - lo[1]) / step
    rows = np.arange(shape[0], dtype=float)[:, np.newaxis]
    straddles = (y1 > rows) != (y2 > rows)
    row_index, edge = np.nonzero(straddles)
    t = (row_index - y1[edge]) / (y2[edge] - y1[edge])
    crossing = x1[edge] + t * (x2[edge] - x1[edge])
    column = np.clip(np.ceil(crossing), 0, shape[1]).astype(np.int64)
    toggles = np.bincount(
        row_index * (shape[1] + 1) + column, minlength=shape[0] * (shape[1] + 1)
    ).reshape(shape[0], shape[1] + 1)
    return (np.cumsum(toggles[:, : shape[1]], axis=1) % 2).astype(bool)


def _spread_cumulative(
    doses: np.ndarray, half_widths: np.ndarray, weights: np.ndarray, lowest: float, highest: float
) -> tuple[np.ndarray, np.ndarray]:
    """Knots (doses falling, cumulative volumes) of the DVH whose samples each spread their
    weight uniformly over [dose - half width, dose + half width], clipped to [lowest, highest].

    The volume below a dose is piecewise linear; its second derivative (+w/width at each
    range's start, -w/width at its end) is deposited on ``_DOSE_KNOTS`` evenly spaced doses
    with a linear split, which makes the double running sum exact at every knot.
    """
    span = max(highest - lowest, 1e-9)
    knot_step = span / (_DOSE_KNOTS - 1)
    upper = np.minimum(doses + half_widths, highest)
    lower = np.maximum(doses - half_widths, lowest)
    # a range narrower than a knot step is a step of the curve, kept finite
    lower = np.maximum(np.minimum(lower, upper - knot_step), lowest)
    upper = lower + np.maximum(upper - lower, knot_step)
    density = weights / (upper - lower) * knot_step
    position = np.concatenate([lower, upper]) - lowest
    change = np.concatenate([density, -density])
    node = np.clip(position / knot_step, 0, _DOSE_KNOTS + 1)
    base = np.floor(node).astype(np.intp)
    frac = node - base
    second = np.bincount(base, change * (1 - frac), minlength=_DOSE_KNOTS + 2)
    second += np.bincount(base + 1, change * frac, minlength=_DOSE_KNOTS + 2)
    below = np.concatenate([[0.0], np.cumsum(np.cumsum(second))])[:_DOSE_KNOTS]
    total = float(weights.sum())
    cumulative = np.clip(total - below, 0.0, total)
    knots = lowest + np.arange(_DOSE_KNOTS) * knot_step
    return knots[::-1], np.maximum.accumulate(cumulative[::-1])


def _morph_moment(below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Fraction of the way from the lower to the upper plane at which the linear morph of two
    signed distances crosses zero (where a cell joins or leaves the structure)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        moment = below / (below - above)
    return np.nan_to_num(moment, nan=0.5, posinf=1.0, neginf=0.0)


def _area_profiles(zs: list[float], areas: list[float], joined: list[bool]) -> list:
    """For each plane, the cross-section area (mm²) as a function of height up to the next
    plane: a monotone cubic (PCHIP) through the areas of the run of joined planes, which
    follows the curved area profiles of spheres and cones that straight lines cut short."""
    profiles: list = [None] * len(zs)
    start = 0
    for i in range(len(zs)):
        if joined[i]:
            continue
        if i > start:  # planes start..i form one run
            run = slice(start, i + 1)
            if i - start >= 2:
                curve = PchipInterpolator(zs[run], areas[run], extrapolate=True)
            else:
                curve = partial(np.interp, xp=zs[run], fp=areas[run])
            profiles[start:i] = [curve] * (i - start)
            if i - start >= 2:
                # an end plane of (almost) no area is where the surface touches the plane
                for end, inner, next_inner in ((start, start + 1, start + 2), (i, i - 1, i - 2)):
                    tangent = _tangent_profile(zs, areas, end, inner, next_inner)
                    if tangent is not None:
                        profiles[min(end, inner)] = tangent
        start = i + 1
    return profiles


def _tangent_profile(zs: list[float], areas: list[float], end: int, inner: int, next_inner: int):
    """Area profile between an end plane of negligible area and its neighbour: a power law
    A(h) = A_inner (h / gap)^p of the distance h from the end plane, the exponent fitted to
    the two planes next to it (p = 1 for a sphere's pole, 1/2 for a lying cylinder's edge,
    2 for a cone's apex). None when the end plane has area of its own."""
    a1, a2 = areas[inner], areas[next_inner]
    if not 0 < a1 < a2 or areas[end] > _TANGENT_AREA_RATIO * a1:
        return None
    gap = abs(zs[inner] - zs[end])
    exponent = math.log(a2 / a1) / math.log(abs(zs[next_inner] - zs[end]) / gap)
    exponent = min(max(exponent, 0.25), 3.0)
    z_end = zs[end]

    def profile(z: np.ndarray) -> np.ndarray:
        return a1 * np.clip(np.abs(np.asarray(z) - z_end) / gap, 0.0, 1.0) ** exponent

    return profile


def compute_dvh(
    structure: Structure,
    dose: DoseGrid,
    *,
    supersample: int | None = None,
    z_supersample: int | None = None,
    end_cap: EndCap = "half",
) -> DVH:
    """The DVH of ``structure`` in ``dose``.

    ``supersample`` divides the dose pixel spacing for the in-plane sample lattice (``None``:
    chosen from the structure size so small structures get enough samples). Between two
    neighbouring contour planes the structure is sampled at ``z_supersample`` heights
    (``None``: a height step no larger than the in-plane step, at most 8) and the two
    contours are blended as the module docstring says (area profile through the plane areas,
    cells in one contour only ordered by a signed-distance morph), so a sphere's poles, a
    lying cylinder's edges and a lying cone's apex are not stair steps. End caps
    (``end_cap``, module docstring) and planes separated by a gap keep their own contour.
    Sample volumes are scaled so each plane's area is the exact polygon area of its contours.
    Each sample's volume is spread over the dose range its cell spans (from the local dose
    gradient), so D-points fall between samples, not on them.
    """
    slabs = structure.slabs(end_cap)
    empty = np.zeros(0)
    nan = float("nan")
    if not slabs:
        return DVH(structure.name, 0.0, empty, empty, nan, nan, nan)
    step = _auto_step(structure, dose, supersample, structure.volume_cc(end_cap))
    lo_hi = structure.bounds()
    assert lo_hi is not None
    lo = lo_hi[0][:2] - step / 2  # cell centres: the lattice is symmetric about the contour
    shape = (
        int(math.ceil((lo_hi[1][1] - lo[1]) / step)) + 2,
        int(math.ceil((lo_hi[1][0] - lo[0]) / step)) + 2,
    )
    zs = [z for z, _, _ in slabs]
    masks = [_plane_mask(structure.planes[z], lo, step, shape) for z in zs]
    areas = [structure.plane_area(z) for z in zs]
    # exact polygon area over rasterized area: corrects each plane's volume to the contours
    cell_volume = [
        a / np.count_nonzero(m) if np.count_nonzero(m) else 0.0
        for a, m in zip(areas, masks, strict=True)
    ]

    def count(height: float, cap: int) -> int:
        return z_supersample or int(min(max(round(height / step), 1), cap))

    chunks: list[np.ndarray] = []  # (N, 3) sample points
    chunk_weights: list[np.ndarray] = []  # volume (mm³) of each sample
    chunk_dz: list[np.ndarray] = []  # height of each sample's cell

    def add(mask: np.ndarray, heights: np.ndarray, weights: np.ndarray, dz: float) -> None:
        """Samples at ``mask`` on every height; ``weights`` is (heights, mask points)."""
        iy, ix = np.nonzero(mask)
        keep = weights > 0
        n = np.count_nonzero(keep)
        if n == 0:
            return
        h_index, p_index = np.nonzero(keep)
        chunks.append(
            np.column_stack(
                [lo[0] + ix[p_index] * step, lo[1] + iy[p_index] * step, heights[h_index]]
            )
        )
        chunk_weights.append(weights[keep])
        chunk_dz.append(np.full(n, dz))

    def add_slab(i: int, bottom: float, top: float) -> None:
        if top <= bottom or not masks[i].any():
            return
        n = count(top - bottom, 8)
        heights = bottom + (np.arange(n) + 0.5) * (top - bottom) / n
        dz = (top - bottom) / n
        per_point = np.full(np.count_nonzero(masks[i]), cell_volume[i] * dz)
        add(masks[i], heights, np.broadcast_to(per_point, (n, len(per_point))), dz)

    distances: dict[int, np.ndarray] = {}

    def distance(i: int) -> np.ndarray:
        """Signed distance (lattice cells, positive outside) to plane i's contour; a plane
        too small for the lattice is marked at its vertices."""
        if i not in distances:
            mask = masks[i]
            if not mask.any():
                mask = np.zeros(shape, dtype=bool)
                xy = np.concatenate(structure.planes[zs[i]])
                cells = np.rint((xy - lo) / step).astype(np.intp)
                mask[
                    np.clip(cells[:, 1], 0, shape[0] - 1), np.clip(cells[:, 0], 0, shape[1] - 1)
                ] = True
            distances[i] = distance_transform_cdt(~mask, metric="taxicab").astype(
                float
            ) - distance_transform_cdt(mask, metric="taxicab")
        return distances[i]

    joined = [
        abs(slabs[i + 1][1] - slabs[i][2]) < 1e-9 < slabs[i + 1][0] - slabs[i][0]
        for i in range(len(slabs) - 1)
    ] + [False]
    area_profile = _area_profiles(zs, areas, joined)
    for i, (z, bottom, top) in enumerate(slabs):
        if i == 0 or not joined[i - 1]:
            add_slab(i, bottom, z)
        if not joined[i]:
            add_slab(i, z, top)
            continue
        # the interval up to the next plane: the two contours blended linearly
        gap = slabs[i + 1][0] - z
        union = masks[i] | masks[i + 1]
        if not union.any():
            continue
        n = count(gap, 8)
        t = (np.arange(n) + 0.5) / n
        dz = gap / n
        # blend so the cross-section area follows the smooth area profile through the planes
        rise = areas[i + 1] - areas[i]
        share = t
        if abs(rise) > 1e-9 * max(areas[i], areas[i + 1]):
            share = np.clip((area_profile[i](z + t * gap) - areas[i]) / rise, 0.0, 1.0)
        in_below, in_above = masks[i][union], masks[i + 1][union]
        weights = np.outer(1 - share, in_below * cell_volume[i] * dz) + np.outer(
            share, in_above * cell_volume[i + 1] * dz
        )
        # cells in one contour only join or leave in the order a morph of the two contours'
        # signed distances reaches them, in the number the area profile asks for
        moment = _morph_moment(distance(i)[union], distance(i + 1)[union])
        for region, volume, joining in (
            (in_above & ~in_below, cell_volume[i + 1], True),
            (in_below & ~in_above, cell_volume[i], False),
        ):
            if region.any():
                # cells reached at the same moment join together (no bias from their order)
                _, group, size = np.unique(
                    np.round(moment[region], 6), return_inverse=True, return_counts=True
                )
                first = (np.cumsum(size) - size) / len(group)
                width = size / len(group)
                present = np.clip((share[:, np.newaxis] - first[group]) / width[group], 0.0, 1.0)
                weights[:, region] = (present if joining else 1.0 - present) * volume * dz
        add(union, z + t * gap, weights, dz)

    all_doses: list[np.ndarray] = []
    all_spread: list[np.ndarray] = []
    all_weights: list[np.ndarray] = []
    outside = 0.0
    if chunks:
        points = np.concatenate(chunks)
        doses, inside, grad = dose.sample_with_gradient(points)
        sample_weights = np.concatenate(chunk_weights)
        outside = float(sample_weights[~inside].sum())
        # half the dose range across each sample's cell (variance of a box in a linear field)
        dz = np.concatenate(chunk_dz)
        spread = 0.5 * np.sqrt(
            (grad[:, 0] * step) ** 2 + (grad[:, 1] * step) ** 2 + (grad[:, 2] * dz) ** 2
        )
        all_doses.append(doses)
        all_spread.append(spread)
        all_weights.append(sample_weights)
    faces = []
    for (z, bottom, top), area, mask in zip(slabs, areas, masks, strict=True):
        xy_all = np.concatenate(structure.planes[z])
        if area > 0 and not mask.any():
            # smaller than one lattice cell: its centroid stands for the whole plane
            centre = np.append(xy_all.mean(axis=0), z)[np.newaxis]
            all_doses.append(dose.sample(centre)[0])
            all_spread.append(np.zeros(1))
            all_weights.append(np.asarray([area * (top - bottom)]))
        faces.extend(np.column_stack([xy_all, np.full(len(xy_all), h)]) for h in (bottom, top))
    # the contours themselves at both slab faces bound the extremes (Dmin, Dmax)
    face_doses, face_inside = dose.sample(np.concatenate(faces))
    extremes = face_doses[face_inside]
    if not all_doses:
        return DVH(structure.name, 0.0, empty, empty, nan, nan, nan)
    doses = np.concatenate(all_doses)
    weights = np.concatenate(all_weights) / 1000.0
    if weights.sum() <= 0:
        return DVH(structure.name, 0.0, empty, empty, nan, nan, nan)
    bound = np.concatenate([doses, extremes])
    minimum, maximum = float(bound.min()), float(bound.max())
    mean = float(np.dot(doses, weights) / weights.sum())
    knots, cumulative = _spread_cumulative(
        doses, np.concatenate(all_spread), weights, minimum, maximum
    )
    return DVH(
        name=structure.name,
        volume=float(cumulative[-1]),
        doses=knots,
        cumulative=cumulative,
        minimum=minimum,
        maximum=maximum,
        mean=mean,
        outside_grid=outside / 1000.0,
    )
