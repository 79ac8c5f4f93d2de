"""Resuming failed jobs on real worker processes and a real DICOM node: the failed steps and
those skipped because of them run again in the same job, nothing that ended ok runs again and
nothing delivered is delivered twice; and the daemon's background retry of dead letters."""

from __future__ import annotations

import logging
import textwrap
import time
from pathlib import Path

import pytest

from rtauto.config import DeadLetterSettings, RetentionSettings
from rtauto.engine.resume import resume_job, steps_to_resume
from rtauto.errors import ResumeRefused
from rtauto.ingest.assembler import create_job_for
from rtauto.retention import DAY, purge
from rtauto.route.dead_letters import retry_dead_letters, send_in_worker
from rtauto.route.replay import replay_job
from rtauto.testing import ReceivingSCP
from rtauto.workflow import load_workflow_text

# the image goes to the TPS first; the report that depends on it (as a REG references the
# images it is sent after) goes to a results folder only once they are there
SEND_AFTER_IMAGES = """
name: send-after-images
trigger: {{modality: CT}}
steps:
  - id: contour
    uses: t.emit
  - id: send-image
    uses: route.dicom
    needs: [contour]
    with: {{destination: tps, send: inputs}}
    retry: {{max_attempts: 2, backoff: 0.05}}
  - id: send
    uses: route.folder
    needs: [send-image]
    with: {{path: results, from: [contour]}}
  - id: after
    uses: t.emit
    needs: [send]
  - id: alert
    uses: t.emit
    needs: [send-image]
    if: "failure()"
destinations:
  tps: {{ae_title: TPS, host: 127.0.0.1, port: {port}, timeout: 5}}
"""

BAD_DATA = """
name: bad-data
trigger: {modality: CT}
steps:
  - id: bad
    uses: t.bad
"""


def statuses(env, job_id: str) -> dict[str, str]:
    return {s.step_id: s.status for s in env.store.steps_of(job_id)}


def runs(env, job_id: str, step_id: str) -> int:
    """How many times the step's plugin ran (the site steps count their runs in the job's
    folder)."""
    counter = Path(env.store.get_job(job_id).work_dir) / f"{step_id}.count"
    return int(counter.read_text()) if counter.exists() else 0


def test_a_job_whose_destination_was_down_is_resumed_once_it_is_back(env, tmp_path):
    tps = ReceivingSCP(tmp_path / "tps", ae_title="TPS")  # its port: nothing listens yet
    job = env.job(SEND_AFTER_IMAGES.format(port=tps.port))
    env.engine().run_until_done([job.id])
    assert env.store.get_job(job.id).status == "fail"
    assert statuses(env, job.id) == {
        "contour": "ok",
        "send-image": "fail",
        "send": "skipped",
        "after": "skipped",
        "alert": "ok",
    }
    dead = env.store.dead_letters()
    assert len(dead) == 3 and {d.step_id for d in dead} == {"send-image"}
    assert env.store.delivery_failed_jobs(with_dead_letters=True) == [job.id]

    with tps:
        resumed = resume_job(
            env.store, job.id[:8], env.host.steps, by="operator", reason="the TPS is back"
        )
        assert resumed == ["send-image", "send", "after"]
        row = env.store.get_job(job.id)
        assert (row.status, row.error, row.finished_at) == ("pending", None, None)
        env.engine().run_until_done([job.id])
        received = list(tps.received)

    row = env.store.get_job(job.id)
    assert row.status == "ok", row.error
    assert set(statuses(env, job.id).values()) == {"ok"}
    # what ended ok did not run again; what was skipped ran once
    assert [runs(env, job.id, s) for s in ("contour", "alert", "after")] == [1, 1, 1]
    assert sorted(received) == sorted(env.series.sop_instance_uids)  # each slice once
    steps = {s.step_id: s for s in env.store.steps_of(job.id)}
    assert steps["send-image"].attempts == 1  # its retry policy afresh
    assert steps["send-image"].outputs["delivered"] == 3
    assert {d.status for d in env.store.deliveries_of(job.id)} == {"delivered"}
    assert env.store.dead_letters() == [] and env.store.delivery_failed_jobs() == []
    [report] = env.store.artifacts_of(job.id, "contour")
    assert (env.settings.home / "results" / Path(report.path).name).is_file()

    [event] = env.store.audit_events("job.resumed")
    assert event.subject == job.id
    assert event.data["by"] == "operator" and event.data["reason"] == "the TPS is back"
    assert event.data["steps"] == ["send-image", "send", "after"]
    assert "send-image (fail), send (skipped), after (skipped)" in event.message
    # what the earlier attempts said stays readable
    earlier = event.data["earlier_steps"]["send-image"]
    assert earlier["attempts"] == 2 and "dead-letter list" in earlier["error"]
    assert "step send-image failed" in event.data["earlier_error"]

    with pytest.raises(ResumeRefused, match=f"job {job.id[:8]} ended OK: nothing to resume"):
        resume_job(env.store, job.id, env.host.steps, by="operator", reason="again")


def test_the_background_retry_delivers_dead_letters_then_resumes_only_such_jobs(env, tmp_path):
    tps = ReceivingSCP(tmp_path / "tps", ae_title="TPS")
    waiting = env.job(SEND_AFTER_IMAGES.format(port=tps.port))
    bad = env.job(BAD_DATA)
    # a step failed on bad data beside the one that gave up on delivery: not retried either
    mixed = env.job(
        SEND_AFTER_IMAGES.format(port=tps.port)
        .replace("name: send-after-images", "name: mixed")
        .replace("destinations:", "  - {id: check, uses: t.bad}\ndestinations:")
    )
    env.engine().run_until_done([waiting.id, bad.id, mixed.id])
    assert statuses(env, mixed.id)["check"] == "fail"
    assert env.store.delivery_failed_jobs() == [waiting.id]
    # the window: a job that ended more than retry_for_hours (72) ago is not retried, and
    # the pass after it left the window says so, once
    later = time.time() + 73 * 3600
    report = retry_dead_letters(
        env.settings, env.store, env.host, now=later, window_was=later - 74 * 3600
    )
    assert (report.jobs, report.gave_up) == (0, [waiting.id])
    [gave_up] = env.store.audit_events("delivery.gave_up")
    assert gave_up.subject == waiting.id
    report = retry_dead_letters(
        env.settings, env.store, env.host, now=later + 60, window_was=report.since
    )
    assert (report.jobs, report.gave_up) == (0, [])

    # the TPS still down: the job stays FAIL, its items in the dead-letter list
    report = retry_dead_letters(env.settings, env.store, env.host)
    assert (report.jobs, report.delivered, report.undelivered) == (1, 0, 3)
    assert report.resumed == [] and "still undelivered" in report.summary()
    assert env.store.get_job(waiting.id).status == "fail"
    dead = [d for d in env.store.dead_letters() if d.job_id == waiting.id]
    assert len(dead) == 3
    assert all(d.attempts == 3 and d.last_error.startswith("retry: ") for d in dead)
    assert env.store.audit_events("job.resumed") == []

    with tps:
        report = retry_dead_letters(env.settings, env.store, env.host)
        assert (report.jobs, report.delivered, report.resumed) == (1, 3, [waiting.id])
        assert sorted(tps.received) == sorted(env.series.sop_instance_uids)
        assert env.store.get_job(waiting.id).status == "pending"
        env.engine().run_until_done([waiting.id])
        received = list(tps.received)

    assert env.store.get_job(waiting.id).status == "ok"
    # the routing step ran again and found each item delivered: none went twice
    assert sorted(received) == sorted(env.series.sop_instance_uids)
    send_image = {s.step_id: s for s in env.store.steps_of(waiting.id)}["send-image"]
    assert send_image.outputs == {
        "delivered": 0,
        "destination": "tps",
        "already_delivered": 3,
    }
    assert statuses(env, waiting.id)["after"] == "ok"
    [delivered] = env.store.audit_events("delivery.retried")
    assert delivered.subject == waiting.id and "delivered 3 of 3" in delivered.message
    [event] = env.store.audit_events("job.resumed")
    assert (event.subject, event.data["by"]) == (waiting.id, "daemon")
    # the bad-data failures were left alone: their steps ran once
    assert env.store.get_job(bad.id).status == "fail" and runs(env, bad.id, "bad") == 1
    assert env.store.get_job(mixed.id).status == "fail" and runs(env, mixed.id, "check") == 1
    assert retry_dead_letters(env.settings, env.store, env.host).jobs == 0


def test_a_job_whose_dead_letters_a_replay_delivered_is_resumed_by_the_next_pass(env, tmp_path):
    tps = ReceivingSCP(tmp_path / "tps", ae_title="TPS")
    job = env.job(SEND_AFTER_IMAGES.format(port=tps.port))
    engine = env.engine()
    engine.run_until_done([job.id])
    with tps:
        replayed = replay_job(env.store, env.settings, env.host, job.id)
        assert [r.delivered for r in replayed] == [True] * 3
        assert env.store.get_job(job.id).status == "fail"  # a replay sends, it runs nothing
        report = retry_dead_letters(env.settings, env.store, env.host)
        assert (report.jobs, report.resumed) == (0, [job.id])  # nothing left to send
        engine.run_until_done([job.id])
        received = list(tps.received)
    assert env.store.get_job(job.id).status == "ok"
    assert sorted(received) == sorted(env.series.sop_instance_uids)
    assert statuses(env, job.id)["after"] == "ok"


def test_a_job_that_did_not_fail_is_refused(env):
    pending = env.job(BAD_DATA)
    with pytest.raises(ResumeRefused, match="is still pending: only a failed job is resumed"):
        resume_job(env.store, pending.id, env.host.steps, by="operator", reason="test")
    newer = env.job(BAD_DATA.replace("name: bad-data", "name: newer"))
    env.store.supersede_pending_jobs([pending.id], newer.id, "superseded by job x: grown")
    with pytest.raises(ResumeRefused, match=r"never ran \(superseded by job x: grown\)"):
        resume_job(env.store, pending.id, env.host.steps, by="operator", reason="test")
    assert env.store.audit_events("job.resumed") == []


def test_a_resumed_bad_data_failure_fails_again_under_its_retry_policy_afresh(env):
    job = env.job(BAD_DATA)
    engine = env.engine()
    engine.run_until_done([job.id])
    assert resume_job(env.store, job.id, env.host.steps, by="operator", reason="test") == ["bad"]
    engine.run_until_done([job.id])
    assert env.store.get_job(job.id).status == "fail"
    [step] = env.store.steps_of(job.id)
    assert (step.status, step.attempts) == ("fail", 1)
    assert runs(env, job.id, "bad") == 2
    # the earlier attempt's files are kept aside, as between retries
    assert any((Path(env.store.get_job(job.id).work_dir) / ".attempts").iterdir())


def test_steps_to_resume_are_the_failed_ones_and_those_skipped_because_of_them():
    loaded = load_workflow_text(
        """\
name: dag
trigger: {modality: CT}
steps:
  - {id: check, uses: t.a}
  - {id: send, uses: t.b, needs: [check]}
  - {id: reg, uses: t.b, needs: [send]}
  - {id: notify, uses: t.b, needs: [send], if: "failure()"}
  - {id: quiet, uses: t.b, needs: [check], if: "steps.check.outputs.flag"}
  - {id: later, uses: t.b, needs: [quiet]}
  - {id: reads, uses: t.b, needs: [reg], if: "steps.send.status == 'ok'"}
  - {id: broken, uses: t.b}
"""
    )
    statuses = {
        "check": "ok",
        "send": "fail",
        "reg": "skipped",  # needs the failed step
        "notify": "ok",  # ran because of the failure: not again
        "quiet": "skipped",  # its condition is false on an ok step's output: stays so
        "later": "skipped",
        "reads": "skipped",  # needs a step that runs again, through another
        "broken": "fail",
    }
    assert steps_to_resume(loaded, statuses) == ["send", "reg", "reads", "broken"]


def series_job(env, text: str, sops: list[str], dedupe_key: str | None = None):
    """A job of the workflow ``text`` on these instances of the fixture's series, as the
    assembler makes it (``dedupe_key``: ``grown:...`` for the job on the series grown)."""
    loaded = load_workflow_text(textwrap.dedent(text), "test.yaml", env.host.steps)
    uid = env.series.series_instance_uid
    return create_job_for(
        env.store,
        env.settings,
        loaded,
        scope="series",
        study_uid=env.series.study_instance_uid,
        series_uid=uid,
        input_series=[uid],
        key_series=[uid],
        input_instances=sops,
        dedupe_key=dedupe_key,
    )


def test_a_job_that_a_grown_series_job_replaced_is_neither_retried_nor_resumed(env, tmp_path):
    tps = ReceivingSCP(tmp_path / "tps", ae_title="TPS")
    workflow = SEND_AFTER_IMAGES.format(port=tps.port)
    sops = [i.sop_uid for i in env.store.instances_of_series(env.series.series_instance_uid)]
    # made on 2 of the 3 slices (a cut-off sender), then on all 3 once the rest arrived;
    # the TPS is down for both
    partial = series_job(env, workflow, sops[:2])
    engine = env.engine()
    engine.run_until_done([partial.id])
    whole = series_job(env, workflow, sops, dedupe_key="grown:3")
    engine.run_until_done([whole.id])
    assert env.store.job_statuses([partial.id, whole.id]) == {
        partial.id: "fail",
        whole.id: "fail",
    }
    assert env.store.delivery_failed_jobs(with_dead_letters=True) == [whole.id]

    with tps:
        report = retry_dead_letters(env.settings, env.store, env.host)
        assert (report.jobs, report.delivered, report.resumed) == (1, 3, [whole.id])
        engine.run_until_done([whole.id])
        received = list(tps.received)
    # the TPS got the whole series once, nothing made on part of it
    assert sorted(received) == sorted(sops)
    assert env.store.get_job(whole.id).status == "ok"
    assert env.store.get_job(partial.id).status == "fail"
    assert len(env.store.dead_letters_of(partial.id)) == 2
    assert runs(env, partial.id, "after") == 0
    with pytest.raises(ResumeRefused) as refused:
        resume_job(env.store, partial.id, env.host.steps, by="operator", reason="test")
    assert (
        f"job {whole.id[:8]} of workflow send-after-images, made when the series grew, "
        f"replaced job {partial.id[:8]} on its series" in str(refused.value)
    )
    assert f"`rtauto resume {whole.id[:8]}` or `rtauto replay {whole.id[:8]}`" in str(refused.value)
    assert env.store.get_job(partial.id).status == "fail"


FOLDER_THEN_FLAKY = """
name: {name}
trigger: {{modality: CT}}
steps:
  - id: a
    uses: t.emit
  - id: b
    uses: t.flaky
    needs: [a]
    with: {{fail_times: 2}}
    retry: {{max_attempts: 2, backoff: 0.05}}
  - id: send
    uses: route.folder
    needs: [b]
    with: {{path: out, from: [a]}}
"""


def test_a_job_whose_folder_or_inputs_retention_removed_is_not_resumed(env):
    sops = [i.sop_uid for i in env.store.instances_of_series(env.series.series_instance_uid)]
    # each of its own workflow: a newer job of the same one would replace it
    reads = series_job(env, FOLDER_THEN_FLAKY.format(name="reads-instances"), sops)
    reads_series = env.job(FOLDER_THEN_FLAKY.format(name="reads-series"))  # reads all
    engine = env.engine()
    engine.run_until_done([reads.id, reads_series.id])
    assert env.store.job_statuses([reads.id, reads_series.id]) == {
        reads.id: "fail",
        reads_series.id: "fail",
    }
    env.store.mark_series_complete(env.series.series_instance_uid)

    # the folder goes at jobs_days (the record stays while the study holds data), with the
    # report of step a, which the send step run again would read
    purge(
        env.settings,
        env.store,
        retention=RetentionSettings(jobs_days=90),
        now=time.time() + 91 * DAY,
    )
    assert not Path(reads.work_dir).exists() and env.store.get_job(reads.id) is not None
    with pytest.raises(ResumeRefused) as refused:
        resume_job(env.store, reads.id, env.host.steps, by="operator", reason="test")
    assert (
        f"the working folder of job {reads.id[:8]} ({reads.work_dir}) was removed, with the "
        f"results of step(s) a that the steps run again would read: `rtauto rerun "
        f"{reads.id[:8]}`" in str(refused.value)
    )

    # the received instances go at received_days: resumed, the steps would read nothing
    report = purge(
        env.settings,
        env.store,
        retention=RetentionSettings(received_days=30),
        now=time.time() + 31 * DAY,
    )
    assert report.instances == 3
    with pytest.raises(ResumeRefused) as refused:
        resume_job(env.store, reads.id, env.host.steps, by="operator", reason="test")
    assert (
        f"3 of the 3 input instance(s) of job {reads.id[:8]} are no longer held (removed by "
        f"retention): send the series again, then `rtauto rerun {reads.id[:8]}`"
        in str(refused.value)
    )
    with pytest.raises(ResumeRefused) as refused:
        resume_job(env.store, reads_series.id, env.host.steps, by="operator", reason="test")
    assert (
        f"input series {env.series.series_instance_uid} of job {reads_series.id[:8]} holds "
        "no instance any more (removed by retention)" in str(refused.value)
    )
    assert env.store.audit_events("job.resumed") == []
    assert env.store.job_statuses([reads.id, reads_series.id]) == {
        reads.id: "fail",
        reads_series.id: "fail",
    }


def test_an_item_replayed_to_another_destination_is_not_sent_again(env, tmp_path):
    tps = ReceivingSCP(tmp_path / "tps", ae_title="TPS")
    job = env.job(SEND_AFTER_IMAGES.format(port=tps.port))
    engine = env.engine()
    engine.run_until_done([job.id])
    backup = tmp_path / "backup"
    backup.mkdir()
    replayed = replay_job(env.store, env.settings, env.host, job.id, f"folder:{backup}")
    assert [r.delivered for r in replayed] == [True] * 3
    # delivered by the same step elsewhere: no dead letter waits, though the TPS's records
    # stay dead
    assert env.store.delivery_failed_jobs() == [job.id]
    assert env.store.delivery_failed_jobs(with_dead_letters=True) == []
    assert env.store.dead_letters_of(job.id) == []
    assert len(env.store.dead_letters()) == 3

    with tps:
        report = retry_dead_letters(env.settings, env.store, env.host)
        assert (report.jobs, report.resumed) == (0, [job.id])  # nothing sent again
        engine.run_until_done([job.id])
        received = list(tps.received)
    assert received == []
    assert env.store.get_job(job.id).status == "ok"
    # the resumed routing step found each item delivered (at the backup), and sent none
    send_image = {s.step_id: s for s in env.store.steps_of(job.id)}["send-image"]
    assert (send_image.outputs["delivered"], send_image.outputs["already_delivered"]) == (0, 3)
    assert statuses(env, job.id)["after"] == "ok"


GATED = """
name: gated
trigger: {{modality: CT}}
steps:
  - id: contour
    uses: t.emit
  - id: send
    uses: route.send
    needs: [contour]
    with: {{destination: gated}}
    retry: {{max_attempts: 1}}
  - id: after
    uses: t.emit
    needs: [send]
destinations:
  gated: {{type: t.gate, gate: {gate}}}
"""


def test_the_daemon_sends_dead_letters_in_a_worker_killed_past_its_time_limit(env, tmp_path):
    gate = tmp_path / "gate"  # missing: the destination is down
    job = env.job(GATED.format(gate=gate))
    engine = env.engine()
    engine.run_until_done([job.id])
    assert env.store.get_job(job.id).status == "fail"
    settings = env.settings.model_copy(
        update={"dead_letters": DeadLetterSettings(send_timeout_minutes=0.05)}  # 3 s
    )

    def retry():
        return retry_dead_letters(
            settings,
            env.store,
            env.host,
            send=send_in_worker(engine.pool, env.store),
            hold=engine.holding,
        )

    # a send that hangs (a hard-mounted share whose server is gone), then one that takes its
    # process down: each is reported as a delivery error, and the dead letter stays dead
    gate.write_text("hang")
    started = time.monotonic()
    report = retry()
    assert time.monotonic() - started < 60
    assert (report.jobs, report.delivered, report.undelivered) == (1, 0, 1)
    assert report.errors == {"gated: timed out after 3 s"}
    gate.write_text("crash")
    report = retry()
    assert (report.jobs, report.delivered, report.undelivered) == (1, 0, 1)
    [error] = report.errors
    assert error.startswith("gated: worker process died after") and "(exit code 3)" in error
    [dead] = env.store.dead_letters_of(job.id)
    assert dead.attempts == 1 and env.store.get_job(job.id).status == "fail"

    # the destination is back: the next pass delivers in a fresh worker and resumes the job,
    # which runs at once (no hold of the passes before was left behind)
    gate.write_text("up")
    report = retry()
    assert (report.jobs, report.delivered, report.resumed) == (1, 1, [job.id])
    engine.run_until_done([job.id])
    assert env.store.get_job(job.id).status == "ok"
    assert (tmp_path / "received.txt").read_text() == "report.json\n"  # once
    [retried] = env.store.audit_events("delivery.retried")
    assert retried.data["results"][0]["status"] == "delivered"


def test_a_job_the_retry_cannot_resume_is_left_alone_and_logged_once(env, tmp_path, caplog):
    tps = ReceivingSCP(tmp_path / "tps", ae_title="TPS")
    job = env.job(SEND_AFTER_IMAGES.format(port=tps.port))
    engine = env.engine()
    engine.run_until_done([job.id])
    with tps:  # an operator replays the dead letters, but resumes nothing
        assert all(r.delivered for r in replay_job(env.store, env.settings, env.host, job.id))
    env.store.mark_series_complete(env.series.series_instance_uid)
    # delivered, the job keeps its patient's data no longer: retention removes the inputs
    report = purge(
        env.settings,
        env.store,
        retention=RetentionSettings(received_days=2),
        now=time.time() + 3 * DAY,
    )
    assert report.instances == 3
    assert env.store.delivery_failed_jobs() == [job.id]

    caplog.set_level(logging.WARNING, logger="rtauto.route")
    for _ in range(3):
        report = retry_dead_letters(env.settings, env.store, env.host)
        assert (report.jobs, report.resumed) == (0, [])
    assert env.store.get_job(job.id).status == "fail"
    warnings = [r.getMessage() for r in caplog.records if r.name == "rtauto.route"]
    assert len(warnings) == 1
    assert "holds no instance any more (removed by retention)" in warnings[0]
    [refused] = env.store.audit_events("job.resume_refused")
    assert refused.subject == job.id and refused.message in warnings[0]
