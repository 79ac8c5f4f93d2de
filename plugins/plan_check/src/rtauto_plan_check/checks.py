"""The built-in plan checks (TG-275-derived), each declared as a :class:`Check`.

Each check reads a :class:`~rtauto_plan_check.data.PlanSet` and its parameters and returns a
:class:`CheckResult`. The runner has already made sure the data it ``needs`` is there and the
plan's radiation type is one it applies to. Doses are in Gy, distances in mm.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from rtauto_plan_check import tg263
from rtauto_plan_check.data import Beam, PlanSet
from rtauto_plan_check.dvh import polygon_area
from rtauto_plan_check.model import Check, CheckResult

__all__ = ["BUILTIN_CHECKS"]

PHOTON_ELECTRON = ("PHOTON", "ELECTRON")
TARGET_TYPES = ("PTV", "CTV", "GTV")


def _machines(params: Mapping[str, Any]) -> dict[str, Any]:
    return dict(params.get("machines") or {})


# ------------------------------------------------------------------------------------------
# prescription
# ------------------------------------------------------------------------------------------


def prescription_fractionation(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    rx, fx = plan.prescription_gy, plan.fractions
    if rx is None or not fx:
        return CheckResult.violated(
            "the plan states no prescription dose or no number of fractions",
            measured={"prescription_gy": rx, "fractions": fx},
        )
    per_fraction = rx / fx
    low, high = params["dose_per_fraction_gy"]
    fx_low, fx_high = params["fractions"]
    measured = {"prescription_gy": rx, "fractions": fx, "dose_per_fraction_gy": per_fraction}
    tolerance = {"dose_per_fraction_gy": [low, high], "fractions": [fx_low, fx_high]}
    problems = []
    if not low <= per_fraction <= high:
        problems.append(f"{per_fraction:.3g} Gy per fraction outside [{low}, {high}]")
    if not fx_low <= fx <= fx_high:
        problems.append(f"{fx} fractions outside [{fx_low}, {fx_high}]")
    if problems:
        return CheckResult.violated("; ".join(problems), measured, tolerance)
    return CheckResult.passed(
        f"{rx:g} Gy in {fx} fractions of {per_fraction:.3g} Gy", measured, tolerance
    )


def beam_dose_sum(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    rx, fx = plan.prescription_gy, plan.fractions
    beams = plan.treatment_beams
    doses = [b.beam_dose for b in beams]
    if rx is None or not fx:
        return CheckResult.not_applicable("the plan states no prescription or fractions")
    if not beams or any(d is None for d in doses):
        return CheckResult.not_applicable("the fraction group gives no Beam Dose for every beam")
    fraction_dose = float(sum(doses))  # type: ignore[arg-type]
    expected = rx / fx
    deviation = 100.0 * (fraction_dose - expected) / expected
    measured = {
        "beam_dose_sum_gy": round(fraction_dose, 4),
        "prescription_per_fraction_gy": round(expected, 4),
        "deviation_percent": round(deviation, 2),
    }
    tolerance = f"|deviation| <= {params['tolerance_percent']} %"
    if abs(deviation) > params["tolerance_percent"]:
        return CheckResult.violated(
            f"beam doses sum to {fraction_dose:.3f} Gy per fraction, the prescription "
            f"{rx:g} Gy / {fx} fx is {expected:.3f} Gy ({deviation:+.1f} %)",
            measured,
            tolerance,
        )
    return CheckResult.passed(
        f"beam doses sum to {fraction_dose:.3f} Gy = {rx:g} Gy / {fx} fx", measured, tolerance
    )


def mu_per_cgy(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    low, high = params["range"]
    rows, bad = [], []
    for beam in plan.treatment_beams:
        if beam.meterset is None or not beam.beam_dose:
            continue
        ratio = beam.meterset / (beam.beam_dose * 100.0)
        rows.append({"beam": beam.name, "mu": beam.meterset, "mu_per_cgy": round(ratio, 3)})
        if not low <= ratio <= high:
            bad.append(f"{beam.name}: {ratio:.2f} MU/cGy")
    if not rows:
        return CheckResult.not_applicable("no beam states both Beam Meterset and Beam Dose")
    tolerance = f"{low}..{high} MU/cGy"
    if bad:
        return CheckResult.violated("implausible MU: " + ", ".join(bad), rows, tolerance)
    return CheckResult.passed(f"{len(rows)} beams within {tolerance}", rows, tolerance)


# ------------------------------------------------------------------------------------------
# machine and beams
# ------------------------------------------------------------------------------------------


def _technique(beam: Beam) -> str:
    return "ARC" if beam.is_arc else (beam.beam_type or "STATIC")


def machine_energy(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    machines = _machines(params)
    if not machines:
        return CheckResult.not_applicable("no machine list configured (param machines)")
    bad, rows = [], []
    for beam in plan.treatment_beams:
        config = machines.get(beam.machine)
        if config is None:
            bad.append(f"{beam.name}: machine {beam.machine!r} is not configured")
            continue
        allowed = [float(e) for e in (config.get("energies") or {}).get(beam.radiation_type, [])]
        rows.append({"beam": beam.name, "radiation": beam.radiation_type, "energy": beam.energy})
        if beam.energy is None or not any(abs(beam.energy - e) < 1e-3 for e in allowed):
            bad.append(
                f"{beam.name}: {beam.radiation_type} {beam.energy} not allowed on "
                f"{beam.machine} ({allowed})"
            )
    if bad:
        return CheckResult.violated("; ".join(bad), rows, "energies listed for the machine")
    return CheckResult.passed("every beam energy is commissioned on its machine", rows)


def machine_technique(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    machines = _machines(params)
    if not machines:
        return CheckResult.not_applicable("no machine list configured (param machines)")
    bad = []
    for beam in plan.treatment_beams:
        allowed = (machines.get(beam.machine) or {}).get("techniques")
        if allowed is None:
            continue
        if _technique(beam) not in allowed:
            bad.append(f"{beam.name}: {_technique(beam)} not in {allowed} for {beam.machine}")
    if bad:
        return CheckResult.violated("; ".join(bad))
    return CheckResult.passed(
        "techniques allowed: " + ", ".join(sorted({_technique(b) for b in plan.treatment_beams}))
    )


def single_machine(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    names = sorted({b.machine for b in plan.treatment_beams})
    if len(names) != 1:
        return CheckResult.violated(f"beams use {len(names)} machines: {names}", names)
    machines = _machines(params)
    if machines:
        config = machines.get(names[0])
        if config is None or not config.get("approved", True):
            return CheckResult.violated(f"machine {names[0]!r} is not an approved machine", names)
    return CheckResult.passed(f"all beams on {names[0]}", names)


def single_isocenter(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    isos = [np.asarray(b.isocenter) for b in plan.treatment_beams if b.isocenter is not None]
    if not isos:
        return CheckResult.violated("no beam states an isocenter")
    spread = max(float(np.linalg.norm(i - isos[0])) for i in isos)
    tolerance = f"<= {params['tolerance_mm']} mm"
    if spread > params["tolerance_mm"]:
        return CheckResult.violated(
            f"isocenters differ by up to {spread:.1f} mm", round(spread, 2), tolerance
        )
    return CheckResult.passed("one isocenter for all beams", round(spread, 2), tolerance)


def dose_rate(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    machines = _machines(params)
    bad, rows = [], []
    for beam in plan.treatment_beams:
        if beam.dose_rate is None:
            continue
        limit = (machines.get(beam.machine) or {}).get("max_dose_rate", params["max_dose_rate"])
        rows.append({"beam": beam.name, "dose_rate": beam.dose_rate, "limit": limit})
        if beam.dose_rate > limit:
            bad.append(f"{beam.name}: {beam.dose_rate:g} MU/min > {limit}")
    if not rows:
        return CheckResult.not_applicable("no beam states a Dose Rate Set")
    if bad:
        return CheckResult.violated("; ".join(bad), rows)
    return CheckResult.passed("dose rates within the machine limit", rows)


_DIRECTION_TOKENS = {
    "AP": (1, 0),
    "PA": (-1, 0),
    "LAO": (1, 1),
    "RAO": (1, -1),
    "LPO": (-1, 1),
    "RPO": (-1, -1),
    "LLAT": (0, 1),
    "RLAT": (0, -1),
}


def _name_direction(name: str) -> tuple[str, tuple[int, int]] | None:
    text = re.sub(r"(?i)\b(LT|LEFT|L)[\s_-]*LAT(ERAL)?\b", " LLAT ", name)
    text = re.sub(r"(?i)\b(RT|RIGHT|R)[\s_-]*LAT(ERAL)?\b", " RLAT ", text)
    for token in re.split(r"[^A-Za-z]+", text.upper()):
        if token in _DIRECTION_TOKENS:
            return token, _DIRECTION_TOKENS[token]
    return None


def _beam_direction(angle: float, position: str) -> tuple[float, float]:
    """(anterior component, left component) of where the beam enters, by patient position."""
    rad = math.radians(angle)
    anterior, left = math.cos(rad), math.sin(rad)
    if position.endswith("P"):  # prone: the patient's anterior faces the floor
        anterior = -anterior
    if position in ("HFP", "FFS"):  # the patient's left is on the other side of the couch
        left = -left
    return anterior, left


def field_names(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    positions = plan.patient_positions or {"HFS"}
    position = sorted(positions)[0]
    margin = math.sin(math.radians(params["tolerance_deg"]))
    bad, rows = [], []
    for beam in plan.treatment_beams:
        found = _name_direction(beam.name)
        if found is None or beam.gantry_angle is None or beam.is_arc:
            continue
        token, (want_ant, want_left) = found
        anterior, left = _beam_direction(beam.gantry_angle, position)
        ok = True
        if want_ant and anterior * want_ant < -margin:
            ok = False
        if want_left and left * want_left < -margin:
            ok = False
        if want_ant and not want_left and abs(left) > math.sin(math.radians(15)):
            ok = False  # AP/PA with a large lateral component
        if want_left and not want_ant and abs(anterior) > math.sin(math.radians(15)):
            ok = False
        rows.append({"beam": beam.name, "gantry": beam.gantry_angle, "direction": token})
        if not ok:
            bad.append(f"{beam.name!r} at gantry {beam.gantry_angle:g} ({position})")
    if not rows:
        return CheckResult.not_applicable("no static beam name states a direction")
    if bad:
        return CheckResult.violated("name does not match gantry angle: " + ", ".join(bad), rows)
    return CheckResult.passed(f"{len(rows)} beam names agree with their gantry angles", rows)


def setup_fields(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    setup = [b.name for b in plan.beams if b.delivery_type == "SETUP"]
    tolerance = f">= {params['minimum']}"
    if len(setup) < params["minimum"]:
        return CheckResult.violated(
            f"{len(setup)} setup fields, {params['minimum']} required", setup, tolerance
        )
    return CheckResult.passed(f"{len(setup)} setup fields", setup, tolerance)


def tolerance_table(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    tables = {
        int(t.ToleranceTableNumber)
        for key in ("ToleranceTableSequence", "IonToleranceTableSequence")
        for t in plan.plan.get(key, [])
        if "ToleranceTableNumber" in t
    }
    bad = [
        b.name
        for b in plan.treatment_beams
        if b.tolerance_table is None or b.tolerance_table not in tables
    ]
    if bad:
        return CheckResult.violated(f"beams without a valid tolerance table: {bad}", bad)
    return CheckResult.passed("every beam references a tolerance table of the plan")


def ssd_range(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    low, high = params["range_mm"]
    rows = [{"beam": b.name, "ssd": b.ssd} for b in plan.treatment_beams if b.ssd is not None]
    if not rows:
        return CheckResult.not_applicable("no beam states a Source to Surface Distance")
    bad = [f"{r['beam']}: {r['ssd']:g} mm" for r in rows if not low <= r["ssd"] <= high]
    if bad:
        return CheckResult.violated("SSD outside range: " + ", ".join(bad), rows, [low, high])
    return CheckResult.passed("SSDs within range", rows, [low, high])


# ------------------------------------------------------------------------------------------
# plan status and the object chain
# ------------------------------------------------------------------------------------------


def plan_approval(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    status = str(plan.plan.get("ApprovalStatus", "") or "")
    if status not in params["allowed"]:
        return CheckResult.violated(
            f"approval status {status or 'absent'!r}", status, params["allowed"]
        )
    return CheckResult.passed(f"approval status {status}", status, params["allowed"])


def plan_intent(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    intent = str(plan.plan.get("PlanIntent", "") or "")
    if intent not in params["allowed"]:
        return CheckResult.violated(
            f"plan intent {intent or 'absent'!r}", intent, params["allowed"]
        )
    return CheckResult.passed(f"plan intent {intent}", intent, params["allowed"])


def patient_position(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    ct_positions = {str(s.PatientPosition) for s in plan.ct if s.get("PatientPosition")}
    plan_positions = plan.patient_positions
    if not ct_positions or not plan_positions:
        return CheckResult.not_applicable("patient position absent from the plan or the CT")
    measured = {"plan": sorted(plan_positions), "ct": sorted(ct_positions)}
    if plan_positions != ct_positions or len(ct_positions) != 1:
        return CheckResult.violated(
            f"plan setup {sorted(plan_positions)} vs CT {sorted(ct_positions)}", measured
        )
    return CheckResult.passed(f"{ct_positions.pop()} in plan and CT", measured)


def uid_chain(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    rs = plan.structure_set
    assert rs is not None
    problems, facts = [], {}
    referenced = [
        str(r.ReferencedSOPInstanceUID) for r in plan.plan.get("ReferencedStructureSetSequence", [])
    ]
    facts["plan_references_structure_set"] = referenced
    if str(rs.SOPInstanceUID) not in referenced:
        problems.append(
            f"the plan references structure set {referenced or 'none'}, "
            f"the study holds {rs.SOPInstanceUID}"
        )
    referenced_series = [
        s
        for f in rs.get("ReferencedFrameOfReferenceSequence", [])
        for st in f.get("RTReferencedStudySequence", [])
        for s in st.get("RTReferencedSeriesSequence", [])
    ]
    series = {str(s.SeriesInstanceUID) for s in referenced_series}
    if plan.ct:
        ct_series = {str(c.SeriesInstanceUID) for c in plan.ct}
        facts["ct_series"] = sorted(ct_series)
        if not series & ct_series:
            problems.append(f"the structure set references CT series {sorted(series)}")
        # the series-level image list (the per-contour references repeat it, slowly to read)
        images = {
            str(ci.ReferencedSOPInstanceUID)
            for s in referenced_series
            for ci in s.get("ContourImageSequence", [])
        }
        present = {str(c.SOPInstanceUID) for c in plan.ct}
        facts["contour_images_present"] = f"{len(images & present)} of {len(images)}"
    if problems:
        return CheckResult.violated("; ".join(problems), facts)
    return CheckResult.passed("plan -> structure set -> CT references resolve", facts)


def frame_of_reference(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    uids: dict[str, set[str]] = {}
    if plan.plan.get("FrameOfReferenceUID"):
        uids["RTPLAN"] = {str(plan.plan.FrameOfReferenceUID)}
    if plan.structure_set is not None:
        uids["RTSTRUCT"] = {
            str(f.FrameOfReferenceUID)
            for f in plan.structure_set.get("ReferencedFrameOfReferenceSequence", [])
        }
    if plan.dose is not None:
        uids["RTDOSE"] = {plan.dose.frame_of_reference_uid}
    if plan.ct:
        uids["CT"] = {str(c.FrameOfReferenceUID) for c in plan.ct}
    if len(uids) < 2:
        return CheckResult.not_applicable("fewer than two objects state a Frame of Reference")
    measured = {k: sorted(v) for k, v in uids.items()}
    common = set.intersection(*uids.values())
    if not common or any(len(v) != 1 for k, v in uids.items() if k != "RTSTRUCT"):
        return CheckResult.violated("Frames of Reference differ", measured)
    return CheckResult.passed(f"one Frame of Reference across {', '.join(uids)}", measured)


def dose_plan_reference(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    dose = plan.dose
    assert dose is not None
    problems = []
    measured = {
        "referenced_plans": list(dose.referenced_plan_uids),
        "summation": dose.summation_type,
        "units": dose.units,
    }
    if str(plan.plan.SOPInstanceUID) not in dose.referenced_plan_uids:
        problems.append("the dose does not reference this plan")
    if dose.summation_type not in params["summation_types"]:
        problems.append(f"dose summation {dose.summation_type!r}")
    if dose.units != "GY":
        problems.append(f"dose units {dose.units!r}")
    if problems:
        return CheckResult.violated("; ".join(problems), measured)
    return CheckResult.passed("the PLAN dose references this plan, in Gy", measured)


# ------------------------------------------------------------------------------------------
# structures
# ------------------------------------------------------------------------------------------


def isocenter_in_body(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    body = plan.external()
    if body is None or body.is_empty:
        return CheckResult.not_applicable("no EXTERNAL structure with contours")
    outside = []
    for iso in {b.isocenter for b in plan.treatment_beams if b.isocenter is not None}:
        if not body.contains(iso):
            outside.append([round(v, 1) for v in iso])
    if outside:
        return CheckResult.violated(f"isocenter outside {body.name}: {outside}", outside)
    return CheckResult.passed(f"isocenter inside {body.name}")


def required_structures(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    resolved = {}
    for s in plan.structures.values():
        standard = tg263.resolve(s.name)
        if standard:
            resolved.setdefault(standard.lower(), s.name)
    missing = [r for r in params["names"] if r.lower() not in resolved]
    found = {r: resolved[r.lower()] for r in params["names"] if r.lower() in resolved}
    if missing:
        return CheckResult.violated(f"missing structures: {missing}", found, params["names"])
    return CheckResult.passed("all required structures present", found, params["names"])


def tg263_naming(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    rows = []
    for s in plan.structures.values():
        parsed = tg263.parse(s.name)
        if parsed.non_evaluated or parsed.compliant:
            continue
        rows.append(
            {"name": s.name, "problems": parsed.problems, "suggestion": tg263.resolve(s.name)}
        )
    if rows:
        names = ", ".join(r["name"] for r in rows)
        return CheckResult.violated(f"{len(rows)} names not per TG-263: {names}", rows)
    return CheckResult.passed("all structure names follow TG-263")


def degenerate_contours(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    rows = []
    for s in plan.structures.values():
        if s.is_empty and not s.points:
            rows.append({"name": s.name, "problem": "no contours"})
            continue
        few = sum(1 for polys in s.planes.values() for p in polys if len(p) < 3)
        flat = sum(
            1
            for polys in s.planes.values()
            for p in polys
            if len(p) >= 3 and polygon_area(p) < params["min_area_mm2"]
        )
        if few:
            rows.append({"name": s.name, "problem": f"{few} contours with fewer than 3 points"})
        if flat:
            rows.append({"name": s.name, "problem": f"{flat} contours of near-zero area"})
        if s.non_axial:
            rows.append({"name": s.name, "problem": f"{s.non_axial} non-axial contours"})
        if len(s.planes) == 1 and s.interpreted_type in TARGET_TYPES + ("ORGAN",):
            rows.append({"name": s.name, "problem": "drawn on a single plane"})
    if rows:
        return CheckResult.violated("; ".join(f"{r['name']}: {r['problem']}" for r in rows), rows)
    return CheckResult.passed("no empty or degenerate contours")


def couch_structure(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    position = sorted(plan.patient_positions or {"HFS"})[0]
    through_couch = []
    for beam in plan.treatment_beams:
        if beam.gantry_angle is None:
            continue
        angles = [beam.gantry_angle] + ([beam.gantry_stop] if beam.is_arc else [])
        floor = [-_beam_direction(a, position)[0] for a in angles if a is not None]
        if position.endswith("P"):
            floor = [-f for f in floor]
        if beam.is_arc or max(floor) > math.cos(math.radians(90 - params["posterior_deg"])):
            through_couch.append(beam.name)
    if not through_couch:
        return CheckResult.not_applicable("no posterior or arc beam passes through the couch")
    couch = [
        s.name
        for s in plan.structures.values()
        if s.interpreted_type in ("SUPPORT", "FIXATION")
        or (tg263.resolve(s.name) or "").startswith("Couch")
    ]
    if not couch:
        return CheckResult.violated(
            f"beams {through_couch} pass through the couch but no couch structure exists",
            through_couch,
        )
    return CheckResult.passed(f"couch structures {couch} for beams {through_couch}", couch)


def bolus_consistency(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    bolus_rois = {n for n, s in plan.structures.items() if s.interpreted_type == "BOLUS"}
    referenced = {n for b in plan.treatment_beams for n in b.bolus_roi_numbers}
    problems = []
    if referenced - bolus_rois:
        problems.append(f"beams reference bolus ROIs {sorted(referenced - bolus_rois)} absent")
    if bolus_rois - referenced:
        names = [plan.structures[n].name for n in sorted(bolus_rois - referenced)]
        problems.append(f"bolus structures {names} referenced by no beam")
    if problems:
        return CheckResult.violated("; ".join(problems))
    if not bolus_rois:
        return CheckResult.passed("no bolus in the plan or the structure set")
    return CheckResult.passed("bolus structures and beam references agree")


# ------------------------------------------------------------------------------------------
# dose
# ------------------------------------------------------------------------------------------


def dose_grid_resolution(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    dose = plan.dose
    assert dose is not None
    spacing = [*dose.pixel_spacing, dose.frame_spacing]
    limit = params["max_mm"]
    measured = [round(v, 3) for v in spacing]
    if max(spacing) > limit:
        return CheckResult.violated(f"dose grid {measured} mm coarser than {limit} mm", measured)
    return CheckResult.passed(f"dose grid {measured} mm", measured, f"<= {limit} mm")


def dose_grid_coverage(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    dose, body = plan.dose, plan.external()
    assert dose is not None
    if body is None or body.is_empty:
        return CheckResult.not_applicable("no EXTERNAL structure with contours")
    lo, hi = dose.bounds()
    margin = params["tolerance_mm"]
    body_lo, body_hi = body.bounds()  # type: ignore[misc]
    # in plane: the whole body outline; along z: the targets (a dose grid shorter than a long
    # CT is usual, but it must cover every target)
    short = []
    for axis, label in ((0, "x"), (1, "y")):
        if body_lo[axis] < lo[axis] - margin or body_hi[axis] > hi[axis] + margin:
            short.append(f"{label}: body {body_lo[axis]:.0f}..{body_hi[axis]:.0f}")
    targets = [s for s in plan.structures.values() if s.interpreted_type in TARGET_TYPES]
    for t in targets:
        b = t.bounds()
        if b is not None and (b[0][2] < lo[2] - margin or b[1][2] > hi[2] + margin):
            short.append(f"z: {t.name} {b[0][2]:.0f}..{b[1][2]:.0f}")
    measured = {"dose_min": [round(v, 1) for v in lo], "dose_max": [round(v, 1) for v in hi]}
    if short:
        return CheckResult.violated("dose grid does not cover " + "; ".join(short), measured)
    return CheckResult.passed(f"dose grid covers {body.name} in plane and the targets", measured)


def _target(plan: PlanSet, params: Mapping[str, Any]):
    name = params.get("target")
    if name:
        return plan.structure_named(name)
    ptvs = [s for s in plan.structures.values() if s.interpreted_type == "PTV" and s.planes]
    return max(ptvs, key=lambda s: s.volume_cc()) if ptvs else None


def target_coverage(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    rx = plan.prescription_gy
    if rx is None:
        return CheckResult.not_applicable("the plan states no prescription dose")
    target = _target(plan, params)
    if target is None and params.get("target"):
        return CheckResult.violated(f"target {params['target']!r} is not in the structure set")
    if target is None:
        return CheckResult.not_applicable("no PTV in the structure set (set param target)")
    dvh = plan.dvh(target)
    percent = params["volume_percent"]
    value = dvh.d_percent(percent)
    relative = 100.0 * value / rx
    measured = {f"D{percent:g}%_gy": round(value, 3), "percent_of_rx": round(relative, 2)}
    tolerance = f">= {params['min_percent_of_rx']} % of {rx:g} Gy"
    if relative < params["min_percent_of_rx"]:
        return CheckResult.violated(
            f"{target.name} D{percent:g}% = {value:.2f} Gy ({relative:.1f} % of Rx)",
            measured,
            tolerance,
        )
    return CheckResult.passed(
        f"{target.name} D{percent:g}% = {value:.2f} Gy ({relative:.1f} % of Rx)",
        measured,
        tolerance,
    )


def hot_spot(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    rx = plan.prescription_gy
    dose = plan.dose
    assert dose is not None
    if rx is None:
        return CheckResult.not_applicable("the plan states no prescription dose")
    value, point = dose.max_point()
    relative = 100.0 * value / rx
    targets = [s for s in plan.structures.values() if s.interpreted_type in TARGET_TYPES]
    named = _target(plan, params)
    if named is not None and named not in targets:
        targets.append(named)
    inside = [t.name for t in targets if t.planes and t.contains(point)]
    measured = {
        "max_gy": round(value, 3),
        "percent_of_rx": round(relative, 2),
        "location": [round(v, 1) for v in point],
        "inside": inside,
    }
    tolerance = f"<= {params['max_percent_of_rx']} % of {rx:g} Gy, inside a target"
    problems = []
    if relative > params["max_percent_of_rx"]:
        problems.append(f"global max {value:.2f} Gy = {relative:.1f} % of Rx")
    if targets and not inside:
        problems.append(f"global max at {measured['location']} lies in no target")
    if problems:
        return CheckResult.violated("; ".join(problems), measured, tolerance)
    where = f" in {inside[0]}" if inside else ""
    return CheckResult.passed(f"global max {relative:.1f} % of Rx{where}", measured, tolerance)


def oar_constraints(plan: PlanSet, params: Mapping[str, Any]) -> CheckResult:
    by_standard: dict[str, Any] = {}
    for s in plan.structures.values():
        standard = tg263.resolve(s.name)
        if standard and s.planes:
            by_standard.setdefault(standard.lower(), s)
    rows, bad = [], []
    for constraint in params["constraints"]:
        structure = by_standard.get(str(constraint["structure"]).lower())
        if structure is None:
            continue
        value = plan.dvh(structure).metric(constraint["metric"])
        limit = float(constraint["max"])
        row = {
            "structure": structure.name,
            "metric": constraint["metric"],
            "value": round(value, 3),
            "max": limit,
        }
        rows.append(row)
        if value > limit:
            bad.append(f"{structure.name} {constraint['metric']} {value:.2f} > {limit:g}")
    if not rows:
        return CheckResult.not_applicable("none of the constrained structures is present")
    if bad:
        return CheckResult.violated("; ".join(bad), rows)
    return CheckResult.passed(f"{len(rows)} constraints met", rows)


# ------------------------------------------------------------------------------------------
# the catalogue
# ------------------------------------------------------------------------------------------

BUILTIN_CHECKS: tuple[Check, ...] = (
    Check(
        "prescription_fractionation",
        "Prescription: dose per fraction and number of fractions plausible",
        prescription_fractionation,
        failure_mode="Wrong prescription or fractionation entered in the plan (TG-275: "
        "prescription/plan mismatch)",
        params={"dose_per_fraction_gy": [1.0, 4.0], "fractions": [1, 45]},
    ),
    Check(
        "beam_dose_sum",
        "Beam doses sum to the prescribed fraction dose",
        beam_dose_sum,
        failure_mode="Fractions or dose per fraction inconsistent with the prescription; "
        "beam weights not normalised (TG-275: incorrect dose per fraction)",
        params={"tolerance_percent": 1.0},
    ),
    Check(
        "mu_per_cgy",
        "Monitor units per cGy plausible for every beam",
        mu_per_cgy,
        failure_mode="MU not matching the calculated dose; wrong normalisation or edited "
        "MU (TG-275: MU/dose inconsistency)",
        params={"range": [0.5, 3.0]},
        radiation=PHOTON_ELECTRON,
    ),
    Check(
        "machine_energy",
        "Energies commissioned on the named machine",
        machine_energy,
        failure_mode="Energy not available or not commissioned on the treatment machine "
        "(TG-275: wrong energy)",
        params={"machines": {}},
    ),
    Check(
        "machine_technique",
        "Techniques allowed on the named machine",
        machine_technique,
        failure_mode="Technique (arc, dynamic MLC) not commissioned on the machine",
        params={"machines": {}},
    ),
    Check(
        "single_machine",
        "One approved machine for all beams",
        single_machine,
        failure_mode="Beams split over machines or planned on an unapproved machine "
        "(TG-275: wrong treatment machine)",
        params={"machines": {}},
    ),
    Check(
        "single_isocenter",
        "One isocenter for all beams",
        single_isocenter,
        failure_mode="Beams with different isocenters unintended (TG-275: isocenter error)",
        params={"tolerance_mm": 0.5},
    ),
    Check(
        "dose_rate",
        "Dose rate within the machine limit",
        dose_rate,
        failure_mode="Dose rate above the machine or protocol limit (TG-275: delivery "
        "parameter error)",
        params={"max_dose_rate": 600.0, "machines": {}},
        radiation=PHOTON_ELECTRON,
    ),
    Check(
        "field_names",
        "Field names consistent with gantry angles",
        field_names,
        failure_mode="Beam name and gantry angle disagree: wrong side or patient "
        "orientation (TG-275: wrong laterality/field)",
        params={"tolerance_deg": 5.0},
        severity="warn",
    ),
    Check(
        "setup_fields",
        "Setup fields present",
        setup_fields,
        failure_mode="No setup/imaging fields to verify the position (TG-275: setup "
        "verification not planned)",
        params={"minimum": 1},
        severity="warn",
    ),
    Check(
        "tolerance_table",
        "Every beam has a tolerance table",
        tolerance_table,
        failure_mode="No tolerance table: delivery interlocks cannot catch position errors",
        severity="warn",
    ),
    Check(
        "ssd_range",
        "Source-surface distances plausible",
        ssd_range,
        failure_mode="SSD implausible: isocenter misplaced or wrong body contour",
        params={"range_mm": [600.0, 1200.0]},
        radiation=PHOTON_ELECTRON,
        severity="warn",
    ),
    Check(
        "plan_approval",
        "Plan approved",
        plan_approval,
        failure_mode="Unapproved plan exported for treatment (TG-275: plan not approved)",
        params={"allowed": ["APPROVED"]},
    ),
    Check(
        "plan_intent",
        "Plan intent stated",
        plan_intent,
        failure_mode="Intent missing or unexpected (verification plan treated as clinical)",
        params={"allowed": ["CURATIVE", "PALLIATIVE", "PROPHYLACTIC"]},
        severity="warn",
    ),
    Check(
        "patient_position",
        "Patient position consistent with the CT",
        patient_position,
        needs=("plan", "ct"),
        failure_mode="Plan orientation differs from the CT (TG-275: wrong patient "
        "orientation, e.g. HFS vs FFS)",
    ),
    Check(
        "uid_chain",
        "Plan -> structure set -> CT references resolve",
        uid_chain,
        needs=("plan", "structures"),
        failure_mode="Plan built on another structure set or CT (TG-275: wrong image set)",
    ),
    Check(
        "frame_of_reference",
        "One Frame of Reference for plan, structures, dose and CT",
        frame_of_reference,
        failure_mode="Objects from different coordinate systems combined (TG-275: "
        "registration/image set error)",
    ),
    Check(
        "dose_plan_reference",
        "Dose references this plan (PLAN sum, Gy)",
        dose_plan_reference,
        needs=("plan", "dose"),
        failure_mode="Dose of another plan or a beam dose reviewed as the plan dose",
        params={"summation_types": ["PLAN"]},
    ),
    Check(
        "isocenter_in_body",
        "Isocenter inside the body contour",
        isocenter_in_body,
        needs=("plan", "structures"),
        failure_mode="Isocenter placed outside the patient (TG-275: isocenter error)",
    ),
    Check(
        "required_structures",
        "Required structures present (TG-263 names)",
        required_structures,
        needs=("plan", "structures"),
        failure_mode="Missing organ at risk or body contour: its dose is never evaluated",
        params={"names": ["External"]},
    ),
    Check(
        "tg263_naming",
        "Structure names follow TG-263",
        tg263_naming,
        needs=("plan", "structures"),
        failure_mode="Non-standard names defeat automated constraints and data reuse",
        severity="warn",
    ),
    Check(
        "degenerate_contours",
        "No empty or degenerate contours",
        degenerate_contours,
        needs=("plan", "structures"),
        failure_mode="Empty or broken contours give wrong volumes and DVHs",
        params={"min_area_mm2": 0.5},
        severity="warn",
    ),
    Check(
        "couch_structure",
        "Couch structure present for posterior and arc beams",
        couch_structure,
        needs=("plan", "structures"),
        failure_mode="Couch not modelled: attenuation missing from the dose (TG-275: "
        "couch/immobilisation not included)",
        params={"posterior_deg": 10.0},
        severity="warn",
    ),
    Check(
        "bolus_consistency",
        "Bolus structures and beam bolus references agree",
        bolus_consistency,
        needs=("plan", "structures"),
        failure_mode="Bolus planned but not referenced, or referenced but not contoured "
        "(TG-275: bolus error)",
    ),
    Check(
        "dose_grid_resolution",
        "Dose grid resolution within the profile's limit",
        dose_grid_resolution,
        needs=("plan", "dose"),
        failure_mode="Dose grid too coarse for the target size (TG-275: calculation "
        "parameter error)",
        params={"max_mm": 3.0},
    ),
    Check(
        "dose_grid_coverage",
        "Dose grid covers the body in plane and the targets",
        dose_grid_coverage,
        needs=("plan", "structures", "dose"),
        failure_mode="Dose not calculated where beams pass through the patient",
        params={"tolerance_mm": 5.0},
    ),
    Check(
        "target_coverage",
        "Target coverage (Dx% >= y % of prescription)",
        target_coverage,
        needs=("plan", "structures", "dose"),
        failure_mode="Target under-dosed: wrong normalisation or plan (TG-275: "
        "inadequate target coverage)",
        params={"target": None, "volume_percent": 95.0, "min_percent_of_rx": 95.0},
    ),
    Check(
        "hot_spot",
        "Global hot spot within limit and inside a target",
        hot_spot,
        needs=("plan", "structures", "dose"),
        failure_mode="Hot spot too high or outside the target (TG-275: unacceptable "
        "dose distribution)",
        params={"target": None, "max_percent_of_rx": 110.0},
    ),
    Check(
        "oar_constraints",
        "Organ-at-risk constraints",
        oar_constraints,
        needs=("plan", "structures", "dose"),
        failure_mode="Organ at risk above its tolerance (TG-275: constraints not met)",
        params={"constraints": []},
    ),
)
