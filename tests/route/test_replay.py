"""``replay_job``: re-delivering a job's routed items, to the same or another destination."""

from __future__ import annotations

import pytest

from rtauto.config import Destination, Settings
from rtauto.errors import RtautoError, StepFailed
from rtauto.hooks import build_plugin_manager
from rtauto.route.replay import job_destinations, replay_job
from rtauto.route.steps import RouteDicomParams, RouteFolderParams, route_dicom, route_folder
from rtauto.testing import free_port, write_ct_series

TO_TPS = RouteDicomParams(destination="tps")


@pytest.fixture
def host():
    return build_plugin_manager(autoload=False)


def test_replay_sends_delivered_items_again(make_context, store, job, kit, tmp_path, host):
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=3)
    artifacts = [kit.dicom_artifact(f) for f in series.files]
    with kit.CountingSCP(tmp_path / "counted") as scp:
        tps = Destination.model_validate(
            {"ae_title": "COUNTER", "host": "127.0.0.1", "port": scp.port}
        )
        make_context.destinations["tps"] = tps
        route_dicom(
            make_context(artifacts={"contour": artifacts}), RouteDicomParams(destination="tps")
        )
        settings = Settings(home=tmp_path / "home", destinations={"tps": tps})
        results = replay_job(store, settings, host, job.id[:8])  # a unique prefix will do
    assert [(r.delivered, r.status) for r in results] == [(True, "delivered")] * 3
    assert {r.destination for r in results} == {"tps"}
    assert sorted(scp.received) == sorted(series.sop_instance_uids * 2)
    assert scp.associations == 2  # one for the step, one for the replay
    rows = store.deliveries_of(job.id)
    assert [(r.status, r.attempts) for r in rows] == [("delivered", 2)] * 3
    [event] = store.audit_events("delivery.replay")
    assert event.subject == job.id
    assert "3 delivered, 0 failed" in event.message
    assert len(event.data["results"]) == 3


def test_replay_of_dead_letters_once_the_destination_is_back(
    make_context, store, job, kit, tmp_path, test_data, host
):
    artifact = kit.dicom_artifact(test_data / "dicompyler-core-example" / "rtss.dcm")
    port = free_port()
    block = {"ae_title": "COUNTER", "host": "127.0.0.1", "port": port, "timeout": 5}
    make_context.add("tps", **block)
    with pytest.raises(StepFailed, match="dead-letter"):
        route_dicom(
            make_context(artifacts={"contour": [artifact]}), RouteDicomParams(destination="tps")
        )
    assert [r.item_key for r in store.dead_letters()] == [artifact.sop_instance_uid]
    settings = Settings(home=tmp_path / "home", destinations={"tps": block})

    # still down: the item stays in the dead-letter list, with the replay's error
    [still_down] = replay_job(store, settings, host, job.id)
    assert not still_down.delivered and "cannot connect" in still_down.error
    assert still_down.status == "failed"
    [dead] = store.dead_letters()
    assert dead.last_error.startswith("replay: ") and dead.attempts == 2

    with kit.CountingSCP(tmp_path / "counted", port=port) as scp:
        [result] = replay_job(store, settings, host, job.id)
    assert result.delivered and result.error is None
    assert scp.received == [artifact.sop_instance_uid]
    assert store.dead_letters() == []
    [row] = store.deliveries_of(job.id)
    assert (row.status, row.attempts, row.destination) == ("delivered", 3, "tps")


def test_replay_to_a_destination_of_the_jobs_workflow(
    make_context, store, job, kit, tmp_path, test_data, host
):
    rtss = test_data / "dicompyler-core-example" / "rtss.dcm"
    artifact = kit.dicom_artifact(rtss)
    with kit.CountingSCP(tmp_path / "counted") as scp:
        make_context.add("tps", ae_title="COUNTER", host="127.0.0.1", port=scp.port)
        route_dicom(
            make_context(artifacts={"contour": [artifact]}), RouteDicomParams(destination="tps")
        )
    # the job's workflow defines `backup: {type: folder, path: backup}` (under home)
    backup = tmp_path / "home" / "backup"
    backup.mkdir(parents=True)
    settings = Settings(home=tmp_path / "home")
    [result] = replay_job(store, settings, host, job.id, destination="backup")
    assert result.delivered and result.destination == "backup"
    assert (backup / f"RTSTRUCT.{artifact.sop_instance_uid}.dcm").read_bytes() == rtss.read_bytes()
    rows = {r.destination: r for r in store.deliveries_of(job.id)}
    assert rows["backup"].status == "delivered" and rows["backup"].step_id == "send"
    assert rows["tps"].status == "delivered" and rows["tps"].attempts == 1


def test_replay_to_an_unknown_destination_is_refused_and_records_nothing(
    make_context, store, job, kit, tmp_path, test_data, host
):
    artifact = kit.dicom_artifact(test_data / "dicompyler-core-example" / "rtss.dcm")
    target = tmp_path / "out"
    target.mkdir()
    make_context.add("out", path=str(target))
    route_folder(
        make_context(artifacts={"contour": [artifact]}), RouteFolderParams(destination="out")
    )
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(RtautoError, match="--to pacs: destination 'pacs' is not defined"):
        replay_job(store, settings, host, job.id, destination="pacs")
    # a misspelt name leaves no dead letters behind for later replays to retry
    rows = {r.destination: r.status for r in store.deliveries_of(job.id)}
    assert rows == {"out": "delivered"}
    # a destination the configuration no longer has: each item says why, records unchanged
    [result] = replay_job(store, settings, host, job.id)
    assert not result.delivered and "'out' is not defined" in result.error
    assert {r.destination: r.status for r in store.deliveries_of(job.id)} == rows


def test_replay_of_an_unknown_job(store, tmp_path, host):
    with pytest.raises(RtautoError, match="no job"):
        replay_job(store, Settings(home=tmp_path), host, "deadbeef")


def test_job_destinations_take_the_daemon_config_over_the_workflow_defaults(tmp_path):
    settings = Settings(
        home=tmp_path,
        destinations={
            "tps": {"ae_title": "TPS", "host": "a", "port": 104},
            "backup": {"path": "x"},
        },
    )
    text = "destinations:\n  backup: {type: folder, path: y}\n  extra: {path: z}\n"
    merged = job_destinations(settings, text)
    assert merged["tps"].options()["host"] == "a"
    assert merged["backup"].options() == {"path": "x"}  # the site maps the name
    assert merged["backup"].resolved_type() == "folder"
    assert merged["extra"].options() == {"path": "z"}  # a name only the workflow defines
