"""The command line: `rtauto models`, and `rtauto run workflows/autocontour-ct.yaml` on the
DCPT head phantom with the results routed to a real DICOM node and a folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import yaml

from rtauto.dicom.geometry import load_series
from rtauto.dicom.rtstruct import read_rtstruct
from rtauto.testing import ReceivingSCP

ROOT = Path(__file__).resolve().parents[3]


def rtauto(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rtauto.cli", *args],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


def test_models_lists_cards_and_refuses_a_wrong_sha256(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "demo-thorax", models / "demo-thorax")
    bad = models / "demo-thorax" / "2"
    shutil.copytree(models / "demo-thorax" / "1", bad)
    card = yaml.safe_load((bad / "model.yaml").read_text())
    card["version"] = "2"
    card["sha256"] = "0" * 64
    (bad / "model.yaml").write_text(yaml.safe_dump(card))
    result = rtauto("models", "--models", str(models), "--json")
    assert result.returncode == 1, result.stderr
    checks = {c["model"]: c for c in json.loads(result.stdout)}
    assert checks["demo-thorax@1"]["ok"]
    assert not checks["demo-thorax@2"]["ok"]
    assert "sha256" in checks["demo-thorax@2"]["reason"]


def test_run_on_the_head_phantom_routes_rtstructs_that_reference_the_ct(
    test_data: Path, tmp_path: Path
) -> None:
    study = test_data / "dcpt-headphantom" / "study"
    results = tmp_path / "results"
    results.mkdir()
    with ReceivingSCP(tmp_path / "tps", ae_title="TPS") as tps:
        config = tmp_path / "rtauto.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "home": str(tmp_path / "home"),
                    "models_dir": str(ROOT / "models"),
                    # the site's nodes for the workflow's destination names
                    "destinations": {
                        "tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.port},
                        "results": {"type": "folder", "path": str(results)},
                    },
                }
            )
        )
        out = tmp_path / "out"
        result = rtauto(
            "run",
            str(ROOT / "workflows" / "autocontour-ct.yaml"),
            str(study),
            "--out",
            str(out),
            "--config",
            str(config),
            "--json",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads(result.stdout)
        received = sorted(tps.received)

    steps = {s["id"]: s for s in summary["steps"]}
    assert {k: s["outcome"] for k, s in steps.items()} == {
        "body": "ok",
        "contour": "ok",
        "send": "ok",
        "save": "ok",
    }
    assert steps["contour"]["outputs"]["model_card_sha256"]
    [body_path] = steps["body"]["artifacts"]
    body = pydicom.dcmread(body_path)
    assert len(received) == 2 and body.SOPInstanceUID in received
    [contour_path] = steps["contour"]["artifacts"]
    contour = pydicom.dcmread(contour_path, stop_before_pixels=True)
    # two RTSTRUCT series in one study: each step numbers its own
    assert (body.SeriesNumber, contour.SeriesNumber) == (9001, 9011)
    assert body.SeriesInstanceUID != contour.SeriesInstanceUID
    assert len(list(results.iterdir())) == 2

    ct_files = sorted(study.glob("CT*.dcm"))
    volume = load_series(ct_files)
    frame = body.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == volume.frame_of_reference_uid
    images = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence
    assert sorted(i.ReferencedSOPInstanceUID for i in images) == sorted(volume.sop_instance_uids)
    assert len(images) == 177

    [ours] = read_rtstruct(body_path, volume)[0]
    [clinical] = read_rtstruct(next(study.glob("RS*.dcm")), volume, names=["BODY"])[0]
    dice = 2.0 * float((ours.mask & clinical.mask).sum()) / (ours.mask.sum() + clinical.mask.sum())
    print(f"rtauto run on the DCPT head phantom: BODY Dice {dice:.4f}")
    assert dice >= 0.92


def test_evaluation_workflow_reports_dice_against_the_clinical_contours(
    tmp_path: Path, test_data: Path
) -> None:
    """`rtauto run workflows/autocontour-evaluate.yaml` on the head phantom (CT, its clinical
    RTSTRUCT and plan): the threshold BODY reaches Dice >= 0.92 against the clinical BODY,
    the thorax model's structures have no counterpart in a head and are listed as such."""
    study = test_data / "dcpt-headphantom" / "study"
    out = tmp_path / "out"
    result = rtauto(
        "run",
        str(ROOT / "workflows" / "autocontour-evaluate.yaml"),
        str(study),
        "--out",
        str(out),
        "--models",
        str(ROOT / "models"),
        "--json",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = {s["id"]: s for s in json.loads(result.stdout)["steps"]}
    assert [s["outcome"] for s in steps.values()] == ["ok", "ok", "ok"]
    compare = steps["compare"]["outputs"]
    body = compare["structures"]["BODY"]
    print(f"autocontour-evaluate on the DCPT head phantom: BODY {body}")
    assert body["reference_roi"] == "BODY" and body["dice"] >= 0.92
    assert compare["metrics"]["BODY.dice"] == body["dice"]
    assert set(compare["unmatched"]) == {"Lung_L", "Lung_R", "SpinalCord"}
    [report] = steps["compare"]["artifacts"]
    assert json.loads(Path(report).read_text())["structures"]["BODY"] == body
