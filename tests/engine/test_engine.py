"""The engine on real worker processes: outcomes, retries, timeouts, conditions, resume,
provenance, and a plugin upgraded on disk reaching the next job."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from rtauto.testing import wait_until


def steps_of(env, job_id):
    return {s.step_id: s for s in env.store.steps_of(job_id)}


def test_transient_failures_are_retried_with_backoff(env):
    job = env.job(
        """
        name: retry
        trigger: {modality: CT}
        steps:
          - id: flaky
            uses: t.flaky
            with: {fail_times: 2}
            retry: {max_attempts: 3, backoff: 0.05}
        """
    )
    engine = env.engine()
    engine.run_until_done([job.id])
    step = steps_of(env, job.id)["flaky"]
    assert (step.status, step.attempts, step.outputs["runs"]) == ("ok", 3, 3)
    assert env.store.get_job(job.id).status == "ok"


def test_retries_end_in_fail_after_max_attempts(env):
    job = env.job(
        """
        name: retry-exhausted
        trigger: {modality: CT}
        steps:
          - id: flaky
            uses: t.flaky
            with: {fail_times: 9}
            retry: {max_attempts: 2, backoff: 0.05}
        """
    )
    env.engine().run_until_done([job.id])
    step = steps_of(env, job.id)["flaky"]
    assert (step.status, step.attempts) == ("fail", 2)
    assert "gave up after 2 attempt(s): transient failure 2" in step.error
    assert env.store.get_job(job.id).status == "fail"


def test_bad_data_fails_without_retry(env):
    job = env.job(
        """
        name: bad
        trigger: {modality: CT}
        steps:
          - id: bad
            uses: t.bad
            retry: {max_attempts: 5}
        """
    )
    env.engine().run_until_done([job.id])
    step = steps_of(env, job.id)["bad"]
    assert (step.status, step.attempts) == ("fail", 1)
    assert "expected orientation" in step.error


def test_timeout_kills_the_worker_and_fails_or_retries(env):
    job = env.job(
        """
        name: timeouts
        trigger: {modality: CT}
        steps:
          - id: hang
            uses: t.sleep
            with: {seconds: 60}
            timeout: 1s
          - id: hang_retry
            uses: t.sleep
            with: {seconds: 60}
            timeout: 1s
            retry: {max_attempts: 2, backoff: 0.05, on_timeout: true}
          - id: after
            uses: t.emit
        """
    )
    env.engine().run_until_done([job.id])
    steps = steps_of(env, job.id)
    assert (steps["hang"].status, steps["hang"].attempts) == ("fail", 1)
    assert "timed out after 1 s" in steps["hang"].error
    assert (steps["hang_retry"].status, steps["hang_retry"].attempts) == ("fail", 2)
    assert steps["after"].status == "ok"  # the pool replaced the killed workers
    # the killed worker sent nothing back; the plugin that ran the step is still on record
    assert steps["hang"].plugin == "t" and steps["hang"].plugin_version != ""
    assert steps["hang_retry"].plugin == "t"


def test_numpy_and_other_outputs_reach_conditions_as_numbers_and_lists(env):
    job = env.job(
        """
        name: outputs
        trigger: {modality: CT}
        steps:
          - id: m
            uses: t.measure
          - id: above
            uses: t.emit
            needs: [m]
            if: "steps.m.outputs.mean_hu > 1.0 and steps.m.outputs.n == 3 and steps.m.outputs.ok"
          - id: below
            uses: t.emit
            needs: [m]
            if: "steps.m.outputs.mean_hu < 1.0"
          - id: shifted
            uses: t.emit
            needs: [m]
            if: "steps.m.outputs.shift[1] == -1.0 and 'Cord' in steps.m.outputs.rois"
          - id: unstorable
            uses: t.measure
            with: {value: object}
          - id: stray
            uses: t.outside
        """
    )
    env.engine().run_until_done([job.id])
    steps = steps_of(env, job.id)
    assert steps["m"].outputs == {
        "mean_hu": 1.5,
        "n": 3,
        "ok": True,
        "shift": [0.5, -1.0],
        "rois": ["Cord", "Lung_L"],
        "where": "/data/x",
        "pair": [1, 2],
    }
    assert (steps["above"].status, steps["below"].status, steps["shifted"].status) == (
        "ok",
        "skipped",
        "ok",
    )
    # an output no workflow could read fails its step, naming it, instead of becoming text
    assert steps["unstorable"].status == "fail"
    error = steps["unstorable"].error
    assert "output 'mask' is of type object, which a workflow cannot read" in error
    # an artifact outside the step's workdir is refused (a re-run gets a fresh workdir)
    assert steps["stray"].status == "fail"
    assert "stray.txt is outside the step's workdir" in steps["stray"].error


def test_needs_and_conditions(env):
    job = env.job(
        """
        name: dag
        trigger: {modality: CT}
        steps:
          - id: check
            uses: t.emit
            with: {value: warn}
          - id: broken
            uses: t.bad
          - id: on_pass
            uses: t.emit
            needs: [check]
            if: "steps.check.outputs.value == 'pass'"
          - id: on_warn
            uses: t.emit
            needs: [check]
            if: "steps.check.outputs.value in ['warn', 'fail']"
          - id: after_broken
            uses: t.emit
            needs: [broken]
          - id: notify
            uses: t.emit
            needs: [broken]
            if: "failure()"
          - id: on_broken_status
            uses: t.emit
            needs: [broken]
            if: "steps.broken.status == 'fail'"
        """
    )
    env.engine().run_until_done([job.id])
    steps = steps_of(env, job.id)
    assert {k: s.status for k, s in steps.items()} == {
        "check": "ok",
        "broken": "fail",
        "on_pass": "skipped",
        "on_warn": "ok",
        "after_broken": "skipped",
        "notify": "ok",
        "on_broken_status": "skipped",
    }
    assert "condition is false" in steps["on_pass"].summary
    assert "did not succeed: broken (fail)" in steps["after_broken"].summary
    # its condition is true, but a step runs after a failed need only with failure()/always()
    assert steps["on_broken_status"].summary == (
        "skipped: needed step(s) did not succeed: broken (fail) "
        "(a condition runs after a failure only with failure() or always())"
    )
    assert env.store.get_job(job.id).status == "fail"


def test_restart_resumes_unfinished_steps_and_never_repeats_finished_ones(env):
    job = env.job(
        """
        name: resume
        trigger: {modality: CT}
        steps:
          - id: first
            uses: t.emit
          - id: second
            uses: t.emit
            needs: [first]
        """
    )
    engine = env.engine()
    engine.run_until_done([job.id])
    # simulate a crash in the middle of `second`: the store says it is still running
    env.store.update_step(job.id, "second", status="running")
    env.store.set_job_status(job.id, "running")
    engine.close()
    restarted = env.engine()
    assert restarted.recover() == 1
    restarted.run_until_done([job.id])
    job_dir = Path(env.store.get_job(job.id).work_dir)
    assert (job_dir / "first.count").read_text() == "1"
    assert (job_dir / "second.count").read_text() == "2"
    assert env.store.get_job(job.id).status == "ok"
    assert steps_of(env, job.id)["second"].attempts == 2


def test_artifacts_carry_provenance(env):
    job = env.job(
        """
        name: provenance
        trigger: {modality: CT}
        steps:
          - id: emit
            uses: t.emit
            with: {value: x}
        """
    )
    env.engine().run_until_done([job.id])
    row = env.store.get_job(job.id)
    [artifact] = env.store.artifacts_of(job.id)
    assert artifact.kind == "report-json"
    assert artifact.provenance["workflow_hash"] == row.workflow_hash
    assert artifact.provenance["workflow_name"] == "provenance"
    assert artifact.provenance["plugin_name"] == "t"
    assert artifact.provenance["step_type"] == "t.emit"
    assert len(artifact.sha256) == 64
    assert Path(artifact.path).is_relative_to(Path(row.work_dir))
    assert steps_of(env, job.id)["emit"].outputs["instances"] == 3


def test_each_step_numbers_the_series_it_writes_apart_from_the_others(env):
    # the series numbers follow the steps' order in the file, not the order they run in
    job = env.job(
        """
        name: numbers
        trigger: {modality: CT}
        steps:
          - id: later
            uses: t.numbers
            needs: first
          - id: first
            uses: t.numbers
          - id: third
            uses: t.numbers
        """
    )
    env.engine().run_until_done([job.id])
    outputs = {sid: s.outputs for sid, s in steps_of(env, job.id).items()}
    assert outputs["later"] == {"series": [9001, 9002], "index": 0}
    assert outputs["first"] == {"series": [9011, 9012], "index": 1}
    assert outputs["third"] == {"series": [9021, 9022], "index": 2}


def test_a_plugin_upgraded_on_disk_is_used_by_the_next_job(env):
    text = """
        name: upgrade
        trigger: {modality: CT}
        steps:
          - id: emit
            uses: t.emit
        """
    engine = env.engine()
    first = env.job(text)
    engine.run_until_done([first.id])
    assert steps_of(env, first.id)["emit"].outputs["version"] == 1

    source = env.module_path.read_text().replace("VERSION = 1", "VERSION = 2")
    env.module_path.write_text(source)
    stat = env.module_path.stat()
    os.utime(env.module_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    time.sleep(1.1)  # the pool looks at the installed plugins at most once a second

    second = env.job(text)
    engine.run_until_done([second.id])
    assert steps_of(env, second.id)["emit"].outputs["version"] == 2
    report = json.loads(Path(env.store.artifacts_of(second.id)[0].path).read_text())
    assert report["version"] == 2


def test_a_step_that_ends_while_a_pass_looks_at_its_job_is_not_started_again(env):
    # a pass that starts d reads the job's steps first, then starts d (which takes a while):
    # b, c and e, started by an earlier pass, end meanwhile and read as running there
    text = """
        name: fast
        trigger: {modality: CT}
        steps:
          - {id: a, uses: t.emit}
          - {id: d, uses: t.emit, needs: [a]}
          - {id: b, uses: t.bad}
          - {id: c, uses: t.emit}
          - {id: e, uses: t.emit}
        """
    jobs = [env.job(text) for _ in range(8)]
    env.engine().run_until_done([j.id for j in jobs])
    for job in jobs:
        job_dir = Path(env.store.get_job(job.id).work_dir)
        runs = {s: int((job_dir / f"{s}.count").read_text()) for s in "abcde"}
        assert runs == dict.fromkeys("abcde", 1), job.id
        assert all(s.attempts == 1 for s in env.store.steps_of(job.id))


def test_a_step_an_error_of_the_store_left_running_runs_again(env, monkeypatch, caplog):
    text = """
        name: orphan
        trigger: {modality: CT}
        steps:
          - {id: a, uses: t.emit}
        """
    job = env.job(text)
    engine = env.engine()
    original = engine._task
    failures = []

    def store_down_once(*args, **kwargs):
        if not failures:
            failures.append(True)
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))
        return original(*args, **kwargs)

    # the step is written running, then the store fails before it is handed to a worker
    monkeypatch.setattr(engine, "_task", store_down_once)
    with pytest.raises(OperationalError):
        engine.tick()
    assert steps_of(env, job.id)["a"].status == "running"

    def done() -> bool:
        engine.tick()
        return env.store.get_job(job.id).status == "ok"

    wait_until(done, timeout=120, interval=0.1)
    assert int((Path(env.store.get_job(job.id).work_dir) / "a.count").read_text()) == 1
    assert "was left running with nothing running it" in caplog.text


def test_no_step_of_a_held_job_starts_until_it_is_released(env):
    # the daemon holds a failed job while it sends its dead letters: a resume at that moment
    # must not have its routing step send them too
    text = """
        name: held
        trigger: {modality: CT}
        steps:
          - {id: a, uses: t.emit}
        """
    held, other = env.job(text), env.job(text.replace("name: held", "name: other"))
    engine = env.engine()
    with engine.holding(held.id):
        engine.run_until_done([other.id])  # the engine runs the other jobs meanwhile
        assert engine.tick() == 0
        assert env.store.get_job(held.id).status == "pending"
        assert steps_of(env, held.id)["a"].attempts == 0
    engine.run_until_done([held.id])
    assert env.store.get_job(held.id).status == "ok"
    assert steps_of(env, held.id)["a"].attempts == 1
