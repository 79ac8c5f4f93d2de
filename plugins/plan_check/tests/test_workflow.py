"""workflows/plan-check.yaml end to end: `rtauto run` checks the plan, files the report and
forwards the plan to a real DICOM node only when no check failed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

pytestmark = pytest.mark.integration

RTAUTO = [sys.executable, "-m", "rtauto.cli"]


def _workflow(project_root: Path, tmp_path: Path, port: int) -> Path:
    text = (project_root / "workflows" / "plan-check.yaml").read_text()
    assert "port: 11113" in text
    path = tmp_path / "plan-check.yaml"
    path.write_text(text.replace("port: 11113", f"port: {port}"))
    return path


def _rtauto_run(workflow: Path, files: list[Path], tmp_path: Path) -> dict:
    home = tmp_path / "home"
    (home / "plan-check-reports").mkdir(parents=True)
    command = [*RTAUTO, "run", str(workflow), *map(str, files)]
    command += ["--out", str(tmp_path / "out"), "--home", str(home), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def _steps(job: dict) -> dict[str, dict]:
    return {s["id"]: s for s in job["steps"]}


def test_workflow_validates(project_root: Path) -> None:
    done = subprocess.run(
        [*RTAUTO, "validate", str(project_root / "workflows" / "plan-check.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_plan_without_failures_is_forwarded(
    breast: Path, project_root: Path, tmp_path: Path, receiving_scp
) -> None:
    workflow = _workflow(project_root, tmp_path, receiving_scp.port)
    files = [breast / n for n in ("rtplan.dcm", "rtss.dcm", "rtdose.dcm", "ct.0.dcm")]
    job = _rtauto_run(workflow, files, tmp_path)
    steps = _steps(job)
    assert steps["check"]["outputs"]["outcome"] == "warn"
    assert steps["forward"]["outcome"] == "ok"
    plan_uid = str(pydicom.dcmread(breast / "rtplan.dcm").SOPInstanceUID)
    assert receiving_scp.received == [plan_uid]
    reports = tmp_path / "home" / "plan-check-reports"
    assert {p.name for p in reports.rglob("report.*")} == {"report.json", "report.html"}


def test_failing_plan_is_held_back_and_reported(
    breast: Path, project_root: Path, tmp_path: Path, receiving_scp
) -> None:
    data = tmp_path / "data"
    shutil.copytree(breast, data)
    plan = pydicom.dcmread(data / "rtplan.dcm")
    plan.FractionGroupSequence[0].NumberOfFractionsPlanned = 8  # prescription inconsistent
    plan.save_as(data / "rtplan.dcm")
    workflow = _workflow(project_root, tmp_path, receiving_scp.port)
    job = _rtauto_run(
        workflow, [data / "rtplan.dcm", data / "rtss.dcm", data / "rtdose.dcm"], tmp_path
    )
    steps = _steps(job)
    assert steps["check"]["outcome"] == "ok"  # a failing check is an outcome, not a step failure
    assert steps["check"]["outputs"]["outcome"] == "fail"
    assert "beam_dose_sum" in steps["check"]["outputs"]["failed"]
    assert steps["forward"]["outcome"] == "skipped"
    assert steps["reports"]["outcome"] == "ok"
    assert receiving_scp.received == []
    report = next((tmp_path / "home" / "plan-check-reports").rglob("report.json"))
    assert json.loads(report.read_text())["outcome"] == "fail"
