"""The daemon as a planning server runs it: real storescu in, real Orthanc / SCP out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from rtauto.testing import ReceivingSCP, require_tool, storescu, wait_until, write_ct_series

pytestmark = pytest.mark.integration


def forward_workflow(
    name: str, port: int, ae: str, extra_steps: str = "", quiet: str = "2s"
) -> str:
    return f"""\
name: {name}
trigger:
  modality: CT
completion:
  series_quiet: {quiet}
steps:
{extra_steps}  - id: forward
    uses: route.dicom
    with: {{destination: pacs, send: inputs}}
destinations:
  pacs: {{ae_title: {ae}, host: 127.0.0.1, port: {port}}}
"""


def count_workflow(quiet: str, source: str | None = None) -> str:
    """A workflow that runs one no-op step per CT series (the job is what is counted), for
    series from ``source`` (scp or folder) or from both."""
    where = f", source: {source}" if source else ""
    return f"""\
name: count-ct
trigger: {{modality: CT{where}}}
completion: {{series_quiet: {quiet}}}
steps:
  - id: count
    uses: site.sleep
    with: {{seconds: 0}}
"""


def test_push_runs_the_workflow_once_and_delivers_to_orthanc(daemon_factory, orthanc, tmp_path):
    series = write_ct_series(tmp_path / "ct", rows=96, cols=96, slices=110)
    daemon = daemon_factory()
    daemon.add_workflow("forward", forward_workflow("forward-ct", orthanc.dicom_port, orthanc.aet))
    daemon.start()

    storescu(daemon.port, series.files)
    jobs = daemon.wait_for_jobs("forward-ct")
    time.sleep(3)  # longer than the quiet period: a second look must not create another job
    jobs = daemon.jobs("forward-ct")
    assert len(jobs) == 1, [j.id for j in jobs]
    assert jobs[0].status == "ok", daemon.log()[-4000:]

    arrived = sorted(orthanc.sop_instance_uids())
    assert arrived == sorted(series.sop_instance_uids)
    by_uid = {}
    for oid in orthanc.instances():
        ds = orthanc.dataset(oid)
        by_uid[ds.SOPInstanceUID] = ds
    for path in series.files[::10]:
        sent = pydicom.dcmread(path)
        got = by_uid[sent.SOPInstanceUID]
        assert got.PixelData == sent.PixelData
        assert got.SeriesInstanceUID == sent.SeriesInstanceUID
        assert list(got.ImagePositionPatient) == list(sent.ImagePositionPatient)


def test_folder_drop_written_slowly_is_processed_once(daemon_factory, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    daemon = daemon_factory({"watch": [{"path": str(drop), "settle_seconds": 1.0}]})
    daemon.add_workflow(
        "count",
        count_workflow("2s", source="folder"),
    )
    daemon.start()
    series = write_ct_series(tmp_path / "ct", rows=64, cols=64, slices=12)
    for path in series.files:
        data = path.read_bytes()
        target = drop / path.name
        with open(target, "wb") as fh:  # written in pieces, slower than a network copy
            for start in range(0, len(data), len(data) // 3 + 1):
                fh.write(data[start : start + len(data) // 3 + 1])
                fh.flush()
                time.sleep(0.15)
    jobs = daemon.wait_for_jobs("count-ct")
    time.sleep(3)
    jobs = daemon.jobs("count-ct")
    assert len(jobs) == 1
    store = daemon.store()
    steps = store.steps_of(jobs[0].id)
    assert steps[0].outputs["instances"] == 12
    assert store.counts()["instances"] == 12
    assert not any((daemon.home / "quarantine").iterdir())


def _acked_files(lines: list[str]) -> list[str]:
    """Files storescu -v reports as sent and answered with a success status."""
    acked, current = [], None
    for line in lines:
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response" in line and "Success" in line and current:
            acked.append(current)
            current = None
    return acked


def test_kill9_during_a_push_loses_no_acknowledged_instance(daemon_factory, tmp_path):
    require_tool("storescu")
    series = write_ct_series(tmp_path / "ct", rows=128, cols=128, slices=150)
    daemon = daemon_factory()
    daemon.add_workflow(
        "count",
        count_workflow("5s"),  # the re-send below starts well within it after the restart
    )
    daemon.start()
    proc = subprocess.Popen(
        [
            "storescu",
            "-v",
            "-aec",
            "RTAUTO",
            "127.0.0.1",
            str(daemon.port),
            *map(str, series.files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: len(_acked_files(lines)) >= 40, timeout=120, interval=0.01)
    daemon.kill9()
    proc.wait(timeout=60)
    reader.join(timeout=10)
    acked = _acked_files(lines)
    assert 40 <= len(acked) < len(series.files), "the push should have been cut short"

    daemon.start()
    store = daemon.store()
    acked_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in acked}
    indexed = {i.sop_uid for i in store.instances_of_series(series.series_instance_uid)}
    assert acked_uids <= indexed
    for inst in store.instances_of_series(series.series_instance_uid):
        on_disk = daemon.home / "spool" / inst.path
        assert on_disk.is_file()
        assert pydicom.dcmread(on_disk).SOPInstanceUID == inst.sop_uid

    # the modality sends the series again, as it would after a failed association
    storescu(daemon.port, series.files)
    jobs = daemon.wait_for_jobs("count-ct")
    time.sleep(6)
    jobs = daemon.jobs("count-ct")
    assert len(jobs) == 1
    assert jobs[0].status == "ok"
    assert store.counts()["instances"] == len(series.files)
    # one job, on the whole series: the restart gave the sender a full quiet period
    assert sorted(jobs[0].input_instances) == sorted(series.sop_instance_uids)


def test_a_series_cut_off_by_a_crash_waits_afresh_and_runs_again_once_complete(
    daemon_factory, tmp_path
):
    """The time the daemon was down is not quiet time; a series that grows after its job was
    made runs again, on the whole series, with a warning; a plain re-send changes nothing."""
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=30)
    daemon = daemon_factory()
    daemon.add_workflow("count", count_workflow("3s"))
    daemon.start()
    storescu(daemon.port, series.files[:20])  # the sender is cut off after 20 slices ...
    daemon.kill9()  # ... by a crash of the daemon, before the series was quiet
    time.sleep(4)  # down for longer than the quiet period
    daemon.start()
    ready = json.loads((daemon.home / "daemon.json").read_text())["started_at"]
    [first] = daemon.wait_for_jobs("count-ct")
    # a full quiet period after the daemon was ready to receive again, not at once
    assert first.created_at >= ready + 3 - 0.05, "the downtime counted as quiet"
    assert len(first.input_instances) == 20

    storescu(daemon.port, series.files[20:])  # the sender finishes the series later
    jobs = daemon.wait_for_jobs("count-ct", count=2)
    [second] = [j for j in jobs if j.id != first.id]
    assert sorted(second.input_instances) == sorted(series.sop_instance_uids)
    assert second.status == "ok"
    assert "runs again on the whole series" in daemon.log()
    store = daemon.store()
    try:
        [event] = store.audit_events("series.grown")
        assert event.data["earlier_job"] == first.id and event.data["job"] == second.id
    finally:
        store.close()

    storescu(daemon.port, series.files)  # a re-send of what is held: no third job
    time.sleep(5)
    assert len(daemon.jobs("count-ct")) == 2


def test_kill9_during_a_job_resumes_without_duplicates(daemon_factory, tmp_path):
    series = write_ct_series(tmp_path / "ct", rows=64, cols=64, slices=20)
    with ReceivingSCP(tmp_path / "received", ae_title="DEST") as dest:
        daemon = daemon_factory()
        slow = """\
  - id: wait
    uses: site.sleep
    with: {seconds: 6}
"""
        text = forward_workflow("resume-ct", dest.port, "DEST", extra_steps=slow)
        text = text.replace("    uses: route.dicom\n", "    uses: route.dicom\n    needs: [wait]\n")
        daemon.add_workflow("resume", text)
        daemon.start()
        storescu(daemon.port, series.files)

        def wait_running() -> bool:
            store = daemon.store()
            try:
                jobs = daemon.jobs("resume-ct")
                return bool(jobs) and any(
                    s.step_id == "wait" and s.status == "running"
                    for s in store.steps_of(jobs[0].id)
                )
            finally:
                store.close()

        wait_until(wait_running, timeout=60)
        daemon.kill9()
        daemon.start()
        jobs = daemon.wait_for_jobs("resume-ct", timeout=120)
        time.sleep(3)
        jobs = daemon.jobs("resume-ct")
        assert len(jobs) == 1
        assert jobs[0].status == "ok", daemon.log()[-4000:]
        store = daemon.store()
        steps = {s.step_id: s for s in store.steps_of(jobs[0].id)}
        assert steps["wait"].attempts == 2  # interrupted once, run again
        assert steps["forward"].attempts == 1
        assert sorted(dest.received) == sorted(series.sop_instance_uids)  # each exactly once
        deliveries = store.deliveries_of(jobs[0].id)
        assert {d.status for d in deliveries} == {"delivered"}
        assert len(deliveries) == len(series.files)


def _write_bad_files(folder: Path, template: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    bad = {}
    bad["text"] = folder / "notes.txt"
    bad["text"].write_text("this is not a DICOM file\n")
    data = template.read_bytes()
    bad["truncated"] = folder / "truncated.dcm"
    bad["truncated"].write_bytes(data[: len(data) // 2])
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = "1.2.3/../../etc"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../etc"
    bad["traversal"] = folder / "traversal.dcm"
    with pydicom.config.disable_value_validation():
        ds.save_as(bad["traversal"], enforce_file_format=True)
    ds = pydicom.dcmread(template)
    del ds.SOPInstanceUID
    bad["no_uid"] = folder / "no-uid.dcm"
    ds.save_as(bad["no_uid"], enforce_file_format=False)
    return bad


def test_bad_input_is_quarantined_and_the_daemon_keeps_answering(daemon_factory, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    good = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=2)
    daemon = daemon_factory({"watch": [{"path": str(drop), "settle_seconds": 0.5}]})
    daemon.add_workflow("fwd", forward_workflow("bad-input", 9, "NOBODY"))
    daemon.start()
    staging = tmp_path / "staging"
    bad = _write_bad_files(staging, good.files[0])
    for path in bad.values():
        shutil.copy(path, drop / path.name)
    quarantine = daemon.home / "quarantine"

    def reasons() -> list[str]:
        return [p.read_text() for p in quarantine.glob("*.json")]  # one reason file each

    found = wait_until(lambda: len(reasons()) >= 4 and reasons(), timeout=60)
    text = "\n".join(found).lower()
    assert "sopinstanceuid" in text or "sop instance uid" in text
    assert "truncat" in text
    assert "not" in text and "dicom" in text
    assert daemon.echo()
    # the same traversal file over the network: refused with a failure status, daemon answers
    result = storescu(daemon.port, [bad["traversal"]], check=False)
    assert daemon.echo()
    assert daemon.store().counts()["instances"] == 0
    assert not list((daemon.home / "spool").glob("*/*/*.dcm")), "nothing bad reached the spool"
    assert result is not None
    assert not daemon.jobs()


def test_failing_plugins_fail_their_step_not_the_daemon(daemon_factory, tmp_path):
    daemon = daemon_factory(
        {"plugin_modules": {"site": "rtauto_site_steps", "broken": "rtauto_site_broken"}}
    )
    daemon.add_workflow(
        "faults",
        """\
name: faults
trigger: {modality: CT}
completion: {series_quiet: 1s}
steps:
  - id: raises
    uses: site.raise
  - id: hangs
    uses: site.hang
    timeout: 3s
    retry: {max_attempts: 1}
  - id: fine
    uses: site.sleep
    with: {seconds: 0}
""",
    )
    daemon.start()
    assert "broken" in daemon.log() and "rtauto_module_that_does_not_exist" in daemon.log()
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=3)
    storescu(daemon.port, series.files)
    jobs = daemon.wait_for_jobs("faults", timeout=120)
    assert jobs[0].status == "fail"
    steps = {s.step_id: s for s in daemon.store().steps_of(jobs[0].id)}
    assert steps["raises"].status == "fail"
    assert "ValueError: this step always raises" in steps["raises"].error
    assert steps["hangs"].status == "fail"
    assert "timed out after 3 s" in steps["hangs"].error
    assert steps["fine"].status == "ok"
    assert daemon.echo()
    # and it still runs the next job
    storescu(daemon.port, write_ct_series(tmp_path / "ct2", rows=32, cols=32, slices=2).files)
    daemon.wait_for_jobs("faults", count=2, timeout=120)
    assert daemon.process.poll() is None


def test_bad_hot_edit_keeps_the_last_good_workflow(daemon_factory, tmp_path):
    daemon = daemon_factory()
    good = """\
name: hot
trigger: {modality: CT}
completion: {series_quiet: 1s}
steps:
  - id: count
    uses: site.sleep
    with: {seconds: 0}
"""
    path = daemon.add_workflow("hot", good)
    daemon.start()
    storescu(daemon.port, write_ct_series(tmp_path / "a", rows=32, cols=32, slices=2).files)
    first = daemon.wait_for_jobs("hot")[0]

    daemon.add_workflow("hot", good.replace("with: {seconds: 0}", "with: {seconds: [0"))
    wait_until(lambda: f"{path.name}:" in daemon.log(), timeout=30)
    storescu(daemon.port, write_ct_series(tmp_path / "b", rows=32, cols=32, slices=2).files)
    jobs = daemon.wait_for_jobs("hot", count=2)
    assert {j.workflow_hash for j in jobs} == {first.workflow_hash}
    assert all(j.status == "ok" for j in jobs)

    daemon.add_workflow("hot", good.replace("seconds: 0", "seconds: 0.1"))
    time.sleep(2.5)  # the library rescans every second
    storescu(daemon.port, write_ct_series(tmp_path / "c", rows=32, cols=32, slices=2).files)
    jobs = daemon.wait_for_jobs("hot", count=3)
    hashes = [j.workflow_hash for j in sorted(jobs, key=lambda j: j.created_at)]
    assert hashes[0] == hashes[1] != hashes[2]
    assert os.path.exists(path)

    # broken while the daemon is stopped: after the start the last good version still runs
    daemon.stop()
    daemon.add_workflow("hot", good.replace("with: {seconds: 0}", "with: {seconds: [0"))
    daemon.start()
    assert "runs its last good version" in daemon.log()
    storescu(daemon.port, write_ct_series(tmp_path / "d", rows=32, cols=32, slices=2).files)
    jobs = daemon.wait_for_jobs("hot", count=4)
    last = max(jobs, key=lambda j: j.created_at)
    assert last.workflow_hash == hashes[2] and last.status == "ok"


def test_dashboard_api_and_metrics(daemon_factory, tmp_path):
    import json as _json
    import urllib.request

    from rtauto.testing import free_port

    web_port = free_port()
    daemon = daemon_factory({"web": {"enabled": True, "port": web_port}})
    daemon.add_workflow(
        "count",
        count_workflow("1s"),
    )
    daemon.start()
    storescu(daemon.port, write_ct_series(tmp_path / "ct", rows=16, cols=16, slices=3).files)
    [job] = daemon.wait_for_jobs("count-ct")

    def get(path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}{path}", timeout=10) as r:
            return r.read().decode()

    jobs = _json.loads(get("/api/jobs"))
    assert [j["job"] for j in jobs] == [job.id]
    assert _json.loads(get(f"/api/jobs/{job.id[:8]}"))["steps"][0]["outcome"] == "ok"
    metrics = get("/metrics")
    assert "rtauto_instances_stored 3" in metrics
    # counted by the receiving processes (two here), added up by the daemon
    assert 'rtauto_scp_associations_total{result="accepted"} 1' in metrics
    assert 'rtauto_scp_instances_total{outcome="stored"} 3' in metrics
    assert 'rtauto_scp_instances_total{outcome="refused"} 0' in metrics
    assert 'rtauto_jobs{status="ok"} 1' in metrics
    assert 'rtauto_steps{uses="site.sleep",status="ok"} 1' in metrics
    assert "rtauto_up 1" in metrics
    assert "rtauto_ingest_paused 0" in metrics
    status = _json.loads(get("/api/status"))
    free = shutil.disk_usage(daemon.home).free
    assert abs(status["home_free_bytes"] - free) < 0.05 * status["home_total_bytes"]
    [free_line] = [line for line in metrics.splitlines() if line.startswith("rtauto_home_free")]
    assert abs(float(free_line.split()[1]) - free) < 0.05 * status["home_total_bytes"]
    page = get("/")
    assert "count-ct" in page and job.id[:12] in page and "free in home" in page
    assert _json.loads(get("/api/workflows"))["workflows"][0]["name"] == "count-ct"
