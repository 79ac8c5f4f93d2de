"""``rtauto batch``: a cohort run with a report, resumed, retried, and re-run with an override."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from rtauto_autocontour.threshold import body_mask

from rtauto.dicom.geometry import load_series
from rtauto.dicom.rtstruct import Structure, write_rtstruct
from rtauto.testing import write_ct_series
from rtauto.workflow import apply_overrides

WORKFLOW = """\
name: cohort-body
trigger: {modality: CT}
steps:
  - id: body
    uses: autocontour.threshold
    with: {structures: [BODY], output: rtstruct}
  - id: compare
    uses: autocontour.compare
    needs: [body]
    with: {from: [body], match: {BODY: External}}
"""


def batch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rtauto.cli", "batch", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_overrides_change_step_params_only() -> None:
    text = apply_overrides(
        WORKFLOW, ["body.output=seg", "body.opts.level=-300", "body.structures=[BODY, LUNGS]"]
    )
    assert "output: seg" in text and "level: -300" in text and "- LUNGS" in text
    with pytest.raises(ValueError, match="no step 'segment'"):
        apply_overrides(WORKFLOW, ["segment.model=x@1"])
    with pytest.raises(ValueError, match="STEP.PARAM=VALUE"):
        apply_overrides(WORKFLOW, ["body"])


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """Three CT studies, each with a reference RTSTRUCT (one missing a slice), and a file
    that is not DICOM."""
    root = tmp_path / "cohort"
    for n in range(3):
        series = write_ct_series(
            root / f"patient{n}", rows=48, cols=48, slices=12, patient_id=f"COHORT-{n}", seed=n
        )
        volume = load_series(series.files)
        # drawn by the threshold step's own rule: the report plumbing is under test here
        external = Structure(
            "External", body_mask(volume, -350.0, 4.0), interpreted_type="EXTERNAL"
        )
        write_rtstruct(volume, [external], root / f"patient{n}" / "RS.reference.dcm")
    broken = sorted((root / "patient2").glob("*.dcm"))
    broken[5].unlink()  # a gap in the series: the step must refuse it
    (root / "notes.txt").write_text("not DICOM")
    return root


def test_batch_runs_reports_resumes_retries_and_reruns_with_an_override(
    tmp_path: Path, cohort: Path
) -> None:
    workflow = tmp_path / "body.yaml"
    workflow.write_text(WORKFLOW)
    out = tmp_path / "out"

    first = batch(str(workflow), str(cohort), "--out", str(out), "--jobs", "2", "--json")
    assert first.returncode == 1, first.stderr  # one case failed
    report = json.loads(first.stdout)
    rows = {row["patient_id"]: row for row in report["rows"]}
    assert sorted(rows) == ["COHORT-0", "COHORT-1", "COHORT-2"]
    assert (report["ok"], report["failed"]) == (2, 1)
    assert rows["COHORT-2"]["status"] == "fail" and rows["COHORT-2"]["failed_step"] == "body"
    assert "slice" in rows["COHORT-2"]["error"]
    assert [Path(f["file"]).name for f in report["refused_files"]] == ["notes.txt"]
    run = out / "runs" / report["workflow_hash"][:12]
    for patient in ("COHORT-0", "COHORT-1"):
        row = rows[patient]
        assert row["status"] == "ok" and row["steps"] == {"body": "ok", "compare": "ok"}
        assert row["files"] == 13 and row["series"] == 2
        [written] = [Path(a) for a in row["artifacts"] if Path(a).name.startswith("RS.")]
        assert Path(row["outputs"]).parent == run and run / row["case"] in written.parents
        assert pydicom.dcmread(written).PatientID == patient
    with (run / "batch.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert sorted(r["patient_id"] for r in table) == sorted(rows)
    assert {r["step:body"] for r in table} == {"ok", "fail"}
    # the threshold BODY against the reference drawn by the same rule
    dice = [float(r["compare:BODY.dice"]) for r in table if r["status"] == "ok"]
    assert dice == [1.0, 1.0]
    assert json.loads((run / "batch.json").read_text())["rows"] == report["rows"]

    # the same command again: nothing runs twice
    again = json.loads(batch(str(workflow), str(cohort), "--out", str(out), "--json").stdout)
    assert {row["resumed"] for row in again["rows"]} == {"done"}
    assert [row["job"] for row in again["rows"]] == [row["job"] for row in report["rows"]]

    # --retry-failed runs the failed case again, in its own folder, and only that one
    retried = json.loads(
        batch(str(workflow), str(cohort), "--out", str(out), "--retry-failed", "--json").stdout
    )
    by_patient = {row["patient_id"]: row for row in retried["rows"]}
    assert by_patient["COHORT-2"]["job"] != rows["COHORT-2"]["job"]
    assert ".retry-" in Path(by_patient["COHORT-2"]["outputs"]).name
    assert by_patient["COHORT-0"]["job"] == rows["COHORT-0"]["job"]

    # an override is a new workflow version: a new run folder, every case run again
    wider = json.loads(
        batch(
            str(workflow), str(cohort), "--out", str(out), "--set", "body.opening_mm=8", "--json"
        ).stdout
    )
    assert wider["overrides"] == ["body.opening_mm=8"]
    assert wider["workflow_hash"] != report["workflow_hash"]
    assert not {row["job"] for row in wider["rows"]} & {row["job"] for row in report["rows"]}
    ok = next(row for row in wider["rows"] if row["status"] == "ok")
    assert Path(ok["outputs"]).parent.name == wider["workflow_hash"][:12]
    assert [Path(a).name.split(".")[0] for a in ok["artifacts"]] == ["RS", "compare"]

    refused = batch(str(workflow), str(cohort), "--out", str(out), "--set", "nope.x=1")
    assert refused.returncode == 2 and "no step 'nope'" in refused.stderr
