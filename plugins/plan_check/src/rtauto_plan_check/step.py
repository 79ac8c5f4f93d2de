"""The ``plan_check.run`` step: checks the study's plan and writes report.json / report.html."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import pluggy
import yaml
from pydantic import BaseModel, Field

from rtauto.errors import StepFailed
from rtauto.steps import StepContext, StepResult, StepType
from rtauto_plan_check.data import PLAN_MODALITIES, load_plan_set
from rtauto_plan_check.report import render_html, write_json
from rtauto_plan_check.runner import collect_checks, load_profile, run_profile

__all__ = ["PlanCheckParams", "STEP_TYPE", "remember_plugin_manager", "run_step"]

# The plugin manager that registered this plugin most recently (the worker's own): its
# plan_check_register_checks implementations make the check catalogue.
_manager: weakref.ReferenceType[pluggy.PluginManager] | None = None


def remember_plugin_manager(pluginmanager: pluggy.PluginManager) -> None:
    global _manager
    _manager = weakref.ref(pluginmanager)


class PlanCheckParams(BaseModel):
    """The step's ``with:`` block."""

    model_config = {"extra": "forbid"}

    profile: str = Field(
        "photon-conventional", description="a bundled profile name or a path to a YAML profile"
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="check id -> parameter overrides (and severity)"
    )
    machines: dict[str, Any] | str | None = Field(
        None,
        description="machine list (name -> energies, techniques, max_dose_rate, approved) or "
        "a path to a YAML file holding one; default: the profile's, else the plugin settings'",
    )


def _machines(params: PlanCheckParams, settings: Any) -> dict[str, Any] | None:
    if isinstance(params.machines, str):
        path = Path(params.machines)
        if not path.is_file():
            raise StepFailed(f"machine list {path} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return dict(data.get("machines", data))
    if params.machines:
        return dict(params.machines)
    plugin_settings = (getattr(settings, "plugins", None) or {}).get("plan_check") or {}
    return dict(plugin_settings.get("machines") or {}) or None


def _manager_for(ctx: StepContext) -> Any:
    manager = _manager() if _manager is not None else None
    if manager is not None:
        return manager
    from rtauto.hooks import build_plugin_manager

    return build_plugin_manager(ctx.settings).pm


def run_step(ctx: StepContext, params: PlanCheckParams) -> StepResult:
    """Run the checks; a failing check is an outcome, not a step failure."""
    plans = [s for m in PLAN_MODALITIES for s in ctx.study.by_modality(m)]
    plan_files = [f for s in plans for f in s.files]
    if not plan_files:
        raise StepFailed("the job's input holds no RTPLAN or RTIONPLAN: nothing to check")
    if len(plan_files) > 1:
        ctx.logger.warning("%d plans in the input; checking %s", len(plan_files), plan_files[0])
    try:
        profile = load_profile(params.profile)
    except ValueError as exc:
        raise StepFailed(str(exc)) from exc

    def files(modality: str) -> list[Path]:
        return [f for s in ctx.study.by_modality(modality) for f in s.files]

    try:
        plan_set = load_plan_set(plan_files[:1], files("RTSTRUCT"), files("RTDOSE"), files("CT"))
    except Exception as exc:
        raise StepFailed(f"the plan could not be read: {exc}") from exc
    catalogue, failures = collect_checks(_manager_for(ctx))
    try:
        report = run_profile(
            plan_set,
            profile,
            catalogue,
            overrides=params.overrides,
            machines=_machines(params, ctx.settings),
            plugin_failures=failures,
        )
    except ValueError as exc:
        raise StepFailed(str(exc)) from exc
    report["job"] = {"id": ctx.job_id, "step": ctx.step_id}
    json_path = write_json(report, ctx.workdir / "report.json")
    html_path = ctx.workdir / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    label = report["plan"]["label"] or report["plan"]["sop_instance_uid"]
    ctx.add_artifact(json_path, kind="report-json", description=f"plan check of {label}")
    ctx.add_artifact(html_path, kind="report-html", description=f"plan check of {label}")
    counts = report["counts"]
    return StepResult(
        outputs={
            "outcome": report["outcome"],
            "counts": counts,
            "failed": report["failed"],
            "warned": report["warned"],
        },
        summary=(
            f"plan {label}: {report['outcome']} ({counts['pass']} pass, {counts['warn']} warn, "
            f"{counts['fail'] + counts['error']} fail, {counts['not_applicable']} n/a)"
        ),
    )


STEP_TYPE = StepType(
    name="plan_check.run",
    run=run_step,
    params=PlanCheckParams,
    description="Check the study's RTPLAN/RTIONPLAN (with its RTSTRUCT, RTDOSE, CT when "
    "present) against a check profile; write report.json and report.html.",
    outputs={
        "outcome": "pass | warn | fail (fail also when a check could not run)",
        "counts": "number of checks per status: pass, warn, fail, not_applicable, error",
        "failed": "ids of the checks that failed",
        "warned": "ids of the checks that warned",
    },
)
