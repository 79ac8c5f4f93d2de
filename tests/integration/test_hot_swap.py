"""Hot swap with the daemon running: a new model version and an edited workflow reach the next
job; a job already running finishes on the version it started with."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from rtauto.testing import storescu, wait_until, write_ct_series

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "models" / "demo-thorax" / "1"

WORKFLOW = """\
name: swap
trigger: {{modality: CT}}
completion: {{series_quiet: 1s}}
steps:
  - id: wait
    uses: site.sleep
    with: {{seconds: {wait}}}
  - id: contour
    uses: autocontour.segment
    needs: [wait]
    with: {{model: "demo-thorax@{version}", output: rtstruct}}
"""


def test_new_model_version_and_workflow_edit_reach_the_next_job(daemon_factory, tmp_path):
    if not (DEMO_MODEL / "model.yaml").exists():
        pytest.skip("the demo model is not in models/")
    models = tmp_path / "models"
    shutil.copytree(DEMO_MODEL, models / "demo-thorax" / "1")
    daemon = daemon_factory({"models_dir": str(models)})
    workflow = daemon.add_workflow("swap", WORKFLOW.format(wait=8, version=1))
    daemon.start()
    if "autocontour.segment" not in daemon.log() and "autocontour" in daemon.log().lower():
        pytest.skip("the autocontour plugin is not installed")

    # job A starts on version 1 and is still waiting when the swap happens
    storescu(daemon.port, write_ct_series(tmp_path / "a", slices=24).files)

    def running() -> bool:
        jobs = daemon.jobs("swap")
        return bool(jobs) and jobs[0].status == "running"

    wait_until(running, timeout=60)
    [job_a] = daemon.jobs("swap")

    # drop version 2 (a new card: its own description, so its own card hash) and edit the
    # workflow to use it
    card = yaml.safe_load((DEMO_MODEL / "model.yaml").read_text())
    card["version"] = "2"
    card["description"] = card["description"] + " Version 2 of the demo."
    staging = tmp_path / "v2"
    shutil.copytree(DEMO_MODEL, staging)
    (staging / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    staging.rename(models / "demo-thorax" / "2")
    daemon.add_workflow("swap", WORKFLOW.format(wait=0, version=2))
    time.sleep(2.5)  # the workflow library rescans every second
    assert workflow.exists()

    storescu(daemon.port, write_ct_series(tmp_path / "b", slices=24).files)
    jobs = daemon.wait_for_jobs("swap", count=2, timeout=300)
    by_id = {j.id: j for j in daemon.jobs("swap")}
    assert len(by_id) == 2, [(j.id, j.series_uid, j.status) for j in by_id.values()]
    job_b = next(j for j in jobs if j.id != job_a.id)
    store = daemon.store()
    outputs = {j: {s.step_id: s for s in store.steps_of(j)}["contour"].outputs for j in by_id}
    assert by_id[job_a.id].status == "ok", daemon.log()[-3000:]
    assert by_id[job_b.id].status == "ok", daemon.log()[-3000:]
    assert outputs[job_a.id]["model"] == "demo-thorax@1"
    assert outputs[job_b.id]["model"] == "demo-thorax@2"
    assert outputs[job_a.id]["model_card_sha256"] != outputs[job_b.id]["model_card_sha256"]
    assert by_id[job_a.id].workflow_hash != by_id[job_b.id].workflow_hash
    # the card hash is recorded with the artifact too
    [artifact_b] = store.artifacts_of(job_b.id, "contour")
    assert outputs[job_b.id]["model_card_sha256"] in str(artifact_b.provenance)
