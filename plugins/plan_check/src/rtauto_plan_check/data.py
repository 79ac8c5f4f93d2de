"""The objects a plan check reads: the plan and, when the study holds them, its structure set,
dose and CT headers, loaded read-only from the job's input files."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from rtauto_plan_check.dvh import DVH, DoseGrid, Structure, compute_dvh, read_structures

__all__ = ["Beam", "PlanSet", "load_plan_set"]

PLAN_MODALITIES = ("RTPLAN", "RTIONPLAN")
ION_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.8"


@dataclass(frozen=True)
class Beam:
    """One beam of the plan, with the values the checks read (first control point)."""

    number: int
    name: str
    radiation_type: str  # PHOTON, ELECTRON, PROTON, ION, ...
    delivery_type: str  # TREATMENT, SETUP, ...
    beam_type: str  # STATIC, DYNAMIC
    machine: str
    energy: float | None
    dose_rate: float | None
    gantry_angle: float | None
    gantry_rotation: str  # NONE, CW, CC
    gantry_stop: float | None  # last control point's gantry angle (arcs)
    isocenter: tuple[float, float, float] | None
    ssd: float | None
    meterset: float | None  # MU (or the ion plan's meterset unit) per fraction
    beam_dose: float | None  # Gy per fraction at the beam dose point
    tolerance_table: int | None
    patient_setup: int | None
    bolus_roi_numbers: tuple[int, ...]

    @property
    def is_treatment(self) -> bool:
        return self.delivery_type in ("", "TREATMENT", "CONTINUATION")

    @property
    def is_arc(self) -> bool:
        return self.gantry_rotation in ("CW", "CC")


def _float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _beams(plan: Dataset) -> list[Beam]:
    ion = "IonBeamSequence" in plan
    sequence = plan.get("IonBeamSequence" if ion else "BeamSequence", [])
    refs: dict[int, Dataset] = {}
    for group in plan.get("FractionGroupSequence", [])[:1]:
        for ref in group.get("ReferencedBeamSequence", []):
            refs[int(ref.ReferencedBeamNumber)] = ref
    beams = []
    for item in sequence:
        points = item.get("IonControlPointSequence" if ion else "ControlPointSequence", [])
        first = points[0] if points else Dataset()
        last = points[-1] if points else Dataset()
        number = int(item.get("BeamNumber", 0))
        ref = refs.get(number, Dataset())
        iso = first.get("IsocenterPosition")
        boli = tuple(
            int(b.ReferencedROINumber)
            for b in item.get("ReferencedBolusSequence", [])
            if "ReferencedROINumber" in b
        )
        beams.append(
            Beam(
                number=number,
                name=str(item.get("BeamName", "") or ""),
                radiation_type=str(item.get("RadiationType", "") or ""),
                delivery_type=str(item.get("TreatmentDeliveryType", "") or ""),
                beam_type=str(item.get("BeamType", "") or ""),
                machine=str(item.get("TreatmentMachineName", "") or ""),
                energy=_float(first.get("NominalBeamEnergy")),
                dose_rate=_float(first.get("DoseRateSet")),
                gantry_angle=_float(first.get("GantryAngle")),
                gantry_rotation=str(first.get("GantryRotationDirection", "NONE") or "NONE"),
                gantry_stop=_float(last.get("GantryAngle", first.get("GantryAngle"))),
                isocenter=tuple(float(v) for v in iso) if iso else None,  # type: ignore[arg-type]
                ssd=_float(first.get("SourceToSurfaceDistance")),
                meterset=_float(ref.get("BeamMeterset")),
                beam_dose=_float(ref.get("BeamDose")),
                tolerance_table=int(item.ReferencedToleranceTableNumber)
                if "ReferencedToleranceTableNumber" in item
                else None,
                patient_setup=int(item.ReferencedPatientSetupNumber)
                if "ReferencedPatientSetupNumber" in item
                else None,
                bolus_roi_numbers=boli,
            )
        )
    return beams


@dataclass
class PlanSet:
    """A plan with its structure set, dose and CT headers (each None/empty when absent).

    DVHs are computed on first use and cached, so several checks share them.
    """

    plan: Dataset
    plan_path: Path | None = None
    structure_set: Dataset | None = None
    doses: list[Dataset] = field(default_factory=list)
    ct: list[Dataset] = field(default_factory=list)  # headers only, sorted along z
    dvh_options: dict[str, Any] = field(default_factory=dict)
    _dvh_cache: dict[str, DVH] = field(default_factory=dict, repr=False)

    @property
    def is_ion(self) -> bool:
        return self.plan.get("Modality") == "RTIONPLAN" or str(
            self.plan.get("SOPClassUID", "")
        ).startswith(ION_PLAN_SOP_CLASS)

    @cached_property
    def beams(self) -> list[Beam]:
        return _beams(self.plan)

    @property
    def treatment_beams(self) -> list[Beam]:
        return [b for b in self.beams if b.is_treatment]

    @property
    def radiation_types(self) -> set[str]:
        return {b.radiation_type for b in self.treatment_beams}

    @property
    def fractions(self) -> int | None:
        groups = self.plan.get("FractionGroupSequence", [])
        if not groups or "NumberOfFractionsPlanned" not in groups[0]:
            return None
        return int(groups[0].NumberOfFractionsPlanned)

    @property
    def prescription_gy(self) -> float | None:
        """Total prescription: the largest TargetPrescriptionDose of a TARGET dose reference."""
        doses = [
            float(ref.TargetPrescriptionDose)
            for ref in self.plan.get("DoseReferenceSequence", [])
            if ref.get("DoseReferenceType") == "TARGET" and "TargetPrescriptionDose" in ref
        ]
        return max(doses) if doses else None

    @property
    def patient_positions(self) -> set[str]:
        return {
            str(s.PatientPosition)
            for s in self.plan.get("PatientSetupSequence", [])
            if s.get("PatientPosition")
        }

    @cached_property
    def structures(self) -> dict[int, Structure]:
        return read_structures(self.structure_set) if self.structure_set is not None else {}

    def structure_named(self, name: str) -> Structure | None:
        for structure in self.structures.values():
            if structure.name == name:
                return structure
        return None

    def external(self) -> Structure | None:
        """The EXTERNAL ROI (by interpreted type, else by a BODY/External name)."""
        candidates = [s for s in self.structures.values() if s.interpreted_type == "EXTERNAL"]
        if not candidates:
            candidates = [
                s
                for s in self.structures.values()
                if s.name.strip().lower() in ("body", "external", "outline", "skin")
            ]
        return candidates[0] if candidates else None

    @cached_property
    def dose(self) -> DoseGrid | None:
        """The plan's dose: a PLAN-summed RTDOSE, else the first one."""
        if not self.doses:
            return None
        plan_sums = [d for d in self.doses if d.get("DoseSummationType") == "PLAN"]
        return DoseGrid.from_dataset((plan_sums or self.doses)[0])

    def dvh(self, structure: Structure) -> DVH:
        if self.dose is None:
            raise ValueError("no dose")
        if structure.name not in self._dvh_cache:
            self._dvh_cache[structure.name] = compute_dvh(structure, self.dose, **self.dvh_options)
        return self._dvh_cache[structure.name]

    @property
    def dvhs(self) -> dict[str, DVH]:
        """The DVHs computed so far, by structure name."""
        return dict(self._dvh_cache)


def _read(path: Path, headers_only: bool = False) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=headers_only)


def load_plan_set(
    plan_files: Iterable[Path],
    structure_files: Iterable[Path] = (),
    dose_files: Iterable[Path] = (),
    ct_files: Iterable[Path] = (),
    *,
    dvh_options: dict[str, Any] | None = None,
) -> PlanSet:
    """Read the plan (the first file of ``plan_files``) and the related objects.

    Of several structure sets, the one the plan references is used (else the first); of
    several doses, those that reference the plan (else all). Files are only read.
    """
    plans = [(p, _read(p)) for p in plan_files]
    if not plans:
        raise ValueError("no plan file")
    plan_path, plan = plans[0]
    structure_sets = [_read(p) for p in structure_files]
    referenced = {
        str(r.ReferencedSOPInstanceUID) for r in plan.get("ReferencedStructureSetSequence", [])
    }
    chosen = next(
        (s for s in structure_sets if str(s.SOPInstanceUID) in referenced),
        structure_sets[0] if structure_sets else None,
    )
    doses = [_read(p) for p in dose_files]
    own = [
        d
        for d in doses
        if str(plan.SOPInstanceUID)
        in {str(r.ReferencedSOPInstanceUID) for r in d.get("ReferencedRTPlanSequence", [])}
    ]
    ct = [_read(p, headers_only=True) for p in ct_files]
    ct.sort(key=lambda s: float(s.ImagePositionPatient[2]) if "ImagePositionPatient" in s else 0)
    return PlanSet(
        plan=plan,
        plan_path=plan_path,
        structure_set=chosen,
        doses=own or doses,
        ct=ct,
        dvh_options=dict(dvh_options or {}),
    )
