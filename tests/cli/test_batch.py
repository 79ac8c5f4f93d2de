"""``rtauto batch``: a cohort run with a report, resumed, retried, and re-run with an override."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml
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
    root = yaml.compose(WORKFLOW)
    apply_overrides(
        root, ["body.output=seg", "body.opts.level=-300", "body.structures=[BODY, LUNGS]"]
    )
    data = yaml.safe_load(yaml.serialize(root))
    assert data["steps"][0]["with"]["output"] == "seg"
    assert data["steps"][0]["with"]["opts"] == {"level": -300}
    assert data["steps"][0]["with"]["structures"] == ["BODY", "LUNGS"]
    assert {k: v for k, v in data.items() if k != "steps"} == {
        k: v for k, v in yaml.safe_load(WORKFLOW).items() if k != "steps"
    }
    with pytest.raises(ValueError, match="no step 'segment'"):
        apply_overrides(yaml.compose(WORKFLOW), ["segment.model=x@1"])
    with pytest.raises(ValueError, match="STEP.PARAM=VALUE"):
        apply_overrides(yaml.compose(WORKFLOW), ["body"])


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
    error = rows["COHORT-2"]["error"]
    assert "slice(s) missing between" in error
    # named by the cohort's files, not by their copies in the batch's spool
    assert str(cohort / "patient2") in error and ".rtauto" not in error
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
    assert Path(by_patient["COHORT-2"]["outputs"]).name.endswith(".retry-1")
    assert by_patient["COHORT-0"]["job"] == rows["COHORT-0"]["job"]
    # later runs report the retry, and a second retry is a new one
    latest = json.loads(batch(str(workflow), str(cohort), "--out", str(out), "--json").stdout)
    assert {r["patient_id"]: r["job"] for r in latest["rows"]}["COHORT-2"] == (
        by_patient["COHORT-2"]["job"]
    )
    second = json.loads(
        batch(str(workflow), str(cohort), "--out", str(out), "--retry-failed", "--json").stdout
    )
    [broken] = [r for r in second["rows"] if r["patient_id"] == "COHORT-2"]
    assert Path(broken["outputs"]).name.endswith(".retry-2")

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


def _slow_batch(tmp_path: Path, steps: str, cases: int) -> tuple[list[str], dict, Path]:
    """The command line, environment and output folder of a batch of the test site plugin's
    sleeping steps (``steps``: the workflow's step list) over ``cases`` small CT studies."""
    site = Path(__file__).parents[1] / "integration" / "site_plugins"
    config = tmp_path / "rtauto.yaml"
    config.write_text("plugin_modules: {site: rtauto_site_steps}\n")
    workflow = tmp_path / "slow.yaml"
    workflow.write_text("name: slow\ntrigger: {modality: CT}\nsteps:\n" + steps)
    cohort = tmp_path / "cohort"
    for n in range(cases):
        write_ct_series(cohort / f"p{n}", rows=8, cols=8, slices=2, patient_id=f"SLOW-{n}")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "rtauto.cli", "batch", str(workflow), str(cohort)]
    args += ["--out", str(out), "--config", str(config)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }
    return args, env, out


def test_a_killed_batch_resumes_without_running_a_finished_case_again(tmp_path: Path) -> None:
    """kill -9 of the batch while a case runs: the same command finishes the cohort, each
    case with the job it had (the finished ones are not run again), none twice."""
    args, env, out = _slow_batch(
        tmp_path,
        "  - id: first\n    uses: site.sleep\n    with: {seconds: 0.1}\n"
        "  - id: wait\n    uses: site.sleep\n    needs: [first]\n    with: {seconds: 3}\n",
        cases=3,
    )
    args += ["--jobs", "1", "--json"]
    process = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    store_path = out / ".rtauto" / "rtauto.db"
    try:
        # wait until one case has finished and another is under way
        def progress() -> tuple[int, int]:
            if not store_path.exists():
                return 0, 0
            try:
                with sqlite3.connect(store_path) as db:
                    rows = db.execute("SELECT status FROM jobs").fetchall()
            except sqlite3.OperationalError:  # the store is being created
                return 0, 0
            return sum(r[0] == "ok" for r in rows), sum(r[0] == "running" for r in rows)

        deadline = time.monotonic() + 300
        while not (progress()[0] >= 1 and progress()[1] >= 1) and time.monotonic() < deadline:
            assert process.poll() is None, "the batch ended before it could be interrupted"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    with sqlite3.connect(store_path) as db:
        before = dict(db.execute("SELECT id, status FROM jobs").fetchall())
        finished_steps = db.execute(
            "SELECT job_id, step_id, attempts FROM steps WHERE status = 'ok'"
        ).fetchall()
    assert "ok" in before.values() and "running" in before.values()

    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert [row["status"] for row in report["rows"]] == ["ok", "ok", "ok"]
    kinds = {row["job"]: row["resumed"] for row in report["rows"]}
    for job, status in before.items():
        assert kinds[job] == ("done" if status == "ok" else "unfinished")
    with sqlite3.connect(store_path) as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3
        # no step that had finished before the kill ran again
        for job, step, attempts in finished_steps:
            now = db.execute(
                "SELECT attempts, status FROM steps WHERE job_id = ? AND step_id = ?", (job, step)
            ).fetchone()
            assert now == (attempts, "ok"), (job, step)


def test_batch_stops_reading_below_the_free_space_reserve(tmp_path: Path) -> None:
    from rtauto.ingest.spool import free_bytes

    write_ct_series(tmp_path / "cohort" / "a", rows=16, cols=16, slices=3)
    workflow = tmp_path / "body.yaml"
    workflow.write_text(WORKFLOW)
    config = tmp_path / "rtauto.yaml"
    config.write_text(f"min_free_mb: {free_bytes(tmp_path) / 1e6 + 1e6:.0f}\n")  # beyond the disk
    out = tmp_path / "out"
    result = batch(
        str(workflow), str(tmp_path / "cohort"), "--out", str(out), "--config", str(config)
    )
    assert result.returncode == 1
    assert "rtauto's disk is nearly full" in result.stderr and "it resumes" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((out / ".rtauto" / "quarantine").glob("*.bin"))  # nothing was refused


BODY_ONLY = """\
name: cohort-body-only
trigger: {modality: CT}
steps:
  - id: body
    uses: autocontour.threshold
    with: {structures: [BODY]}
"""


def test_the_output_folder_and_hidden_folders_are_never_read_back_as_input(
    tmp_path: Path,
) -> None:
    cohort = tmp_path / "cohort"
    write_ct_series(cohort / "a", rows=24, cols=24, slices=4, patient_id="HYG-A")
    # a case folder that is a symbolic link (a cohort assembled from several places)
    write_ct_series(tmp_path / "elsewhere" / "b", rows=24, cols=24, slices=4, patient_id="HYG-B")
    (cohort / "b").symlink_to(tmp_path / "elsewhere" / "b", target_is_directory=True)
    (cohort / "loop").symlink_to(cohort, target_is_directory=True)  # read once, not forever
    workflow = tmp_path / "body.yaml"
    workflow.write_text(BODY_ONLY)
    out = cohort / "results"  # inside the cohort
    for _ in range(2):  # the second run finds the first one's results inside the cohort
        result = batch(str(workflow), str(cohort), "--out", str(out), "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert sorted(r["patient_id"] for r in report["rows"]) == ["HYG-A", "HYG-B"]
        assert all(r["series"] == 1 and r["files"] == 4 for r in report["rows"])
        assert report["refused_files"] == []  # not the store, the CSV or step.log
    assert not list((out / ".rtauto" / "quarantine").glob("*.bin"))


def test_a_second_batch_on_the_same_output_folder_is_refused(tmp_path: Path) -> None:
    import fcntl

    write_ct_series(tmp_path / "cohort" / "a", rows=16, cols=16, slices=3)
    workflow = tmp_path / "body.yaml"
    workflow.write_text(BODY_ONLY)
    out = tmp_path / "out"
    (out / ".rtauto").mkdir(parents=True)
    with open(out / ".rtauto" / "batch.lock", "w") as held:  # a batch running there
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        refused = batch(str(workflow), str(tmp_path / "cohort"), "--out", str(out))
    assert refused.returncode == 1
    assert "another rtauto batch (pid 4242) is running with this output folder" in refused.stderr
    assert not (out / "runs").exists()
    assert batch(str(workflow), str(tmp_path / "cohort"), "--out", str(out)).returncode == 0


def test_a_study_keeps_its_case_name_when_the_cohort_grows(tmp_path: Path) -> None:
    workflow = tmp_path / "body.yaml"
    workflow.write_text(BODY_ONLY)
    cohort, out = tmp_path / "cohort", tmp_path / "out"

    def add(study_uid: str) -> None:
        write_ct_series(
            cohort / study_uid,
            rows=16,
            cols=16,
            slices=3,
            patient_id="P",
            study_instance_uid=study_uid,
        )

    def cases() -> dict[str, str]:
        result = batch(str(workflow), str(cohort), "--out", str(out), "--json")
        assert result.returncode == 0, result.stderr
        return {r["study_instance_uid"]: r["case"] for r in json.loads(result.stdout)["rows"]}

    add("1.2.826.0.1.3680043.10.7777.1.1")
    add("1.2.826.0.1.3680043.10.7777.2.1")  # the same last digits: named apart by order
    before = cases()
    assert sorted(before.values()) == ["P_1", "P_1-2"]
    add("1.2.826.0.1.3680043.10.7777.0.1")  # sorts first, and would have taken "P_1"
    after = cases()
    assert {uid: after[uid] for uid in before} == before
    assert after["1.2.826.0.1.3680043.10.7777.0.1"] == "P_1-3"


SEGMENT = """\
name: cohort-model
trigger: {modality: CT}
steps:
  - id: contour
    uses: autocontour.segment
    with: {model: demo-thorax@latest, structures: [SpinalCord]}
"""


def test_a_new_model_version_is_a_new_run_and_a_missing_model_stops_the_batch(
    tmp_path: Path,
) -> None:
    import shutil

    shipped = Path(__file__).resolve().parents[2] / "models" / "demo-thorax" / "1"
    models = tmp_path / "models"
    shutil.copytree(shipped, models / "demo-thorax" / "1")
    write_ct_series(tmp_path / "cohort" / "a", rows=32, cols=32, slices=8, patient_id="M")
    workflow = tmp_path / "contour.yaml"
    workflow.write_text(SEGMENT)
    out = tmp_path / "out"
    args = [str(workflow), str(tmp_path / "cohort"), "--out", str(out), "--models", str(models)]

    first = json.loads(batch(*args, "--json").stdout)
    assert first["resources"]["contour"]["model"] == "demo-thorax@1"
    # version 2 dropped in: demo-thorax@latest now means it, so this is a new run
    card = yaml.safe_load((models / "demo-thorax" / "1" / "model.yaml").read_text())
    (models / "demo-thorax" / "2").mkdir()
    shutil.copy(models / "demo-thorax" / "1" / "model.onnx", models / "demo-thorax" / "2")
    card["version"] = "2"
    (models / "demo-thorax" / "2" / "model.yaml").write_text(yaml.safe_dump(card))
    second = json.loads(batch(*args, "--json").stdout)
    assert second["resources"]["contour"]["model"] == "demo-thorax@2"
    assert [r["resumed"] for r in second["rows"]] == [""]  # ran, not "done before"
    assert second["rows"][0]["job"] != first["rows"][0]["job"]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2
    with (out / "runs" / runs[0] / "batch.csv").open() as handle:
        [row] = list(csv.DictReader(handle))
    assert row["contour:model"] in ("demo-thorax@1", "demo-thorax@2")
    assert len(row["contour:model_card_sha256"]) == 64

    # a model that is not there stops the batch before any case runs
    missing = batch(*args[:-2], "--models", str(tmp_path / "nowhere"), "--json")
    assert missing.returncode == 1
    assert "step 'contour' (autocontour.segment): model demo-thorax@latest" in missing.stderr
    assert "that folder does not exist" in missing.stderr
    assert len(list((out / "runs").iterdir())) == 2


def test_a_study_the_trigger_does_not_take_is_skipped_not_failed(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    write_ct_series(cohort / "ct", rows=16, cols=16, slices=3, patient_id="TRIG-CT")
    mr = write_ct_series(cohort / "mr", rows=16, cols=16, slices=3, patient_id="TRIG-MR")
    for path in mr.files:  # an MR-only study
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    workflow = tmp_path / "body.yaml"
    workflow.write_text(BODY_ONLY)
    result = batch(str(workflow), str(cohort), "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr  # nothing failed
    report = json.loads(result.stdout)
    rows = {r["patient_id"]: r for r in report["rows"]}
    assert rows["TRIG-CT"]["status"] == "ok"
    assert rows["TRIG-MR"]["status"] == "skipped" and rows["TRIG-MR"]["job"] == ""
    assert (
        "no series matches the workflow's trigger (the study holds MR)" in rows["TRIG-MR"]["error"]
    )
    assert (report["ok"], report["failed"], report["skipped"]) == (1, 0, 1)


def test_ctrl_c_says_how_to_resume(tmp_path: Path) -> None:
    args, env, out = _slow_batch(
        tmp_path, "  - id: wait\n    uses: site.sleep\n    with: {seconds: 30}\n", cases=1
    )
    process = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    store_path = out / ".rtauto" / "rtauto.db"

    def running() -> bool:
        try:
            with sqlite3.connect(store_path) as db:
                return bool(db.execute("SELECT 1 FROM jobs WHERE status = 'running'").fetchall())
        except sqlite3.OperationalError:
            return False

    try:
        deadline = time.monotonic() + 300
        while not (store_path.exists() and running()) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)  # Ctrl-C (its workers ignore SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert "interrupted; the same command resumes it" in err and "Traceback" not in err


def _referenced_images(rtstruct_path: str) -> int:
    ds = pydicom.dcmread(rtstruct_path)
    study = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    return len(study.RTReferencedSeriesSequence[0].ContourImageSequence)


def test_a_case_whose_files_changed_runs_again_on_exactly_the_files_it_holds_now(
    tmp_path: Path,
) -> None:
    workflow = tmp_path / "body.yaml"
    workflow.write_text(BODY_ONLY)
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    series = write_ct_series(cohort / "study", rows=32, cols=32, slices=5)

    def run() -> dict:
        result = batch(str(workflow), str(cohort), "--out", str(out), "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        [row] = json.loads(result.stdout)["rows"]
        return row

    first = run()
    assert first["status"] == "ok" and first["files"] == 5
    [rtstruct] = [a for a in first["artifacts"] if Path(a).name.startswith("RS.")]
    assert _referenced_images(rtstruct) == 5

    series.files[-1].unlink()  # a slice taken out of the cohort
    second = run()
    assert second["status"] == "ok" and second["resumed"] == "" and second["files"] == 4
    assert Path(second["outputs"]).name == f"{first['case']}.rerun-1"
    [rtstruct] = [a for a in second["artifacts"] if Path(a).name.startswith("RS.")]
    assert _referenced_images(rtstruct) == 4  # not 5: the spool's earlier copy is not read

    third = run()  # nothing changed since: resumed, not run again
    assert third["resumed"] == "done" and third["job"] == second["job"]


def test_rtauto_run_into_a_used_out_folder_reads_only_its_own_inputs(tmp_path: Path) -> None:
    workflow = tmp_path / "body.yaml"
    workflow.write_text(BODY_ONLY)
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=5)
    out = tmp_path / "out"

    def run(*files: Path) -> dict:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "rtauto.cli",
                "run",
                str(workflow),
                *map(str, files),
                "--out",
                str(out),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    run(*series.files)
    summary = run(*series.files[:4])
    [step] = summary["steps"]
    [rtstruct] = [a for a in step["artifacts"] if Path(a).name.startswith("RS.")]
    assert _referenced_images(rtstruct) == 4
