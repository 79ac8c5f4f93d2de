"""Couch shifts in IEC 61217 table coordinates from a rigid registration.

DICOM patient coordinates (LPS): +x towards the patient's left, +y posterior, +z head.
IEC 61217 fixed/table coordinates, seen by an observer at the foot of the couch facing the
gantry: +X to the observer's right (lateral), +Y towards the gantry (longitudinal), +Z up
(vertical). Rotations follow the right-hand rule about the positive axis: pitch about X, roll
about Y, yaw (couch rotation) about Z.

The registration says where the planned anatomy lies in the image of the day (nominally the
same coordinates, the daily image taken at the treatment position). The couch shift is the
table motion that undoes that displacement: the correction ``x -> R_c (x - iso) + iso + t_c``
about the isocentre, reported in table axes with ``R_c = Rz(yaw) @ Ry(roll) @ Rx(pitch)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rtauto.errors import StepFailed

__all__ = ["SUPPORTED_POSITIONS", "CouchShift", "couch_shift", "patient_to_iec"]

# rows: IEC X, Y, Z expressed in DICOM patient axes (x, y, z) for each patient position
_PATIENT_TO_IEC = {
    "HFS": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float),
    "HFP": np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], float),
    "FFS": np.array([[-1, 0, 0], [0, 0, -1], [0, -1, 0]], float),
    "FFP": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float),
}
SUPPORTED_POSITIONS = tuple(_PATIENT_TO_IEC)


@dataclass(frozen=True)
class CouchShift:
    """A 6-DoF couch correction in IEC 61217 table coordinates (mm, degrees)."""

    lateral_mm: float
    longitudinal_mm: float
    vertical_mm: float
    pitch_deg: float
    roll_deg: float
    yaw_deg: float

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}

    def exceeds(self, translation_mm: float, rotation_deg: float) -> list[str]:
        """The components beyond the action levels, by name."""
        beyond = [
            name
            for name in ("lateral_mm", "longitudinal_mm", "vertical_mm")
            if abs(getattr(self, name)) > translation_mm
        ]
        beyond += [
            name
            for name in ("pitch_deg", "roll_deg", "yaw_deg")
            if abs(getattr(self, name)) > rotation_deg
        ]
        return beyond


def patient_to_iec(patient_position: str) -> np.ndarray:
    """3x3 rotation from DICOM patient axes to IEC 61217 table axes for a patient position."""
    try:
        return _PATIENT_TO_IEC[patient_position.upper()]
    except KeyError:
        raise StepFailed(
            f"couch shifts are computed for patient positions {', '.join(SUPPORTED_POSITIONS)}; "
            f"the image of the day says {patient_position or 'nothing'} (PatientPosition)"
        ) from None


def couch_shift(
    planned_to_daily: np.ndarray, isocenter: np.ndarray, patient_position: str
) -> CouchShift:
    """The couch correction for an anatomy displacement found by registration.

    ``planned_to_daily`` (4x4) maps a point of the planning image to where that anatomy is in
    the image of the day (patient coordinates, mm); ``isocenter`` is the treatment isocentre
    in patient coordinates, the centre of the couch rotations.
    """
    displacement = np.asarray(planned_to_daily, float)
    correction = np.linalg.inv(displacement)
    iso = np.asarray(isocenter, float)
    rotation = correction[:3, :3]
    # correction written about the isocentre: x' = R (x - iso) + iso + t
    translation = correction[:3, :3] @ iso + correction[:3, 3] - iso
    to_iec = patient_to_iec(patient_position)
    t = to_iec @ translation
    r = to_iec @ rotation @ to_iec.T
    pitch = np.degrees(np.arctan2(r[2, 1], r[2, 2]))
    roll = np.degrees(np.arcsin(np.clip(-r[2, 0], -1.0, 1.0)))
    yaw = np.degrees(np.arctan2(r[1, 0], r[0, 0]))
    return CouchShift(
        lateral_mm=float(t[0]),
        longitudinal_mm=float(t[1]),
        vertical_mm=float(t[2]),
        pitch_deg=float(pitch),
        roll_deg=float(roll),
        yaw_deg=float(yaw),
    )
