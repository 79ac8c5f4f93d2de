"""The treatment isocentre that couch rotations turn about, read from the treatment plan.

A couch correction is reported about the machine isocentre, where the plan put its
isocentre: with a rotation in the correction, the translations depend on that point (a
1 degree roll read about a point 10 cm away moves the reported translation by 1.7 mm).
The plan is looked for in the job's input, then in the job store, among the patient's RT
Plans and RT Ion Plans on the reference image's Frame of Reference; its isocentre is the
``IsocenterPosition`` of the first control point of its treatment beams (setup beams and
beams with no isocentre aside).

As everywhere in this plugin, the image of the day is taken in the planning coordinates it
was set up in (a CBCT reconstructed about the treatment isocentre and placed at the planned
one), so the plan's isocentre is where couch rotations turn in the daily image too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import pydicom

from rtauto.errors import StepFailed
from rtauto.steps import StepContext

__all__ = [
    "IsocenterFrom",
    "PlanIsocenter",
    "choose_isocenter",
    "find_plan_isocenter",
    "plan_isocenters",
]

IsocenterFrom = Literal["auto", "plan", "image_center"]

_PLAN_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT Ion Plan",
}
_SAME_MM = 0.1  # isocentres closer than this are one
T = TypeVar("T")


@dataclass(frozen=True)
class PlanIsocenter:
    """The isocentre of a plan, with where it was found."""

    position: np.ndarray  # patient coordinates (mm) of the plan's Frame of Reference
    sop_instance_uid: str
    plan_label: str
    found_in: str  # "input" | "store"


def _distinct(items: Iterable[T], position: Callable[[T], np.ndarray]) -> list[T]:
    """``items`` less those within _SAME_MM of an earlier one."""
    kept: list[T] = []
    for item in items:
        if all(np.linalg.norm(position(item) - position(k)) >= _SAME_MM for k in kept):
            kept.append(item)
    return kept


def plan_isocenters(plan: pydicom.Dataset) -> list[np.ndarray]:
    """The distinct isocentres of a plan's treatment beams (photon, electron or ion)."""
    beams = list(plan.get("BeamSequence", [])) + list(plan.get("IonBeamSequence", []))
    found: list[np.ndarray] = []
    for beam in beams:
        if str(beam.get("TreatmentDeliveryType", "TREATMENT")).upper() != "TREATMENT":
            continue
        points = beam.get("ControlPointSequence") or beam.get("IonControlPointSequence") or []
        position = points[0].get("IsocenterPosition") if points else None
        if position is not None and len(position) == 3:
            found.append(np.array([float(v) for v in position]))
    return _distinct(found, lambda iso: iso)


def _plans_in(files: Iterable[Path]) -> Iterable[pydicom.Dataset]:
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - one unreadable file is not this step's failure
            continue
        if str(ds.get("SOPClassUID", "")) in _PLAN_CLASSES:
            yield ds


def _store_plan_files(ctx: StepContext, patient_id: str) -> list[Path]:
    if not ctx.store_url:
        return []
    from rtauto.store import Store

    store = Store(ctx.store_url)
    try:
        spool = Path(ctx.settings.spool_dir)
        return [
            spool / row.path
            for series in store.series_of_patient(patient_id, modality="RTPLAN")
            for row in store.instances_of_series(series.series_uid)
        ]
    finally:
        store.close()


def find_plan_isocenter(
    ctx: StepContext, frame_of_reference_uid: str, patient_id: str
) -> tuple[PlanIsocenter | None, str]:
    """The one treatment isocentre of the patient's plans on ``frame_of_reference_uid``.

    Returns ``(isocentre, "")``, or ``(None, why)`` when no plan or no single isocentre is
    found: the job's input is searched first, the job store only when the input holds no plan
    on that Frame of Reference.
    """
    sources = (
        ("input", lambda: [f for s in ctx.study.by_modality("RTPLAN") for f in s.files]),
        ("store", lambda: _store_plan_files(ctx, patient_id)),
    )
    for found_in, files in sources:
        candidates: list[PlanIsocenter] = []
        for plan in _plans_in(files()):
            if str(plan.get("FrameOfReferenceUID", "")) != frame_of_reference_uid:
                continue
            if str(plan.get("PatientID", "")) != patient_id:
                continue
            for position in plan_isocenters(plan):
                candidates.append(
                    PlanIsocenter(
                        position=position,
                        sop_instance_uid=str(plan.SOPInstanceUID),
                        plan_label=str(plan.get("RTPlanLabel", "")),
                        found_in=found_in,
                    )
                )
        distinct = _distinct(candidates, lambda candidate: candidate.position)
        if len(distinct) == 1:
            return distinct[0], ""
        if len(distinct) > 1:
            listed = "; ".join(
                f"{d.plan_label or d.sop_instance_uid}: "
                + ", ".join(f"{v:.1f}" for v in d.position)
                for d in distinct
            )
            return None, (
                f"the plans in the job's {found_in} on the reference's Frame of Reference have "
                f"{len(distinct)} isocentres ({listed}); name one with isocenter_mm"
            )
    return None, (
        "no treatment plan with an isocentre on the reference's Frame of Reference "
        f"{frame_of_reference_uid} in the job's input or the job store"
    )


def choose_isocenter(
    ctx: StepContext,
    source: IsocenterFrom,
    explicit: tuple[float, float, float] | None,
    frame_of_reference_uid: str,
    patient_id: str,
    image_center: np.ndarray,
) -> tuple[np.ndarray, dict[str, object]]:
    """The isocentre for the couch shift and a record of where it came from.

    ``explicit`` (the step's ``isocenter_mm``) wins; ``plan`` fails the step when no single
    plan isocentre is found; ``auto`` falls back to the centre of the image of the day and
    says why.
    """
    if explicit is not None:
        return np.asarray(explicit, float), {"source": "parameter"}
    if source != "image_center":
        found, why = find_plan_isocenter(ctx, frame_of_reference_uid, patient_id)
        if found is not None:
            return found.position, {
                "source": f"plan ({found.found_in})",
                "plan_sop_instance_uid": found.sop_instance_uid,
                "plan_label": found.plan_label,
            }
        if source == "plan":
            raise StepFailed(why)
        ctx.logger.warning("couch rotations about the centre of the image of the day: %s", why)
        return image_center, {"source": "image_center", "why": why}
    return image_center, {"source": "image_center"}
