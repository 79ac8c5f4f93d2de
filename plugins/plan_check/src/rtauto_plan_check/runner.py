"""Profiles, the check catalogue and running a profile's checks on a plan set."""

from __future__ import annotations

import copy
import datetime as dt
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rtauto.errors import PluginError
from rtauto_plan_check.checks import BUILTIN_CHECKS
from rtauto_plan_check.data import PlanSet
from rtauto_plan_check.model import SEVERITIES, STATUSES, Check, CheckResult

__all__ = [
    "REPORT_SCHEMA",
    "Profile",
    "bundled_profiles",
    "collect_checks",
    "load_profile",
    "run_profile",
]

REPORT_SCHEMA = "rtauto.plan_check.report/1"
_PROFILE_KEYS = {"name", "description", "report", "dvh", "machines", "checks"}
_DVH_OPTIONS = {"supersample", "z_supersample", "end_cap"}


@dataclass
class Profile:
    """A check profile: which checks run, with which parameters and severities."""

    name: str
    checks: dict[str, dict[str, Any]]  # check id -> params (+ optional "severity")
    description: str = ""
    source: str = ""
    dvh: dict[str, Any] = field(default_factory=dict)
    report_dvh: str = "all"  # "all" | "evaluated" | "none"
    machines: dict[str, Any] = field(default_factory=dict)


def bundled_profiles() -> list[str]:
    """Names of the profiles shipped with the plugin."""
    folder = resources.files("rtauto_plan_check") / "profiles"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A bundled profile by name, or a YAML profile file by path. Raises ``ValueError``."""
    text_name = str(name_or_path)
    if text_name in bundled_profiles():
        resource = resources.files("rtauto_plan_check") / "profiles" / f"{text_name}.yaml"
        text, source = resource.read_text(encoding="utf-8"), f"bundled:{text_name}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"profile {text_name!r} is neither a bundled profile "
                f"({', '.join(bundled_profiles())}) nor a file"
            )
        text, source = path.read_text(encoding="utf-8"), str(path)
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"profile {source}: a mapping is expected")
    unknown = set(data) - _PROFILE_KEYS
    if unknown:
        raise ValueError(f"profile {source}: unknown keys {sorted(unknown)}")
    checks = data.get("checks") or {}
    if not isinstance(checks, dict) or not checks:
        raise ValueError(f"profile {source}: 'checks' must map check ids to parameters")
    dvh = dict(data.get("dvh") or {})
    if set(dvh) - _DVH_OPTIONS:
        raise ValueError(f"profile {source}: unknown dvh options {sorted(set(dvh) - _DVH_OPTIONS)}")
    report_dvh = str((data.get("report") or {}).get("dvh", "all"))
    if report_dvh not in ("all", "evaluated", "none"):
        raise ValueError(f"profile {source}: report.dvh must be all, evaluated or none")
    return Profile(
        name=str(data.get("name") or Path(text_name).stem),
        description=str(data.get("description") or ""),
        checks={str(k): dict(v or {}) for k, v in checks.items()},
        source=source,
        dvh=dvh,
        report_dvh=report_dvh,
        machines=dict(data.get("machines") or {}),
    )


def collect_checks(pluginmanager: Any = None) -> tuple[dict[str, Check], dict[str, str]]:
    """The check catalogue: every check registered through ``plan_check_register_checks``.

    With no plugin manager (or one without the hook), the built-in checks. Returns the checks
    by id and the plugins whose registration failed (plugin name -> reason).
    """
    catalogue: dict[str, Check] = {}
    failures: dict[str, str] = {}
    caller = getattr(getattr(pluginmanager, "hook", None), "plan_check_register_checks", None)
    if caller is None or not caller.get_hookimpls():
        return {c.id: c for c in BUILTIN_CHECKS}, failures
    for impl in caller.get_hookimpls():
        registered: dict[str, Check] = {}

        def register(
            check: Check, _plugin: str = impl.plugin_name, _registered: dict = registered
        ) -> None:
            if not isinstance(check, Check):
                raise PluginError(f"plugin {_plugin} registered {check!r}, not a Check")
            if check.id in catalogue or check.id in _registered:
                raise PluginError(f"plugin {_plugin} registers check {check.id!r} twice")
            _registered[check.id] = check

        try:
            impl.function(register)
        except Exception as exc:
            failures[impl.plugin_name] = f"plan_check_register_checks failed: {exc}"
            continue
        catalogue.update(registered)
    return catalogue, failures


def _merge(
    check: Check, profile_entry: Mapping[str, Any], override: Mapping[str, Any], machines: Any
) -> tuple[dict[str, Any], str]:
    params = copy.deepcopy(dict(check.params))
    severity = check.severity
    for source in (profile_entry, override):
        for key, value in source.items():
            if key == "severity":
                if value not in SEVERITIES:
                    raise ValueError(f"check {check.id}: severity must be one of {SEVERITIES}")
                severity = value
            elif key not in check.params:
                raise ValueError(
                    f"check {check.id}: unknown parameter {key!r} "
                    f"(known: {', '.join(sorted(check.params)) or 'none'})"
                )
            else:
                params[key] = value
    if "machines" in check.params and not params.get("machines"):
        params["machines"] = machines
    return params, severity


def _run_one(check: Check, plan: PlanSet, params: dict[str, Any], severity: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": check.id,
        "title": check.title,
        "severity": severity,
        "failure_mode": check.failure_mode,
        "needs": list(check.needs),
        "params": {k: v for k, v in params.items() if k != "machines"},
        "measured": None,
        "tolerance": None,
        "message": "",
    }
    missing = [
        need
        for need, present in (
            ("structures", plan.structure_set is not None),
            ("dose", bool(plan.doses)),
            ("ct", bool(plan.ct)),
        )
        if need in check.needs and not present
    ]
    if missing:
        row.update(status="not_applicable", message=f"needs {', '.join(missing)}: not in the input")
        return row
    if check.radiation and not plan.radiation_types & set(check.radiation):
        kinds = ", ".join(sorted(plan.radiation_types)) or "none"
        row.update(
            status="not_applicable",
            message=f"applies to {'/'.join(check.radiation)} beams only; the plan has {kinds}",
        )
        return row
    try:
        result = check.run(plan, params)
        if not isinstance(result, CheckResult):
            raise TypeError(f"check returned {type(result).__name__}, not a CheckResult")
    except Exception as exc:
        row.update(
            status="error",
            message=f"the check raised {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(limit=5),
        )
        return row
    status = {"pass": "pass", "not_applicable": "not_applicable"}.get(result.verdict, severity)
    row.update(
        status=status,
        measured=result.measured,
        tolerance=result.tolerance,
        message=result.message,
        details=result.details,
    )
    return row


def run_profile(
    plan: PlanSet,
    profile: Profile,
    catalogue: Mapping[str, Check],
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    machines: Mapping[str, Any] | None = None,
    plugin_failures: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run the profile's checks on ``plan`` and return the report (see ``REPORT_SCHEMA``).

    ``overrides`` (check id -> parameters, and ``severity``) come from the workflow; a check
    id the profile does not select, or an unknown parameter, raises ``ValueError``. A check
    the profile names but no plugin registered is reported with status ``error``.
    """
    from rtauto_plan_check import __version__

    overrides = dict(overrides or {})
    stray = set(overrides) - set(profile.checks)
    if stray:
        raise ValueError(f"overrides name checks the profile does not run: {sorted(stray)}")
    machine_list = dict(machines or profile.machines or {})
    plan.dvh_options = {**profile.dvh, **plan.dvh_options}
    rows = []
    for check_id, entry in profile.checks.items():
        check = catalogue.get(check_id)
        if check is None:
            rows.append(
                {
                    "id": check_id,
                    "title": check_id,
                    "severity": "fail",
                    "status": "error",
                    "message": "no installed plugin registers this check",
                    "measured": None,
                    "tolerance": None,
                    "failure_mode": "",
                    "needs": [],
                    "params": {},
                }
            )
            continue
        params, severity = _merge(check, entry, overrides.get(check_id, {}), machine_list)
        rows.append(_run_one(check, plan, params, severity))
    if profile.report_dvh == "all" and plan.dose is not None:
        for structure in plan.structures.values():
            if structure.planes:
                plan.dvh(structure)
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        counts[row["status"]] += 1
    outcome = "fail" if counts["fail"] or counts["error"] else "warn" if counts["warn"] else "pass"
    return {
        "schema": REPORT_SCHEMA,
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "plan_check_version": __version__,
        "profile": {"name": profile.name, "source": profile.source},
        "plan": _plan_summary(plan),
        "outcome": outcome,
        "counts": counts,
        "failed": [r["id"] for r in rows if r["status"] in ("fail", "error")],
        "warned": [r["id"] for r in rows if r["status"] == "warn"],
        "checks": rows,
        "dvh": [] if profile.report_dvh == "none" else _dvh_rows(plan),
        "plugin_failures": dict(plugin_failures or {}),
    }


def _plan_summary(plan: PlanSet) -> dict[str, Any]:
    ds = plan.plan
    return {
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "modality": str(ds.get("Modality", "")),
        "ion_plan": plan.is_ion,
        "label": str(ds.get("RTPlanLabel", "") or ""),
        "patient_id": str(ds.get("PatientID", "") or ""),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "radiation_types": sorted(plan.radiation_types),
        "machines": sorted({b.machine for b in plan.treatment_beams}),
        "beams": len(plan.treatment_beams),
        "fractions": plan.fractions,
        "prescription_gy": plan.prescription_gy,
        "structure_set": str(plan.structure_set.SOPInstanceUID)
        if plan.structure_set is not None
        else None,
        "dose": plan.dose.sop_instance_uid if plan.dose is not None else None,
        "ct_images": len(plan.ct),
    }


def _dvh_rows(plan: PlanSet) -> list[dict[str, Any]]:
    rows = []
    by_name = {s.name: s for s in plan.structures.values()}
    for name, dvh in plan.dvhs.items():
        dose_axis, volume_axis = dvh.curve(120)
        structure = by_name.get(name)
        rows.append(
            {
                "structure": name,
                "color": list(structure.color) if structure else [0, 0, 0],
                "volume_cc": round(dvh.volume, 3),
                "min_gy": round(dvh.minimum, 3),
                "max_gy": round(dvh.maximum, 3),
                "mean_gy": round(dvh.mean, 3),
                "d95_percent_gy": round(dvh.d_percent(95), 3),
                "d_003cc_gy": round(dvh.d_max_003cc, 3),
                "outside_dose_grid_cc": round(dvh.outside_grid, 3),
                "curve": {
                    "dose_gy": [round(float(v), 4) for v in dose_axis],
                    "volume_percent": [round(float(v), 3) for v in volume_axis],
                },
            }
        )
    return rows
