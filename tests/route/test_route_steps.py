"""The routing steps with a real job store and real peers: records, retries, alternates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydantic import BaseModel, ValidationError

from rtauto.destinations import DestinationType
from rtauto.errors import StepFailed, StepRetry
from rtauto.hooks import build_plugin_manager
from rtauto.route.steps import (
    RouteDicomParams,
    RouteFolderParams,
    RouteSendParams,
    route_dicom,
    route_folder,
    route_send,
)
from rtauto.steps import Artifact
from rtauto.testing import ReceivingSCP, free_port, write_ct_series


@pytest.fixture
def rtstruct(test_data: Path) -> Path:
    return test_data / "dicompyler-core-example" / "rtss.dcm"


@pytest.fixture
def rtplan(test_data: Path) -> Path:
    return test_data / "dicompyler-core-example" / "rtplan.dcm"


@pytest.fixture
def report(tmp_path: Path, job) -> Artifact:
    path = tmp_path / "jobs" / job.id / "check-1" / "report.json"  # in the check step's workdir
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"passed": true}')
    return Artifact(path=path, kind="report-json")


def rows_by_destination(store, job_id):
    found: dict[str, list] = {}
    for row in store.deliveries_of(job_id):
        found.setdefault(row.destination, []).append(row)
    return found


def test_plugin_registers_the_steps_and_destination_types():
    host = build_plugin_manager(autoload=False)
    assert {"route.dicom", "route.folder", "route.send"} <= set(host.steps)
    assert {"dicom", "folder"} <= set(host.destination_types)
    assert host.steps["route.dicom"].plugin == "route"


def test_params():
    params = RouteDicomParams.model_validate(
        {"destination": "tps", "from": ["contour"], "modalities": ["RTSTRUCT"]}
    )
    assert params.from_ == ["contour"]
    with pytest.raises(ValidationError, match="extra"):
        RouteDicomParams.model_validate({"destination": "tps", "destinaton": "x"})
    with pytest.raises(ValidationError, match="send"):
        RouteDicomParams.model_validate({"destination": "tps", "send": "everything"})
    with pytest.raises(ValidationError, match="exactly one of path or destination"):
        RouteFolderParams.model_validate({})
    with pytest.raises(ValidationError, match="exactly one of path or destination"):
        RouteFolderParams.model_validate({"path": "/x", "destination": "y"})


def test_route_dicom_delivers_to_orthanc_and_records_it(
    orthanc, make_context, store, job, kit, rtstruct, report
):
    make_context.add("tps", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
    artifact = kit.dicom_artifact(rtstruct)
    ctx = make_context(artifacts={"contour": [artifact, report]})

    result = route_dicom(ctx, RouteDicomParams(destination="tps"))

    assert result.outputs == {"delivered": 1, "destination": "tps", "already_delivered": 0}
    assert orthanc.sop_instance_uids() == [artifact.sop_instance_uid]
    [row] = store.deliveries_of(job.id)
    assert (row.item_key, row.destination, row.status) == (
        artifact.sop_instance_uid,
        "tps",
        "delivered",
    )
    assert row.step_id == "send" and row.attempts == 1 and row.delivered_at is not None


def test_delivered_items_are_not_sent_again(make_context, store, job, kit, tmp_path):
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=4)
    artifacts = [kit.dicom_artifact(f) for f in series.files]
    with kit.CountingSCP(tmp_path / "counted") as scp:
        make_context.add("tps", ae_title="COUNTER", host="127.0.0.1", port=scp.port)
        params = RouteDicomParams(destination="tps")
        first = route_dicom(make_context(artifacts={"contour": artifacts}), params)
        again = route_dicom(make_context(artifacts={"contour": artifacts}, attempt=2), params)
    assert first.outputs["delivered"] == 4
    assert again.outputs == {"delivered": 0, "destination": "tps", "already_delivered": 4}
    assert sorted(scp.received) == sorted(series.sop_instance_uids)
    assert scp.associations == 1  # the second run did not even connect


def test_partial_delivery_then_rerun_sends_only_the_rest(make_context, store, job, kit, tmp_path):
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=5)
    artifacts = [kit.dicom_artifact(f) for f in series.files]
    with kit.CountingSCP(tmp_path / "counted") as scp:
        make_context.add("tps", ae_title="COUNTER", host="127.0.0.1", port=scp.port)
        scp.on_store = lambda n: 0xA700 if n == 3 else None  # out of resources at the third
        params = RouteDicomParams(destination="tps")
        with pytest.raises(StepRetry, match="0xA700"):
            route_dicom(make_context(artifacts={"contour": artifacts}, max_attempts=3), params)
        statuses = [r.status for r in store.deliveries_of(job.id)]
        assert statuses == ["delivered", "delivered", "failed", "failed", "failed"]
        again = route_dicom(
            make_context(artifacts={"contour": artifacts}, attempt=2, max_attempts=3), params
        )
    assert again.outputs == {"delivered": 3, "destination": "tps", "already_delivered": 2}
    assert scp.received == series.sop_instance_uids  # each exactly once, in order
    assert [r.attempts for r in store.deliveries_of(job.id)] == [1, 1, 2, 2, 2]


def test_destination_down_asks_for_a_retry(make_context, store, job, kit, rtstruct, tmp_path):
    make_context.add("tps", ae_title="TPS", host="127.0.0.1", port=free_port(), timeout=5)
    make_context.add("backup", path=str(tmp_path))  # alternates wait for the last attempt
    ctx = make_context(artifacts={"contour": [kit.dicom_artifact(rtstruct)]}, max_attempts=3)
    with pytest.raises(StepRetry, match="tps: .*cannot connect"):
        route_dicom(ctx, RouteDicomParams(destination="tps", alternates=["backup"]))
    [row] = store.deliveries_of(job.id)
    assert (row.status, row.attempts, row.destination) == ("failed", 1, "tps")
    assert "cannot connect" in row.last_error
    assert store.dead_letters() == []
    assert not list(tmp_path.glob("RTSTRUCT.*"))


def test_alternate_used_on_the_last_attempt(make_context, store, job, kit, rtstruct, tmp_path):
    make_context.add("tps", ae_title="TPS", host="127.0.0.1", port=free_port(), timeout=5)
    artifact = kit.dicom_artifact(rtstruct)
    with kit.CountingSCP(tmp_path / "counted") as scp:
        make_context.add("backup", ae_title="COUNTER", host="127.0.0.1", port=scp.port)
        ctx = make_context(artifacts={"contour": [artifact]}, attempt=3, max_attempts=3)
        result = route_dicom(ctx, RouteDicomParams(destination="tps", alternates=["backup"]))
    assert result.outputs == {"delivered": 1, "destination": "backup", "already_delivered": 0}
    assert scp.received == [artifact.sop_instance_uid]
    rows = rows_by_destination(store, job.id)
    assert [r.status for r in rows["tps"]] == ["failed"]
    assert [r.status for r in rows["backup"]] == ["delivered"]
    # run once more (a crash after the delivery): delivered to the alternate counts
    ctx = make_context(artifacts={"contour": [artifact]}, attempt=3, max_attempts=3)
    again = route_dicom(ctx, RouteDicomParams(destination="tps", alternates=["backup"]))
    assert again.outputs == {"delivered": 0, "destination": "backup", "already_delivered": 1}


def test_permanent_refusal_goes_to_the_alternate_at_once(
    make_context, store, job, kit, rtstruct, tmp_path
):
    artifact = kit.dicom_artifact(rtstruct)
    refusing = kit.CountingSCP(tmp_path / "refusing")
    refusing.on_store = lambda n: 0xA900
    with refusing, kit.CountingSCP(tmp_path / "counted") as scp:
        make_context.add("tps", ae_title="COUNTER", host="127.0.0.1", port=refusing.port)
        make_context.add("backup", ae_title="COUNTER", host="127.0.0.1", port=scp.port)
        ctx = make_context(artifacts={"contour": [artifact]}, attempt=1, max_attempts=5)
        result = route_dicom(ctx, RouteDicomParams(destination="tps", alternates=["backup"]))
    assert result.outputs["destination"] == "backup"
    assert scp.received == [artifact.sop_instance_uid]


def test_dead_letters_when_every_destination_fails(
    make_context, store, job, kit, rtstruct, rtplan, tmp_path
):
    artifacts = [kit.dicom_artifact(rtstruct), kit.dicom_artifact(rtplan)]
    make_context.add("tps", ae_title="TPS", host="127.0.0.1", port=free_port(), timeout=5)
    with ReceivingSCP(tmp_path / "refusing", refuse=True) as refusing:
        make_context.add("backup", ae_title="RECEIVER", host="127.0.0.1", port=refusing.port)
        ctx = make_context(artifacts={"contour": artifacts}, attempt=2, max_attempts=2)
        with pytest.raises(StepFailed) as failure:
            route_dicom(ctx, RouteDicomParams(destination="tps", alternates=["backup"]))
    message = str(failure.value)
    assert "2 of 2 item(s)" in message and "dead-letter" in message
    assert "tps: " in message and "cannot connect" in message
    assert "backup: " in message and "0xA700" in message
    dead = store.dead_letters()
    assert sorted(r.item_key for r in dead) == sorted(a.sop_instance_uid for a in artifacts)
    assert {r.destination for r in dead} == {"tps"}
    assert [r.status for r in rows_by_destination(store, job.id)["backup"]] == ["failed", "failed"]


def test_send_inputs_with_a_modality_filter(
    make_context, store, job, kit, rtstruct, rtplan, tmp_path
):
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=3)
    with kit.CountingSCP(tmp_path / "counted") as scp:
        make_context.add("tps", ae_title="COUNTER", host="127.0.0.1", port=scp.port)
        ctx = make_context(inputs=[*series.files, rtstruct, rtplan])
        params = RouteDicomParams(destination="tps", send="inputs", modalities=["rtstruct"])
        result = route_dicom(ctx, params)
    assert result.outputs["delivered"] == 1
    assert scp.received == [str(pydicom.dcmread(rtstruct).SOPInstanceUID)]


def test_send_both_from_named_steps(make_context, store, job, kit, rtstruct, rtplan, tmp_path):
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=2)
    with kit.CountingSCP(tmp_path / "counted") as scp:
        make_context.add("tps", ae_title="COUNTER", host="127.0.0.1", port=scp.port)
        ctx = make_context(
            artifacts={
                "contour": [kit.dicom_artifact(rtstruct)],
                "plan": [kit.dicom_artifact(rtplan)],
            },
            inputs=series.files,
        )
        params = RouteDicomParams.model_validate(
            {"destination": "tps", "send": "both", "from": ["contour"]}
        )
        result = route_dicom(ctx, params)
    assert result.outputs["delivered"] == 3
    assert sorted(scp.received) == sorted(
        [str(pydicom.dcmread(rtstruct).SOPInstanceUID), *series.sop_instance_uids]
    )


def test_from_an_unknown_step_fails(make_context, kit, rtstruct):
    make_context.add("tps", ae_title="TPS", host="127.0.0.1", port=104)
    ctx = make_context(artifacts={"contour": [kit.dicom_artifact(rtstruct)]})
    params = RouteDicomParams.model_validate({"destination": "tps", "from": ["countour"]})
    with pytest.raises(StepFailed, match="countour"):
        route_dicom(ctx, params)


def test_unknown_or_invalid_destinations_fail_clearly(make_context, kit, rtstruct):
    ctx = make_context(artifacts={"contour": [kit.dicom_artifact(rtstruct)]})
    with pytest.raises(StepFailed, match="'tps' is not defined"):
        route_dicom(ctx, RouteDicomParams(destination="tps"))
    make_context.add("tps", ae_title="TPS", host="tps.local")
    ctx = make_context(artifacts={"contour": [kit.dicom_artifact(rtstruct)]})
    with pytest.raises(StepFailed, match="'tps' is invalid: port"):
        route_dicom(ctx, RouteDicomParams(destination="tps"))
    make_context.add("share", path="/srv/share")
    ctx = make_context(artifacts={"contour": [kit.dicom_artifact(rtstruct)]})
    with pytest.raises(StepFailed, match="needs a 'dicom' destination"):
        route_dicom(ctx, RouteDicomParams(destination="share"))
    make_context.add("pacs", type="xnat", url="https://pacs/")
    ctx = make_context(artifacts={"contour": [kit.dicom_artifact(rtstruct)]})
    with pytest.raises(StepFailed, match="'xnat', which no installed plugin provides"):
        route_send(ctx, RouteSendParams(destination="pacs"))


def test_route_folder_by_path_copies_reports_and_dicom(
    make_context, store, job, kit, rtstruct, report, tmp_path
):
    target = tmp_path / "home" / "exports"
    target.mkdir(parents=True)
    artifact = kit.dicom_artifact(rtstruct)
    ctx = make_context(artifacts={"contour": [artifact], "check": [report]})
    result = route_folder(ctx, RouteFolderParams(path="exports"))  # relative: under home
    assert result.outputs["delivered"] == 2
    assert result.outputs["destination"] == f"folder:{target}"
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["report.json", f"RTSTRUCT.{artifact.sop_instance_uid}.dcm"]
    )
    keys = sorted(r.item_key for r in store.deliveries_of(job.id))
    assert keys == sorted([artifact.sop_instance_uid, "file:check-1/report.json"])


def test_route_folder_by_name_with_a_modality_filter(make_context, kit, rtstruct, rtplan, tmp_path):
    target = tmp_path / "share"
    target.mkdir()
    make_context.add("share", path=str(target), layout="by-series")
    ctx = make_context(
        artifacts={"contour": [kit.dicom_artifact(rtstruct), kit.dicom_artifact(rtplan)]},
        store=False,
    )
    params = RouteFolderParams(destination="share", modalities=["RTPLAN"])
    result = route_folder(ctx, params)
    assert result.outputs["delivered"] == 1
    plan = pydicom.dcmread(rtplan)
    assert (target / plan.SeriesInstanceUID / f"RTPLAN.{plan.SOPInstanceUID}.dcm").is_file()
    assert len(list(target.rglob("*.dcm"))) == 1


def test_a_named_folder_destination_with_a_relative_path_is_made_under_home(
    make_context, kit, rtstruct, tmp_path
):
    # relative: inside rtauto's own home, a missing folder cannot be a share not mounted
    make_context.add("results", path="autocontour-results")
    ctx = make_context(artifacts={"contour": [kit.dicom_artifact(rtstruct)]}, store=False)
    result = route_folder(ctx, RouteFolderParams(destination="results"))
    assert result.outputs["delivered"] == 1
    assert len(list((tmp_path / "home" / "autocontour-results").glob("*.dcm"))) == 1


def test_route_send_to_a_dicom_destination_sends_only_dicom(
    make_context, kit, rtstruct, report, tmp_path
):
    with kit.CountingSCP(tmp_path / "counted") as scp:
        make_context.add("tps", ae_title="COUNTER", host="127.0.0.1", port=scp.port)
        ctx = make_context(artifacts={"contour": [kit.dicom_artifact(rtstruct), report]})
        result = route_send(ctx, RouteSendParams(destination="tps"))
    assert result.outputs["delivered"] == 1
    assert len(scp.received) == 1


def test_nothing_to_deliver(make_context, kit, report, tmp_path):
    make_context.add("tps", ae_title="TPS", host="127.0.0.1", port=free_port())
    result = route_dicom(
        make_context(artifacts={"check": [report]}), RouteDicomParams(destination="tps")
    )
    assert result.outputs == {"delivered": 0, "destination": "tps", "already_delivered": 0}
    assert result.summary == "nothing to deliver"


class ArchiveConfig(BaseModel):
    model_config = {"extra": "forbid"}
    folder: Path


def archive_send(config: ArchiveConfig, files) -> None:
    """A vendor's destination type: no per-file progress, all or nothing."""
    for path in files:
        shutil.copy(path, config.folder / Path(path).name)


def test_route_send_to_a_plugin_destination_type(make_context, store, job, kit, report, tmp_path):
    archive = DestinationType(name="archive", config=ArchiveConfig, send=archive_send)
    (tmp_path / "archive").mkdir()
    make_context.add("vault", type="archive", folder=str(tmp_path / "archive"))
    ctx = make_context(artifacts={"check": [report]})
    ctx.destination_types = {"archive": archive}
    result = route_send(ctx, RouteSendParams(destination="vault"))
    assert result.outputs == {"delivered": 1, "destination": "vault", "already_delivered": 0}
    assert (tmp_path / "archive" / "report.json").read_text() == '{"passed": true}'
    [row] = store.deliveries_of(job.id)
    assert (row.destination, row.status) == ("vault", "delivered")
