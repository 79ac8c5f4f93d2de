"""RT Ion Plans (DCPT head phantom): photon-only checks are not applicable, the rest evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rtauto_plan_check.step import PlanCheckParams

from rtauto.hooks import build_plugin_manager

PHOTON_ONLY = {"mu_per_cgy", "dose_rate", "ssd_range"}
NEEDS_DOSE = {
    "dose_plan_reference",
    "dose_grid_resolution",
    "dose_grid_coverage",
    "target_coverage",
    "hot_spot",
    "oar_constraints",
}


def _run(files: list[Path], workdir: Path, make_context) -> dict:
    host = build_plugin_manager(
        autoload=False, extra_plugins={"plan_check": "rtauto_plan_check.plugin"}
    )
    ctx = make_context(files, workdir)
    result = host.steps["plan_check.run"].step_type.run(ctx, PlanCheckParams(profile="proton"))
    report = json.loads((workdir / "report.json").read_text())
    assert result.outputs["outcome"] == report["outcome"]
    return report


def test_head_phantom_ion_plan_with_ct_and_structures(
    test_data: Path, tmp_path: Path, make_context
) -> None:
    study = test_data / "dcpt-headphantom" / "study"
    report = _run(sorted(study.glob("*.dcm")), tmp_path / "work", make_context)
    rows = {r["id"]: r for r in report["checks"]}
    assert report["plan"]["ion_plan"] is True  # RT Ion Plan Storage (its Modality says RTPLAN)
    assert report["plan"]["radiation_types"] == ["PROTON"]
    assert "error" not in {r["status"] for r in rows.values()}
    for check_id in PHOTON_ONLY:
        assert rows[check_id]["status"] == "not_applicable"
        assert "PHOTON" in rows[check_id]["message"] and "PROTON" in rows[check_id]["message"]
    for check_id in NEEDS_DOSE:  # the RTDOSE files are not in the data set
        assert rows[check_id]["status"] == "not_applicable"
        assert "dose" in rows[check_id]["message"]
    evaluated = {k for k, r in rows.items() if r["status"] != "not_applicable"}
    assert evaluated >= {
        "prescription_fractionation",
        "beam_dose_sum",
        "single_machine",
        "single_isocenter",
        "tolerance_table",
        "plan_approval",
        "patient_position",
        "uid_chain",
        "frame_of_reference",
        "isocenter_in_body",
        "required_structures",
        "tg263_naming",
    }
    # the data's known defect: the plan references another structure set than the one present
    assert rows["uid_chain"]["status"] == "fail"
    assert rows["isocenter_in_body"]["status"] == "pass"
    assert rows["patient_position"]["status"] == "pass"
    assert report["outcome"] == "fail" and "uid_chain" in report["failed"]


@pytest.mark.parametrize("name", ["temp_160MeV_10x10.dcm", "temp_sobp_10x10.dcm"])
def test_plan_alone(name: str, test_data: Path, tmp_path: Path, make_context) -> None:
    plan = test_data / "dcpt-headphantom" / "test_plans" / name
    report = _run([plan], tmp_path / "work", make_context)
    rows = {r["id"]: r for r in report["checks"]}
    assert "error" not in {r["status"] for r in rows.values()}
    assert rows["required_structures"]["status"] == "not_applicable"
    assert "structures" in rows["required_structures"]["message"]
    assert rows["mu_per_cgy"]["status"] == "not_applicable"
    assert rows["single_isocenter"]["status"] in ("pass", "fail")
    assert report["dvh"] == []
