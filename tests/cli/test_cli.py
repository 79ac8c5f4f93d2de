"""The command line as a user runs it: a subprocess of the installed ``rtauto`` script."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import typer
from typer.testing import CliRunner

from rtauto import hookimpl
from rtauto.cli import add_plugin_commands
from rtauto.config import Settings
from rtauto.engine.engine import Engine
from rtauto.hooks import build_plugin_manager
from rtauto.ingest.assembler import create_job_for
from rtauto.ingest.spool import Spool
from rtauto.store import Store
from rtauto.testing import ReceivingSCP, write_ct_series

RTAUTO = [sys.executable, "-m", "rtauto.cli"]


def rtauto(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RTAUTO, *args], capture_output=True, text=True, cwd=cwd, timeout=600, check=False
    )


GOOD = """\
name: copy-ct
trigger: {modality: CT}
steps:
  - id: copy
    uses: route.folder
    with: {path: %(dest)s, send: inputs}
"""


def test_validate_reports_file_line_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ntrigger: {modality: CT}\nsteps:\n  - id: a\n    uses: route.nothing\n"
        "  - id: b\n    uses: route.folder\n    needs: [zz]\n    with: {path: /tmp}\n"
    )
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("name: x\nsteps: [\n")
    result = rtauto("validate", str(bad), str(syntax))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"{bad}:5:11: ") and "route.nothing" in line for line in lines)
    assert any(line.startswith(f"{bad}:8:") and "zz" in line for line in lines)
    assert any(line.startswith(f"{syntax}:") for line in lines)

    good = tmp_path / "good.yaml"
    good.write_text(GOOD % {"dest": tmp_path})
    ok = rtauto("validate", str(good))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_schema_and_plugins_are_machine_readable(tmp_path):
    workflow_schema = json.loads(rtauto("schema", "workflow").stdout)
    assert "route.folder" in json.dumps(workflow_schema)
    config_schema = json.loads(rtauto("schema", "config").stdout)
    assert "scp" in config_schema["properties"]
    plugins = json.loads(rtauto("plugins", "--json").stdout)
    assert "route.dicom" in plugins["steps"]
    assert {"dicom", "folder"} <= set(plugins["destination_types"])


def test_run_prints_the_job_summary_and_jobs_reads_it_back(tmp_path):
    series = write_ct_series(tmp_path / "ct", rows=16, cols=16, slices=4)
    dest = tmp_path / "dest"
    dest.mkdir()
    workflow = tmp_path / "copy.yaml"
    workflow.write_text(GOOD % {"dest": dest})
    out = tmp_path / "out"
    result = rtauto("run", str(workflow), str(tmp_path / "ct"), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "ok"
    assert summary["steps"][0]["id"] == "copy"
    assert summary["steps"][0]["outcome"] == "ok"
    assert summary["steps"][0]["outputs"]["delivered"] == 4
    assert len(list(dest.iterdir())) == 4
    assert json.loads((out / "job.json").read_text())["job"] == summary["job"]

    listed = json.loads(rtauto("jobs", "--home", str(out / ".rtauto"), "--json").stdout)
    assert [j["job"] for j in listed] == [summary["job"]]
    one = json.loads(
        rtauto("jobs", summary["job"][:10], "--home", str(out / ".rtauto"), "--json").stdout
    )
    assert one["workflow_hash"] == summary["workflow_hash"]
    assert len(one["deliveries"]) == 4
    assert series.series_instance_uid == one["series_instance_uid"]


def test_run_refuses_an_invalid_workflow_with_its_line(tmp_path):
    workflow = tmp_path / "bad.yaml"
    workflow.write_text("name: bad\ntrigger: {modality: CT}\nsteps:\n  - id: a\n    uses: nope.x\n")
    write_ct_series(tmp_path / "ct", rows=8, cols=8, slices=1)
    result = rtauto("run", str(workflow), str(tmp_path / "ct"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert f"{workflow}:5:" in result.stderr


def test_run_stops_reading_below_the_free_space_reserve(tmp_path):
    from rtauto.ingest.spool import free_bytes

    write_ct_series(tmp_path / "ct", rows=8, cols=8, slices=2)
    (tmp_path / "dest").mkdir()
    workflow = tmp_path / "copy.yaml"
    workflow.write_text(GOOD % {"dest": tmp_path / "dest"})
    config = tmp_path / "rtauto.yaml"
    reserve = free_bytes(tmp_path) / 1e6 + 1e6  # more than there is
    config.write_text(f"home: {tmp_path / 'home'}\nmin_free_mb: {reserve:.0f}\n")
    out = tmp_path / "o"
    result = rtauto(
        "run", str(workflow), str(tmp_path / "ct"), "--out", str(out), "--config", str(config)
    )
    assert result.returncode == 1
    assert "rtauto's disk is nearly full" in result.stderr and "min_free_mb" in result.stderr
    assert "were not read" in result.stderr and "Traceback" not in result.stderr
    assert not any((tmp_path / "home" / "quarantine").iterdir())
    assert list((tmp_path / "dest").iterdir()) == []  # no job ran on part of the series


def test_run_set_changes_a_step_param_and_the_recorded_version(tmp_path):
    write_ct_series(tmp_path / "ct", rows=8, cols=8, slices=2)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    workflow = tmp_path / "copy.yaml"
    workflow.write_text(GOOD % {"dest": first})
    out = tmp_path / "out"
    args = ["run", str(workflow), str(tmp_path / "ct"), "--out", str(out), "--json"]
    result = rtauto(*args, "--set", f"copy.path={second}")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert len(list(second.iterdir())) == 2 and not list(first.iterdir())
    assert summary["workflow_hash"] != hashlib.sha256(workflow.read_bytes()).hexdigest()
    refused = rtauto(*args, "--set", "nope.path=/tmp")
    assert refused.returncode == 2 and "no step 'nope'" in refused.stderr
    invalid = rtauto(*args, "--set", "copy.send=everything")
    assert invalid.returncode == 2
    # the problem names the file's own line (the value replaced), then the overrides
    assert invalid.stderr.startswith(f"{workflow}:6:")
    assert "(with --set copy.send=everything)" in invalid.stderr


ROUTED = """\
name: route-ct
trigger: {modality: CT}
steps:
  - id: tps
    uses: route.dicom
    with: {destination: tps, send: inputs}
  - id: share
    uses: route.folder
    with: {path: %(share)s, send: inputs}
destinations:
  tps: {ae_title: TPS, host: 127.0.0.1, port: %(port)d}
"""


def test_run_dry_run_reaches_no_destination_and_shows_what_would_go(tmp_path):
    series = write_ct_series(tmp_path / "ct", rows=16, cols=16, slices=3)
    share = tmp_path / "share"
    share.mkdir()
    with ReceivingSCP(tmp_path / "tps", ae_title="TPS") as tps:
        workflow = tmp_path / "route.yaml"
        workflow.write_text(ROUTED % {"share": share, "port": tps.port})
        out = tmp_path / "dry"
        args = ["run", str(workflow), str(tmp_path / "ct"), "--out", str(out), "--json"]
        result = rtauto(*args, "--dry-run")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["status"] == "ok" and summary["dry_run"] == str(out / "dry-run")
        # nothing reached the DICOM node or the shared folder
        assert tps.received == [] and list(share.iterdir()) == []
        # what each routing step would have sent is under OUT/dry-run/<destination>/
        by_step = {step["id"]: step for step in summary["steps"]}
        assert by_step["tps"]["outputs"]["delivered"] == 3
        assert by_step["tps"]["outputs"]["destination"] == "tps"
        assert by_step["tps"]["summary"].startswith("dry run: 3 item(s) for tps (dicom)")
        copied = {p.name for p in (out / "dry-run" / "tps").rglob("*.dcm")}
        assert copied == {f"CT.{uid}.dcm" for uid in series.sop_instance_uids}
        assert len(list((out / "dry-run" / "folder-share").rglob("*.dcm"))) == 3
        # the job's delivery records name the stand-in folders, so a replay stays dry too
        home = str(out / ".rtauto")
        job = json.loads(rtauto("jobs", summary["job"], "--home", home, "--json").stdout)
        assert {d["destination"] for d in job["deliveries"]} == {
            f"folder:{(out / 'dry-run' / name).resolve()}" for name in ("tps", "folder-share")
        }
        text = rtauto("jobs", summary["job"], "--home", home).stdout  # deliveries shown
        stand_in = (out / "dry-run" / "tps").resolve()
        assert "  deliveries:\n    share -> folder:" in text
        assert f"    tps -> folder:{stand_in}: 3 delivered" in text
        replayed = rtauto("replay", summary["job"], "--home", home)
        assert replayed.returncode == 0, replayed.stderr
        assert tps.received == [] and list(share.iterdir()) == []

        # destinations are checked as in a real run: a folder where a DICOM node is needed
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            workflow.read_text().replace(
                f"{{ae_title: TPS, host: 127.0.0.1, port: {tps.port}}}",
                f"{{type: folder, path: {share}}}",
            )
        )
        args = ["run", str(bad), str(tmp_path / "ct"), "--out", str(tmp_path / "b"), "--json"]
        refused = json.loads(rtauto(*args, "--dry-run").stdout)
        assert refused["status"] == "fail"
        assert "this step needs a 'dicom' destination" in refused["steps"][0]["error"]
        assert list(share.iterdir()) == []

        # the same workflow without --dry-run delivers to both
        real = rtauto("run", str(workflow), str(tmp_path / "ct"), "--out", str(tmp_path / "real"))
        assert real.returncode == 0, real.stderr
        assert sorted(tps.received) == sorted(series.sop_instance_uids)
        assert len(list(share.iterdir())) == 3


def test_serve_refuses_an_invalid_configuration_with_its_line(tmp_path):
    config = tmp_path / "rtauto.yaml"
    config.write_text("home: h\nscp:\n  port: seventy\n")
    result = rtauto("serve", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:3:" in result.stderr and "scp.port" in result.stderr


def test_plugins_add_commands_through_rtauto_add_commands():
    module = types.ModuleType("site_commands")

    @hookimpl
    def rtauto_add_commands(app):
        @app.command("site-hello")
        def hello(name: str = "physics") -> None:
            typer.echo(f"hello {name}")

    module.rtauto_add_commands = rtauto_add_commands
    broken = types.ModuleType("broken_commands")

    @hookimpl
    def rtauto_add_commands_broken(app):
        raise RuntimeError("no licence")

    broken.rtauto_add_commands = rtauto_add_commands_broken
    host = build_plugin_manager(autoload=False, extra_plugins={"site": module, "broken": broken})
    app = typer.Typer()

    @app.command()
    def core() -> None:
        """A core command, still there when a plugin's commands fail."""

    failures = add_plugin_commands(app, host)
    assert failures == ["plugin broken could not add its commands: no licence"]
    result = CliRunner().invoke(app, ["site-hello", "--name", "dosimetry"])
    assert result.exit_code == 0 and "hello dosimetry" in result.output


def daemon_home(tmp_path: Path) -> tuple[Settings, Store, Any, Spool]:
    """A home as the daemon keeps it: settings, job store, plugin host and spool."""
    settings = Settings(home=tmp_path / "home")
    settings.ensure_dirs()
    store = Store(settings.database_url, migrate=True)
    return settings, store, build_plugin_manager(settings), Spool(settings)


def daemon_job(store: Store, settings: Settings, loaded: Any, series: Any, **kwargs: Any) -> Any:
    """The job of a series-scoped workflow on ``series``, as the daemon's assembler makes it."""
    return create_job_for(
        store,
        settings,
        loaded,
        scope="series",
        study_uid=series.study_instance_uid,
        series_uid=series.series_instance_uid,
        input_series=[series.series_instance_uid],
        key_series=[series.series_instance_uid],
        **kwargs,
    )


def run_job(settings: Settings, store: Store, host, job_id: str) -> None:
    """Run one job to its end with the engine the daemon uses."""
    engine = Engine(settings, store, host)
    try:
        engine.run_until_done([job_id])
    finally:
        engine.close()


def test_reading_commands_refuse_a_home_without_a_job_store(tmp_path):
    typo = tmp_path / "typo"
    for args in (["jobs"], ["replay", "0123abcd"], ["resume", "0123abcd"]):
        result = rtauto(*args, "--home", str(typo))
        assert result.returncode == 1
        assert f"no job store at {typo / 'rtauto.db'}" in result.stderr
    assert not typo.exists()  # nothing was created where the mistyped home points


def test_rerun_runs_a_job_again_on_what_its_series_hold_now_and_replay_points_to_it(
    tmp_path: Path,
) -> None:
    import pydicom

    from rtauto.workflow import load_workflow_text

    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=5)
    settings, store, host, spool = daemon_home(tmp_path)

    def receive(files: list[Path]) -> list[str]:
        records = [spool.ingest_file(path) for path in files]
        store.record_instances(records)
        return [r.sop_instance_uid for r in records]

    try:
        # a daemon job made on the first 3 slices of the series, as the assembler makes it
        loaded = load_workflow_text(
            "name: body\ntrigger: {modality: CT}\nsteps:\n"
            "  - {id: body, uses: autocontour.threshold, with: {structures: [BODY]}}\n",
            "body.yaml",
            host.steps,
        )
        first = receive(series.files[:3])
        partial = daemon_job(store, settings, loaded, series, input_instances=first)
        assert rtauto("rerun", partial.id[:8], "--home", str(settings.home)).returncode == 1
        run_job(settings, store, host, partial.id)
        receive(series.files[3:])  # the rest of the series arrives later

        home = str(settings.home)
        replayed = rtauto("replay", partial.id, "--home", home)
        assert replayed.returncode == 1
        assert "delivered nothing that could be sent again" in replayed.stderr
        assert f"rtauto rerun {partial.id[:8]}" in replayed.stderr

        result = rtauto("rerun", partial.id[:8], "--home", home)
        assert result.returncode == 0, result.stderr
        assert "on 5 instance(s) (job" in result.stdout and "ran on 3 instance(s)" in result.stdout
        assert "no daemon runs on this home" in result.stdout
        new = store.get_job(result.stdout.split()[1].rstrip(":"))
        assert new.status == "pending" and len(new.input_instances) == 5
        run_job(settings, store, host, new.id)
        assert store.get_job(new.id).status == "ok"
        [rtstruct] = [a.path for a in store.artifacts_of(new.id) if a.kind == "RTSTRUCT"]
        frame = pydicom.dcmread(rtstruct).ReferencedFrameOfReferenceSequence[0]
        images = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert len(images.ContourImageSequence) == 5
        assert [e.kind for e in store.audit_events("job.rerun")] == ["job.rerun"]
    finally:
        store.close()

    # a job of rtauto run is run again by running rtauto run again
    workflow = tmp_path / "body.yaml"
    workflow.write_text(loaded.text)
    out = tmp_path / "out"
    ran = json.loads(
        rtauto("run", str(workflow), str(series.files[0]), "--out", str(out), "--json").stdout
    )
    refused = rtauto("rerun", ran["job"], "--home", str(out / ".rtauto"))
    assert refused.returncode == 1 and "made by rtauto run" in refused.stderr


SHARED = """\
name: to-share
trigger: {modality: CT}
steps:
  - id: send
    uses: route.folder
    with: {destination: share, send: inputs}
    retry: {max_attempts: 1}
  - id: copy
    uses: route.folder
    needs: [send]
    with: {path: copies, send: inputs}
destinations:
  share: {path: %(share)s}
"""


def test_resume_runs_a_failed_jobs_failed_and_skipped_steps_and_replay_points_to_it(
    tmp_path: Path,
) -> None:
    from rtauto.workflow import load_workflow_text

    series = write_ct_series(tmp_path / "ct", rows=16, cols=16, slices=3)
    share = tmp_path / "share"  # a share not mounted: the folder is missing
    settings, store, host, spool = daemon_home(tmp_path)
    home = str(settings.home)
    store.record_instances([spool.ingest_file(path) for path in series.files])

    try:
        loaded = load_workflow_text(SHARED % {"share": share}, "to-share.yaml", host.steps)
        job = daemon_job(store, settings, loaded, series)
        pending = rtauto("resume", job.id[:8], "--home", home)
        assert pending.returncode == 1
        assert f"job {job.id[:8]} is still pending: only a failed job is resumed" in (
            pending.stderr
        )
        run_job(settings, store, host, job.id)
        assert store.get_job(job.id).status == "fail"
        assert len(store.dead_letters()) == 3

        # the share is mounted again: a replay delivers, but the job stays FAIL
        share.mkdir()
        replayed = rtauto("replay", job.id[:8], "--home", home)
        assert replayed.returncode == 0, replayed.stderr
        assert f"stays FAIL: `rtauto resume {job.id[:8]}` runs its failed steps" in (
            replayed.stdout
        )
        assert len(list(share.rglob("*.dcm"))) == 3

        resumed = rtauto("resume", job.id[:8], "--home", home)
        assert resumed.returncode == 0, resumed.stderr
        assert f"job {job.id[:8]} resumed: step(s) send, copy run again" in resumed.stdout
        assert "no daemon runs on this home now" in resumed.stdout
        assert store.get_job(job.id).status == "pending"
        run_job(settings, store, host, job.id)
        assert store.get_job(job.id).status == "ok"
        # what the replay delivered was not sent again; the skipped step ran
        assert len(list(share.rglob("*.dcm"))) == 3
        assert len(list((settings.home / "copies").rglob("*.dcm"))) == 3
        send = {s.step_id: s for s in store.steps_of(job.id)}["send"]
        assert send.outputs["already_delivered"] == 3 and send.outputs["delivered"] == 0

        shown = rtauto("jobs", job.id[:8], "--home", home).stdout
        assert "Z by operator (rtauto resume): send, copy" in shown
        assert "    it had ended FAIL: step send failed: 3 of 3 item(s)" in shown
        again = rtauto("resume", job.id[:8], "--home", home)
        assert again.returncode == 1
        assert f"job {job.id[:8]} ended OK: nothing to resume" in again.stderr
        [event] = store.audit_events("job.resumed")
        assert event.data["earlier_steps"]["send"]["status"] == "fail"
    finally:
        store.close()

    # a job of rtauto run: no daemon would run it if it were resumed
    workflow = tmp_path / "to-share.yaml"
    workflow.write_text(SHARED % {"share": tmp_path / "not-mounted"})
    out = tmp_path / "out"
    ran = rtauto("run", str(workflow), str(series.files[0]), "--out", str(out), "--json")
    assert ran.returncode == 1 and json.loads(ran.stdout)["status"] == "fail"
    refused = rtauto("resume", json.loads(ran.stdout)["job"], "--home", str(out / ".rtauto"))
    assert refused.returncode == 1
    assert "made by rtauto run, whose jobs no daemon runs" in refused.stderr


def test_resume_refuses_a_job_that_rtauto_rerun_replaced_and_names_the_newer_job(
    tmp_path: Path,
) -> None:
    from rtauto.workflow import load_workflow_text

    series = write_ct_series(tmp_path / "ct", rows=16, cols=16, slices=3)
    settings, store, host, spool = daemon_home(tmp_path)
    home = str(settings.home)
    store.record_instances([spool.ingest_file(path) for path in series.files])
    try:
        share = tmp_path / "share"  # not mounted: the job fails with its dead letters
        loaded = load_workflow_text(SHARED % {"share": share}, "to-share.yaml", host.steps)
        job = daemon_job(store, settings, loaded, series)
        run_job(settings, store, host, job.id)
        assert store.get_job(job.id).status == "fail"
        rerun = rtauto("rerun", job.id[:8], "--home", home)
        assert rerun.returncode == 0, rerun.stderr
        newer = rerun.stdout.split()[1].rstrip(":")

        refused = rtauto("resume", job.id[:8], "--home", home)
        assert refused.returncode == 1
        assert (
            f"rtauto resume: job {newer} of workflow to-share, made by rtauto rerun, replaced "
            f"job {job.id[:8]} on its series" in refused.stderr
        )
        assert f"`rtauto resume {newer}` or `rtauto replay {newer}`" in refused.stderr
        assert store.get_job(job.id).status == "fail"
        assert store.delivery_failed_jobs(with_dead_letters=True) == []
    finally:
        store.close()


def test_a_configured_destination_with_a_typo_is_refused_by_validate_and_serve(
    tmp_path: Path,
) -> None:
    config = tmp_path / "rtauto.yaml"
    config.write_text(
        f"home: {tmp_path / 'home'}\n"
        "scp: {port: 0}\n"
        "destinations:\n"
        "  results: {path: /tmp}\n"
        "  tps2: {ae_title: TPS2, host: 127.0.0.1, prt: 104}\n"
    )
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    checked = rtauto("validate", "--config", str(config), str(workflows))
    assert checked.returncode == 1
    lines = checked.stdout.splitlines()
    assert any(
        line.startswith(f"{config}:5:") and "tps2" in line and "prt" in line for line in lines
    ), checked.stdout
    assert any(line.startswith(f"{config}:5:") and "port" in line for line in lines)
    assert not any("results" in line for line in lines)

    served = subprocess.run(
        [sys.executable, "-m", "rtauto.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert served.returncode == 1
    assert f"{config}:5:" in served.stderr and "prt" in served.stderr


def test_run_errors_name_the_input_files_not_the_spool_copies(tmp_path):
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=8)
    series.files[4].unlink()  # a gap: the contouring step refuses the series
    workflow = tmp_path / "body.yaml"
    workflow.write_text(
        "name: body\ntrigger: {modality: CT}\nsteps:\n  - id: body\n"
        "    uses: autocontour.threshold\n    with: {structures: [BODY], output: rtstruct}\n"
    )
    result = rtauto(
        "run", str(workflow), str(tmp_path / "ct"), "--out", str(tmp_path / "out"), "--json"
    )
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    [step] = summary["steps"]
    assert step["outcome"] == "fail"
    assert f"between {series.files[3]} and {series.files[5]}" in step["error"]
    assert ".rtauto" not in step["error"]
    # job.json in the output folder says the same
    assert (
        json.loads((tmp_path / "out" / "job.json").read_text())["steps"][0]["error"]
        == step["error"]
    )
