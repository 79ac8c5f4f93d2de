"""The ``dicomweb`` destination type (STOW-RS) against a real Orthanc with its DICOMweb plugin."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError
from pynetdicom.dsutils import split_dataset

from rtauto.errors import StepFailed, StepRetry
from rtauto.route.dicomweb import DicomWebDestinationConfig, send_dicomweb
from rtauto.route.steps import RouteSendParams, route_send
from rtauto.steps import Artifact
from rtauto.testing import DICOMWEB_PLUGIN, OrthancServer, free_port, write_ct_series


def dataset_bytes(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def require_dicomweb_plugin() -> None:
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (`make install` installs it)")


@pytest.fixture
def dicomweb_orthanc(tmp_path: Path):
    require_dicomweb_plugin()
    with OrthancServer(tmp_path / "orthanc-web", dicomweb=True) as server:
        yield server


def test_stow_rs_delivers_byte_for_byte_in_batches(dicomweb_orthanc, test_data, tmp_path):
    ct = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=5).files
    rtstruct = test_data / "dicompyler-core-example" / "rtss.dcm"
    files = [*ct, rtstruct]
    confirmed: list[Path] = []
    config = DicomWebDestinationConfig(url=dicomweb_orthanc.dicomweb_url, batch=2)
    send_dicomweb(config, files, on_delivered=confirmed.append)
    assert sorted(confirmed) == sorted(files)
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    stored = dicomweb_orthanc.instances()
    assert len(stored) == len(files)
    for orthanc_id in stored:
        received = tmp_path / f"{orthanc_id}.dcm"
        received.write_bytes(dicomweb_orthanc.get_bytes(f"/instances/{orthanc_id}/file"))
        uid = str(pydicom.dcmread(received, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(received) == dataset_bytes(sent.pop(uid))
    assert sent == {}


def test_route_send_stows_only_dicom_and_records_deliveries(
    dicomweb_orthanc, make_context, store, job, test_data, tmp_path
):
    rtstruct = test_data / "dicompyler-core-example" / "rtss.dcm"
    report = tmp_path / "jobs" / job.id / "check-1" / "report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("{}")
    make_context.add("pacs", type="dicomweb", url=dicomweb_orthanc.dicomweb_url)
    artifacts = {
        "contour": [Artifact(rtstruct, "RTSTRUCT", modality="RTSTRUCT")],
        "check": [Artifact(report, "report-json")],
    }
    result = route_send(make_context(artifacts=artifacts), RouteSendParams(destination="pacs"))
    assert result.outputs["delivered"] == 1
    assert dicomweb_orthanc.sop_instance_uids() == [
        str(pydicom.dcmread(rtstruct, stop_before_pixels=True).SOPInstanceUID)
    ]
    [row] = [d for d in store.deliveries_of(job.id) if d.destination == "pacs"]
    assert row.status == "delivered"
    # a second run of the step sends nothing again
    again = route_send(make_context(artifacts=artifacts), RouteSendParams(destination="pacs"))
    assert again.outputs == {"delivered": 0, "destination": "pacs", "already_delivered": 1}


def test_basic_authentication_from_an_environment_variable(tmp_path, monkeypatch):
    require_dicomweb_plugin()
    ct = write_ct_series(tmp_path / "ct", rows=16, cols=16, slices=2).files
    with OrthancServer(tmp_path / "locked", dicomweb=True, users={"rt": "s3cret"}) as server:
        config = DicomWebDestinationConfig(
            url=server.dicomweb_url, username="rt", password_env="RTAUTO_TEST_PACS_PASSWORD"
        )
        with pytest.raises(StepFailed, match="RTAUTO_TEST_PACS_PASSWORD"):
            send_dicomweb(config, ct)
        monkeypatch.setenv("RTAUTO_TEST_PACS_PASSWORD", "wrong")
        with pytest.raises(StepFailed, match="HTTP 401 .authentication"):
            send_dicomweb(config, ct)
        assert server.instances() == []
        monkeypatch.setenv("RTAUTO_TEST_PACS_PASSWORD", "s3cret")
        send_dicomweb(config, ct)
        assert len(server.instances()) == 2


def test_unreachable_service_is_transient_and_bad_config_is_refused(tmp_path):
    ct = write_ct_series(tmp_path / "ct", rows=8, cols=8, slices=1).files
    down = DicomWebDestinationConfig(url=f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(StepRetry, match="unreachable.*1 instance"):
        send_dicomweb(down, ct)
    with pytest.raises(ValidationError):
        DicomWebDestinationConfig(url="ftp://pacs")
    with pytest.raises(ValidationError, match="go together"):
        DicomWebDestinationConfig(url="http://pacs", username="rt")
    with pytest.raises(ValidationError, match="not both"):
        DicomWebDestinationConfig(url="http://pacs", username="rt", password_env="P", token_env="T")


def test_a_wrong_url_is_a_refusal_not_a_retry(dicomweb_orthanc, tmp_path):
    ct = write_ct_series(tmp_path / "ct", rows=8, cols=8, slices=1).files
    config = DicomWebDestinationConfig(url=dicomweb_orthanc.url + "/no-such-service")
    with pytest.raises(StepFailed, match="HTTP 404"):
        send_dicomweb(config, ct)


def test_instances_the_service_lists_as_failed_are_refused_the_rest_delivered(tmp_path):
    """A 202 answer naming one instance in its Failed SOP Sequence (PS3.18 10.5.3): the
    others count as delivered, the failed one is refused with its Failure Reason. (A small
    HTTP server gives that answer: Orthanc cannot be made to refuse a valid instance.)"""
    ct = write_ct_series(tmp_path / "ct", rows=8, cols=8, slices=3).files
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ct]

    def item(uid: str, reason: int | None = None) -> dict:
        found = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            found["00081197"] = {"vr": "US", "Value": [reason]}
        return found

    class Stow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            assert body.count(b"Content-Type: application/dicom") == 3
            answer = {
                "00081199": {"vr": "SQ", "Value": [item(uids[0]), item(uids[2])]},
                "00081198": {"vr": "SQ", "Value": [item(uids[1], 0xA700)]},
            }
            data = json.dumps(answer).encode()
            self.send_response(202)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = DicomWebDestinationConfig(url=f"http://127.0.0.1:{server.server_port}")
        confirmed: list[Path] = []
        with pytest.raises(StepFailed, match=rf"{uids[1]}: refused \(Failure Reason 0xa700\)"):
            send_dicomweb(config, ct, on_delivered=confirmed.append)
        assert confirmed == [ct[0], ct[2]]
    finally:
        server.shutdown()
        server.server_close()
