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


def test_daily_image_is_registered_to_the_planning_ct_held_in_the_store(daemon_factory, tmp_path):
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
        wait_until(lambda: tps.received, timeout=30)
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
    [reg_uid] = received
    [reg_artifact] = [a for a in store.artifacts_of(job.id, "register") if a.kind == "REG"]
    reg = pydicom.dcmread(reg_artifact.path)
    assert reg.SOPInstanceUID == reg_uid
    referenced = {
        s.SeriesInstanceUID
        for study in getattr(reg, "StudiesContainingOtherReferencedInstancesSequence", [])
        for s in study.ReferencedSeriesSequence
    } | {s.SeriesInstanceUID for s in getattr(reg, "ReferencedSeriesSequence", [])}
    assert {planning.series_instance_uid, daily.series_instance_uid} <= referenced
