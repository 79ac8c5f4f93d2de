"""Vendors add checks through the plan_check_register_checks hook this plugin declares."""

from __future__ import annotations

import json
import types
from pathlib import Path

from rtauto_plan_check import Check, CheckResult
from rtauto_plan_check.runner import collect_checks, load_profile
from rtauto_plan_check.step import PlanCheckParams

from rtauto import hookimpl
from rtauto.hooks import build_plugin_manager


def _beam_count(plan, params):
    count = len(plan.treatment_beams)
    if count > params["max_beams"]:
        return CheckResult.violated(f"{count} beams", count, params["max_beams"])
    return CheckResult.passed(f"{count} beams", count, params["max_beams"])


def _vendor_module() -> types.ModuleType:
    module = types.ModuleType("acme_checks")

    @hookimpl
    def plan_check_register_checks(register):
        register(
            Check(
                id="acme.beam_count",
                title="At most N treatment beams",
                run=_beam_count,
                failure_mode="Too many beams for the department's QA capacity",
                params={"max_beams": 3},
            )
        )

    module.plan_check_register_checks = plan_check_register_checks
    return module


def _broken_module() -> types.ModuleType:
    module = types.ModuleType("broken_checks")

    @hookimpl
    def plan_check_register_checks(register):
        raise RuntimeError("licence server unreachable")

    module.plan_check_register_checks = plan_check_register_checks
    return module


def test_vendor_check_runs_and_appears_in_the_report(
    breast: Path, tmp_path: Path, make_context, machines
) -> None:
    host = build_plugin_manager(
        autoload=False,
        extra_plugins={
            "plan_check": "rtauto_plan_check.plugin",
            "acme": _vendor_module(),
            "broken": _broken_module(),
        },
    )
    assert not host.failures
    catalogue, failures = collect_checks(host.pm)
    assert "acme.beam_count" in catalogue and "beam_dose_sum" in catalogue
    assert "broken" in failures and "licence server" in failures["broken"]

    profile_path = tmp_path / "acme.yaml"
    profile_path.write_text(
        "name: acme\nchecks:\n  beam_dose_sum: {}\n  acme.beam_count: {max_beams: 3}\n"
    )
    assert load_profile(profile_path).checks["acme.beam_count"] == {"max_beams": 3}
    ctx = make_context(sorted(breast.glob("*.dcm")), tmp_path / "work")
    params = PlanCheckParams(
        profile=str(profile_path), machines=machines, overrides={"acme.beam_count": {}}
    )
    result = host.steps["plan_check.run"].step_type.run(ctx, params)
    report = json.loads((ctx.workdir / "report.json").read_text())
    row = next(r for r in report["checks"] if r["id"] == "acme.beam_count")
    assert row["status"] == "fail" and row["measured"] == 4  # the breast plan has 4 beams
    assert row["failure_mode"] == "Too many beams for the department's QA capacity"
    assert result.outputs["failed"] == ["acme.beam_count"]
    assert "broken" in report["plugin_failures"]
    assert "acme.beam_count" in (ctx.workdir / "report.html").read_text()

    # the workflow may relax it: the same plan then passes
    ctx2 = make_context(sorted(breast.glob("*.dcm")), tmp_path / "work2")
    relaxed = PlanCheckParams(
        profile=str(profile_path), overrides={"acme.beam_count": {"max_beams": 4}}
    )
    assert host.steps["plan_check.run"].step_type.run(ctx2, relaxed).outputs["outcome"] == "pass"


def test_profile_naming_an_unregistered_check_reports_an_error(
    breast: Path, tmp_path: Path, make_context
) -> None:
    host = build_plugin_manager(
        autoload=False, extra_plugins={"plan_check": "rtauto_plan_check.plugin"}
    )
    profile_path = tmp_path / "p.yaml"
    profile_path.write_text("name: p\nchecks:\n  beam_dose_sum: {}\n  acme.beam_count: {}\n")
    ctx = make_context([breast / "rtplan.dcm"], tmp_path / "work")
    result = host.steps["plan_check.run"].step_type.run(
        ctx, PlanCheckParams(profile=str(profile_path))
    )
    assert result.outputs["outcome"] == "fail"
    assert result.outputs["failed"] == ["acme.beam_count"]
    assert result.outputs["counts"]["error"] == 1
