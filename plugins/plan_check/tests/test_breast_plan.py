"""The full photon profile on the dicompyler-core breast plan, and mutated copies of it.

Each mutation is made on a copy in tmp_path (the shared data are never written) and must be
caught by the check meant for it while every other check keeps its status.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from rtauto_plan_check.data import load_plan_set
from rtauto_plan_check.step import PlanCheckParams

from rtauto.hooks import build_plugin_manager

OVERRIDES = {
    "required_structures": {"names": ["External", "Heart", "Lung_L"]},
    "target_coverage": {"target": "Tumor Bed"},
}


def _run(folder: Path, workdir: Path, make_context, machines) -> tuple[dict, object]:
    host = build_plugin_manager(
        autoload=False, extra_plugins={"plan_check": "rtauto_plan_check.plugin"}
    )
    step = host.steps["plan_check.run"].step_type
    ctx = make_context(sorted(folder.glob("*.dcm")), workdir)
    params = PlanCheckParams(profile="photon-conventional", machines=machines, overrides=OVERRIDES)
    result = step.run(ctx, params)
    report = json.loads((workdir / "report.json").read_text())
    return report, result


def _statuses(report: dict) -> dict[str, str]:
    return {row["id"]: row["status"] for row in report["checks"]}


@pytest.fixture(scope="module")
def baseline(breast: Path, tmp_path_factory, make_context, machines) -> dict:
    report, result = _run(
        breast, tmp_path_factory.mktemp("baseline") / "work", make_context, machines
    )
    return {"report": report, "result": result}


def test_every_check_runs_and_is_reported(baseline: dict) -> None:
    report, result = baseline["report"], baseline["result"]
    assert len(report["checks"]) >= 20
    statuses = _statuses(report)
    assert "error" not in statuses.values(), [r for r in report["checks"] if r["status"] == "error"]
    # the data are complete (plan, structures, dose, CT): every check is evaluated
    assert "not_applicable" not in statuses.values()
    assert result.outputs["outcome"] == report["outcome"] == "warn"
    assert result.outputs["failed"] == []
    assert set(result.outputs["warned"]) == {
        "setup_fields",
        "plan_approval",
        "plan_intent",
        "tg263_naming",
        "degenerate_contours",
        "couch_structure",
    }
    assert sum(result.outputs["counts"].values()) == len(report["checks"])
    coverage = next(r for r in report["checks"] if r["id"] == "target_coverage")
    assert coverage["measured"]["percent_of_rx"] > 95
    for row in report["checks"]:
        assert row["failure_mode"], row["id"]
    # a DVH for every ROI with contours (Areola has none)
    assert {d["structure"] for d in report["dvh"]} == {
        "BODY",
        "Borders",
        "Breast",
        "Heart",
        "Lt Lung",
        "Nodes",
        "Scar",
        "Tumor Bed",
        "Tumor Bed Block",
    }


def test_html_report(breast: Path, tmp_path: Path, make_context, machines) -> None:
    host = build_plugin_manager(
        autoload=False, extra_plugins={"plan_check": "rtauto_plan_check.plugin"}
    )
    ctx = make_context(sorted(breast.glob("*.dcm")), tmp_path / "work")
    params = PlanCheckParams(profile="photon-conventional", machines=machines, overrides=OVERRIDES)
    host.steps["plan_check.run"].step_type.run(ctx, params)
    kinds = {a.kind: a.path for a in ctx.artifacts}
    assert set(kinds) == {"report-json", "report-html"}
    assert all(p.parent == ctx.workdir for p in kinds.values())
    page = kinds["report-html"].read_text()
    assert "<svg" in page and "<polyline" in page and "Lt Lung" in page
    assert "<script" not in page and "src=" not in page and "href=" not in page
    assert "<link" not in page
    for check_id in ("beam_dose_sum", "oar_constraints", "hot_spot"):
        assert check_id in page
    report = json.loads(kinds["report-json"].read_text())
    assert report["schema"] == "rtauto.plan_check.report/1"
    assert set(report) >= {
        "schema",
        "generated",
        "profile",
        "plan",
        "outcome",
        "counts",
        "failed",
        "warned",
        "checks",
        "dvh",
        "plugin_failures",
    }
    for row in report["checks"]:
        assert set(row) >= {
            "id",
            "title",
            "status",
            "severity",
            "measured",
            "tolerance",
            "message",
            "failure_mode",
            "params",
            "needs",
        }


# ---------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------


def _edit(folder: Path, name: str, change: Callable[[pydicom.Dataset], None]) -> None:
    path = folder / name
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _fractions(ds: pydicom.Dataset) -> None:
    ds.FractionGroupSequence[0].NumberOfFractionsPlanned = 8  # 14 Gy no longer 8 x 2 Gy


def _isocenter_outside(ds: pydicom.Dataset) -> None:
    for beam in ds.BeamSequence:
        for point in beam.ControlPointSequence:
            if "IsocenterPosition" in point:
                x, y, z = (float(v) for v in point.IsocenterPosition)
                point.IsocenterPosition = [x + 250.0, y, z]  # 25 cm to the patient's left


def _energy(ds: pydicom.Dataset) -> None:
    ds.BeamSequence[0].ControlPointSequence[0].NominalBeamEnergy = 18  # txmachine: 6/10/15


def _mu(ds: pydicom.Dataset) -> None:
    ds.FractionGroupSequence[0].ReferencedBeamSequence[0].BeamMeterset = 970  # 19.4 MU/cGy


def _rename_heart(ds: pydicom.Dataset) -> None:
    for roi in ds.StructureSetROISequence:
        if roi.ROIName == "Heart":
            roi.ROIName = "Organ 5"


def _hot_spot_factory(breast: Path) -> Callable[[pydicom.Dataset], None]:
    plan = load_plan_set([breast / "rtplan.dcm"], [breast / "rtss.dcm"], [breast / "rtdose.dcm"])
    others = [s for s in plan.structures.values() if s.planes and s.name != "BODY"]
    body = plan.external()
    assert body is not None

    def change(ds: pydicom.Dataset) -> None:
        grid = plan.dose
        assert grid is not None
        values = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
        # a voxel deep inside BODY, 3 cm from every other structure's bounding box
        for f, r, c in zip(*np.nonzero(values < 2.0), strict=False):
            point = (
                grid.origin
                + c * grid.pixel_spacing[1] * grid.row_direction
                + r * grid.pixel_spacing[0] * grid.column_direction
                + grid.frame_offsets[f] * grid.normal
            )
            interior = all(0 < i < n - 1 for i, n in zip((f, r, c), values.shape, strict=True))
            if f % 3 or r % 3 or c % 3 or not interior or not body.contains(point):
                continue
            if any(
                np.all(point > s.bounds()[0] - 30) and np.all(point < s.bounds()[1] + 30)
                for s in others
            ):
                continue
            values[f - 1 : f + 2, r - 1 : r + 2, c - 1 : c + 2] = 1.3 * 14.0
            break
        else:
            raise AssertionError("no voxel for the hot spot")
        bits = int(ds.BitsAllocated)
        scaling = values.max() / (2**bits - 1)
        ds.DoseGridScaling = f"{scaling:.8e}"
        ds.PixelData = np.round(values / scaling).astype(ds.pixel_array.dtype).tobytes()

    return change


MUTATIONS = {
    "beam_dose_sum": ("rtplan.dcm", lambda breast: _fractions),
    "isocenter_in_body": ("rtplan.dcm", lambda breast: _isocenter_outside),
    "machine_energy": ("rtplan.dcm", lambda breast: _energy),
    "required_structures": ("rtss.dcm", lambda breast: _rename_heart),
    "mu_per_cgy": ("rtplan.dcm", lambda breast: _mu),
    "hot_spot": ("rtdose.dcm", _hot_spot_factory),
}


@pytest.mark.parametrize("caught_by", sorted(MUTATIONS))
def test_mutation_is_caught_by_its_check_only(
    caught_by: str, breast: Path, baseline: dict, tmp_path: Path, make_context, machines
) -> None:
    copy = tmp_path / "data"
    shutil.copytree(breast, copy)
    name, factory = MUTATIONS[caught_by]
    _edit(copy, name, factory(breast))
    report, result = _run(copy, tmp_path / "work", make_context, machines)
    before, after = _statuses(baseline["report"]), _statuses(report)
    assert before[caught_by] == "pass"
    assert after[caught_by] == "fail", next(r for r in report["checks"] if r["id"] == caught_by)
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert changed == {caught_by: ("pass", "fail")}
    assert result.outputs["outcome"] == "fail"
    assert result.outputs["failed"] == [caught_by]
    # the shared data are untouched
    assert (
        pydicom.dcmread(breast / name).SOPInstanceUID == pydicom.dcmread(copy / name).SOPInstanceUID
    )
