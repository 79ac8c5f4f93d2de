"""The step's contract: registration through the entry point, params, outcome and failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from rtauto_plan_check.runner import bundled_profiles, load_profile
from rtauto_plan_check.step import PlanCheckParams

from rtauto.errors import StepFailed
from rtauto.hooks import build_plugin_manager


def test_entry_point_registers_the_step() -> None:
    host = build_plugin_manager()  # autoload: the installed rtauto-plan-check distribution
    assert "plan_check.run" in host.steps, host.failures
    assert host.plugins["plan_check"].distribution == "rtauto-plan-check"
    step = host.steps["plan_check.run"].step_type
    assert set(step.outputs) == {"outcome", "counts", "failed", "warned"}


def test_params_forbid_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        PlanCheckParams(profile="photon-conventional", overide={})  # type: ignore[call-arg]


def test_bundled_profiles_load_and_name_only_known_checks() -> None:
    from rtauto_plan_check.checks import BUILTIN_CHECKS

    known = {c.id for c in BUILTIN_CHECKS}
    assert len(known) >= 20
    assert {"photon-conventional", "photon-srs", "proton"} <= set(bundled_profiles())
    for name in bundled_profiles():
        profile = load_profile(name)
        assert set(profile.checks) <= known, name
    for check in BUILTIN_CHECKS:
        assert check.failure_mode and check.title


def test_bad_profile_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nchecks: {}\n")
    with pytest.raises(ValueError, match="checks"):
        load_profile(bad)
    with pytest.raises(ValueError, match="neither a bundled profile"):
        load_profile("no-such-profile")


def _step():
    host = build_plugin_manager(
        autoload=False, extra_plugins={"plan_check": "rtauto_plan_check.plugin"}
    )
    return host.steps["plan_check.run"].step_type


def test_no_plan_in_the_input_fails_the_step(breast: Path, tmp_path: Path, make_context) -> None:
    ctx = make_context([breast / "rtss.dcm", breast / "rtdose.dcm"], tmp_path / "work")
    with pytest.raises(StepFailed, match="no RTPLAN"):
        _step().run(ctx, PlanCheckParams())


def test_unknown_override_fails_the_step(breast: Path, tmp_path: Path, make_context) -> None:
    ctx = make_context([breast / "rtplan.dcm"], tmp_path / "work")
    with pytest.raises(StepFailed, match="unknown parameter 'tolerance'"):
        _step().run(ctx, PlanCheckParams(overrides={"beam_dose_sum": {"tolerance": 2}}))
    with pytest.raises(StepFailed, match="does not run"):
        _step().run(ctx, PlanCheckParams(overrides={"no_such_check": {}}))


def test_plan_alone_runs_with_data_checks_not_applicable(
    breast: Path, tmp_path: Path, make_context
) -> None:
    ctx = make_context([breast / "rtplan.dcm"], tmp_path / "work")
    result = _step().run(ctx, PlanCheckParams())
    assert result.outputs["outcome"] in ("pass", "warn")
    assert result.outputs["counts"]["not_applicable"] >= 10
    assert {a.kind for a in ctx.artifacts} == {"report-json", "report-html"}
