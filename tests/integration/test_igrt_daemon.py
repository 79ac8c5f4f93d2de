"""IGRT through the daemon: the planning CT arrives first; when the image of the day arrives,
workflows/igrt-rigid.yaml finds the planning CT in the store, registers, and routes the REG."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtauto.testing import ReceivingSCP, ct_phantom, storescu, wait_until, write_ct_series

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("quality", ["passed", "failed"])
def test_daily_image_is_registered_to_the_planning_ct_held_in_the_store(
    daemon_factory, tmp_path, quality
):
    """A 5 mm shift is beyond the action level (an alert), but a registration whose quality
    checks passed still goes to the TPS, after the image it references; one that failed a
    check (here an impossible inverse-consistency limit) goes nowhere but the alerts."""
    pytest.importorskip(
        "rtauto_image_guidance", reason="the image_guidance plugin is not installed"
    )
    hu = ct_phantom(96, 96, 48, (2.5, 2.5, 2.5), seed=3)
    # an off-centre block gives the phantom no symmetry along any axis
    hu[10:20, 30:40, 55:70] = 900.0
    planning = write_ct_series(
        tmp_path / "planning",
        hu=hu,
        spacing=(2.5, 2.5, 2.5),
        origin=(-120.0, -120.0, -60.0),
        patient_id="IGRT-1",
        series_description="Planning CT",
    )
    # the same anatomy 5 mm further left (+x, LPS) on the day, in its own Frame of Reference
    daily = write_ct_series(
        tmp_path / "daily",
        hu=hu + np.random.default_rng(7).normal(0, 15, hu.shape).astype(np.float32),
        spacing=(2.5, 2.5, 2.5),
        origin=(-115.0, -120.0, -60.0),
        patient_id="IGRT-1",
        series_description="CBCT daily",
    )
    alerts = tmp_path / "alerts"
    results = tmp_path / "results"
    alerts.mkdir()
    results.mkdir()
    text = (ROOT / "workflows" / "igrt-rigid.yaml").read_text()
    text = text.replace("series_quiet: 10s", "series_quiet: 1s")
    if quality == "failed":
        text = text.replace(
            "outputs: [reg, report]",
            "outputs: [reg, report]\n      quality: {max_inverse_consistency_mm: 1.0e-9}",
        )
    text = text.replace("{path: igrt-results,", f"{{path: {results},")
    text = text.replace("{path: igrt-alerts,", f"{{path: {alerts},")
    with ReceivingSCP(tmp_path / "tps", ae_title="TPS") as tps:
        daemon = daemon_factory(
            {"destinations": {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.port}}}
        )
        daemon.add_workflow("igrt", text)
        daemon.start()
        storescu(daemon.port, planning.files)
        time.sleep(3)  # the planning CT is in the store (it matches no workflow)
        assert not daemon.jobs()
        storescu(daemon.port, daily.files)
        [job] = daemon.wait_for_jobs("igrt-rigid", timeout=300)
        assert job.status == "ok", daemon.log()[-4000:]
        if quality == "passed":
            wait_until(lambda: len(tps.received) == len(daily.files) + 1, timeout=30)
        received = list(tps.received)

    store = daemon.store()
    steps = {s.step_id: s for s in store.steps_of(job.id)}
    outputs = steps["register"].outputs
    shift = outputs["couch_shift"]
    magnitude = np.hypot(
        np.hypot(shift["lateral_mm"], shift["longitudinal_mm"]), shift["vertical_mm"]
    )
    assert abs(magnitude - 5.0) < 0.5, shift
    assert abs(shift["lateral_mm"]) == pytest.approx(5.0, abs=0.5)
    assert outputs["outcome"] == "flag"  # 5 mm is beyond the 3 mm action level
    assert steps["alert"].status == "ok"
    assert any(alerts.iterdir())
    [reg_artifact] = [a for a in store.artifacts_of(job.id, "register") if a.kind == "REG"]
    reg = pydicom.dcmread(reg_artifact.path)
    if quality == "failed":
        assert outputs["quality_ok"] is False
        assert any("inverse consistency" in f for f in outputs["flags"])
        assert steps["send-image"].status == steps["send"].status == "skipped"
        assert received == []
        return
    assert outputs["quality_ok"] is True
    # the image of the day first, then the REG that references it
    assert sorted(received[:-1]) == sorted(daily.sop_instance_uids)
    assert received[-1] == reg.SOPInstanceUID
    referenced = {
        s.SeriesInstanceUID
        for study in getattr(reg, "StudiesContainingOtherReferencedInstancesSequence", [])
        for s in study.ReferencedSeriesSequence
    } | {s.SeriesInstanceUID for s in getattr(reg, "ReferencedSeriesSequence", [])}
    assert {planning.series_instance_uid, daily.series_instance_uid} <= referenced
