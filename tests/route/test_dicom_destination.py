"""The ``dicom`` destination type against real peers: Orthanc and pynetdicom SCPs."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage

from rtauto.errors import StepFailed, StepRetry
from rtauto.route.dicom import (
    DicomDestinationConfig,
    presentation_contexts,
    send_dicom,
    store_status_outcome,
)
from rtauto.testing import ReceivingSCP, free_port, write_ct_series


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, without preamble and file meta information."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def config_for(port: int, ae_title: str = "PEER", **extra: object) -> DicomDestinationConfig:
    return DicomDestinationConfig(ae_title=ae_title, host="127.0.0.1", port=port, **extra)


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    return write_ct_series(tmp_path / "ct", rows=64, cols=64, slices=6).files


def test_files_arrive_in_orthanc_unchanged(orthanc, test_data, ct_files, tmp_path):
    rtstruct = test_data / "dicompyler-core-example" / "rtss.dcm"
    rtplan = test_data / "dicompyler-core-example" / "rtplan.dcm"
    files = [*ct_files, rtstruct, rtplan]
    before = {f: f.read_bytes() for f in files}
    confirmed: list[Path] = []

    send_dicom(config_for(orthanc.dicom_port, orthanc.aet), files, on_delivered=confirmed.append)

    assert confirmed == files
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    stored = orthanc.instances()
    assert len(stored) == len(files)
    for orthanc_id in stored:
        tags = orthanc.get(f"/instances/{orthanc_id}/simplified-tags")
        original = sent.pop(tags["SOPInstanceUID"])
        received = tmp_path / f"{orthanc_id}.dcm"
        received.write_bytes(orthanc.get_bytes(f"/instances/{orthanc_id}/file"))
        # same transfer syntax, byte for byte the same dataset: nothing was re-encoded
        original_meta = pydicom.dcmread(original, stop_before_pixels=True).file_meta
        received_ds = pydicom.dcmread(received)
        assert received_ds.file_meta.TransferSyntaxUID == original_meta.TransferSyntaxUID
        assert dataset_bytes(received) == dataset_bytes(original)
        original_ds = pydicom.dcmread(original)
        assert received_ds.SOPClassUID == original_ds.SOPClassUID
        if "PixelData" in original_ds:
            assert received_ds.PixelData == original_ds.PixelData
            assert received_ds.ImagePositionPatient == original_ds.ImagePositionPatient
            assert received_ds.FrameOfReferenceUID == original_ds.FrameOfReferenceUID
    assert sent == {}
    # sending never touches the files it reads
    assert {f: f.read_bytes() for f in files} == before


def test_all_files_go_over_one_association(kit, tmp_path, ct_files, test_data):
    files = [*ct_files, test_data / "dicompyler-core-example" / "rtss.dcm"]
    with kit.CountingSCP(tmp_path / "counted") as scp:
        send_dicom(config_for(scp.port), files)
    assert scp.associations == 1
    assert len(scp.received) == len(files)
    # each file in its own transfer syntax (CT explicit, the RTSTRUCT implicit VR)
    assert scp.transfer_syntaxes == [ExplicitVRLittleEndian] * len(ct_files) + [
        ImplicitVRLittleEndian
    ]


def test_presentation_contexts_are_exactly_those_needed():
    contexts = presentation_contexts(
        [
            (CTImageStorage, ExplicitVRLittleEndian),
            (CTImageStorage, ExplicitVRLittleEndian),
            (CTImageStorage, JPEG2000Lossless),
            (RTStructureSetStorage, ImplicitVRLittleEndian),
        ]
    )
    pairs = [(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in contexts]
    assert pairs == [
        (CTImageStorage, (ExplicitVRLittleEndian,)),
        (CTImageStorage, (ImplicitVRLittleEndian,)),
        (CTImageStorage, (JPEG2000Lossless,)),
        (RTStructureSetStorage, (ImplicitVRLittleEndian,)),
        (RTStructureSetStorage, (ExplicitVRLittleEndian,)),
    ]


def test_too_many_presentation_contexts_is_refused():
    pairs = [(f"1.2.3.{n}", JPEG2000Lossless) for n in range(129)]
    with pytest.raises(StepFailed, match="129 presentation contexts"):
        presentation_contexts(pairs)


def test_compressed_file_is_sent_as_stored(kit, tmp_path, ct_files):
    if shutil.which("dcmcrle") is None:
        pytest.skip("dcmcrle (dcmtk) is not installed")
    rle = tmp_path / "rle.dcm"
    subprocess.run(["dcmcrle", str(ct_files[0]), str(rle)], check=True, capture_output=True)
    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == RLELossless
    with kit.CountingSCP(tmp_path / "counted", transfer_syntaxes=ALL_TRANSFER_SYNTAXES) as scp:
        send_dicom(config_for(scp.port), [rle])
    assert scp.transfer_syntaxes == [RLELossless]
    received = scp.folder / f"{scp.received[0]}.dcm"
    assert dataset_bytes(received) == dataset_bytes(rle)


def test_peer_without_the_needed_transfer_syntax_refuses_for_good(kit, tmp_path, ct_files):
    if shutil.which("dcmcrle") is None:
        pytest.skip("dcmcrle (dcmtk) is not installed")
    rle = tmp_path / "rle.dcm"
    subprocess.run(["dcmcrle", str(ct_files[0]), str(rle)], check=True, capture_output=True)
    scp = kit.CountingSCP(tmp_path / "counted", transfer_syntaxes=[ExplicitVRLittleEndian])
    with scp, pytest.raises(StepFailed, match="accepts none of the proposed"):
        send_dicom(config_for(scp.port), [rle])
    assert scp.received == []


def test_sop_class_the_peer_does_not_take_is_refused_and_the_rest_delivered(
    kit, tmp_path, ct_files, test_data
):
    rtplan = test_data / "dicompyler-core-example" / "rtplan.dcm"
    confirmed: list[Path] = []
    scp = kit.CountingSCP(tmp_path / "counted", sop_classes=[CTImageStorage])
    with scp, pytest.raises(StepFailed, match="rtplan.dcm: No presentation context"):
        send_dicom(config_for(scp.port), [rtplan, *ct_files], on_delivered=confirmed.append)
    assert confirmed == ct_files
    assert scp.associations == 1


def test_closed_port_is_transient(ct_files):
    with pytest.raises(StepRetry, match="cannot connect"):
        send_dicom(config_for(free_port(), timeout=5), ct_files[:1])


def test_a_port_that_accepts_but_never_answers_is_told_apart(ct_files):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never speaks DICOM
        port = silent.getsockname()[1]
        with pytest.raises(StepRetry, match="connected, but the association request got no"):
            send_dicom(config_for(port, timeout=2), ct_files[:1])


def test_out_of_resources_is_transient(tmp_path, ct_files):
    confirmed: list[Path] = []
    scp = ReceivingSCP(tmp_path / "refused", refuse=True)
    with scp, pytest.raises(StepRetry, match="0xA700"):
        send_dicom(config_for(scp.port), ct_files, on_delivered=confirmed.append)
    assert confirmed == []
    assert scp.received == []


def test_permanent_refusal_of_one_file_lets_the_others_through(kit, tmp_path, ct_files):
    confirmed: list[Path] = []
    with kit.CountingSCP(tmp_path / "counted") as scp:
        scp.on_store = lambda n: 0xA900 if n == 2 else None
        with pytest.raises(StepFailed, match=r"0xA900") as failure:
            send_dicom(config_for(scp.port), ct_files, on_delivered=confirmed.append)
    assert str(ct_files[1]) in str(failure.value)
    assert confirmed == [ct_files[0], *ct_files[2:]]
    assert scp.associations == 1


@pytest.mark.parametrize("warning", [0xB000, 0xB006, 0xB007])
def test_warning_status_counts_as_delivered(kit, tmp_path, ct_files, warning, caplog):
    confirmed: list[Path] = []
    with kit.CountingSCP(tmp_path / "counted") as scp:
        scp.on_store = lambda n: warning
        send_dicom(config_for(scp.port), ct_files[:2], on_delivered=confirmed.append)
    assert confirmed == ct_files[:2]
    assert f"0x{warning:04X}" in caplog.text


def test_association_rejected_permanently(kit, tmp_path, ct_files):
    scp = kit.CountingSCP(tmp_path / "counted", ae_title="TPS", require_called_aet=True)
    with scp, pytest.raises(StepFailed, match="rejected the association"):
        send_dicom(config_for(scp.port, ae_title="NOT_TPS"), ct_files[:1])
    assert scp.received == []


def test_association_rejected_transiently(kit, tmp_path, ct_files):
    with kit.CountingSCP(tmp_path / "counted", maximum_associations=1) as scp:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(CTImageStorage)
        held = holder.associate("127.0.0.1", scp.port, ae_title="COUNTER")
        assert held.is_established
        try:
            with pytest.raises(StepRetry, match="rejected the association for now"):
                send_dicom(config_for(scp.port), ct_files[:1])
        finally:
            held.release()
    assert scp.received == []


def test_peer_aborting_midway_is_transient(kit, tmp_path, ct_files):
    confirmed: list[Path] = []
    with kit.CountingSCP(tmp_path / "counted") as scp:
        server = scp

        def abort_third(n: int) -> int | None:
            if n == 3:
                for assoc in server.ae.active_associations:
                    assoc.abort()
                return 0xC000
            return None

        scp.on_store = abort_third
        with pytest.raises(StepRetry, match="no C-STORE response|association ended"):
            send_dicom(config_for(scp.port, timeout=10), ct_files, on_delivered=confirmed.append)
    assert confirmed == ct_files[:2]


def test_unreadable_file_is_reported_and_the_rest_delivered(kit, tmp_path, ct_files):
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    confirmed: list[Path] = []
    scp = kit.CountingSCP(tmp_path / "counted")
    with scp, pytest.raises(StepFailed, match="notes.txt: not a readable DICOM file"):
        send_dicom(config_for(scp.port), [text, *ct_files[:2]], on_delivered=confirmed.append)
    assert confirmed == ct_files[:2]


def test_tls_with_a_private_ca(kit, tmp_path, ct_files):
    tls = kit.make_tls_files(tmp_path / "tls")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls["cert"], tls["key"])
    with kit.CountingSCP(tmp_path / "counted", ssl_context=server_context) as scp:
        send_dicom(
            config_for(scp.port, tls={"ca_file": tls["ca"], "check_hostname": True}),
            ct_files[:2],
        )
        assert len(scp.received) == 2
        # a peer whose certificate we cannot verify gets nothing
        with pytest.raises(StepRetry, match="connected, but the TLS handshake"):
            send_dicom(config_for(scp.port, tls={}, timeout=5), ct_files[2:3])
    assert len(scp.received) == 2


def test_tls_hostname_check_can_be_turned_off(kit, tmp_path, ct_files):
    tls = kit.make_tls_files(tmp_path / "tls", names="DNS:pacs.elsewhere.example")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls["cert"], tls["key"])
    with kit.CountingSCP(tmp_path / "counted", ssl_context=server_context) as scp:
        with pytest.raises(StepRetry):
            send_dicom(config_for(scp.port, tls={"ca_file": tls["ca"]}, timeout=5), ct_files[:1])
        assert scp.received == []
        unchecked = {"ca_file": tls["ca"], "check_hostname": False}
        send_dicom(config_for(scp.port, tls=unchecked), ct_files[:1])
    assert len(scp.received) == 1


def test_status_outcomes():
    assert store_status_outcome(0x0000) == "delivered"
    for warning in (0xB000, 0xB006, 0xB007, 0x0107):
        assert store_status_outcome(warning) == "warning"
    for transient in (0xA700, 0xA7FF, 0x0213):
        assert store_status_outcome(transient) == "transient"
    for permanent in (0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0122, 0x0124):
        assert store_status_outcome(permanent) == "permanent"


def test_config_validation():
    with pytest.raises(ValidationError, match="port"):
        DicomDestinationConfig.model_validate({"ae_title": "TPS", "host": "tps"})
    with pytest.raises(ValidationError, match="ae_title"):
        DicomDestinationConfig.model_validate({"ae_title": "A" * 17, "host": "h", "port": 104})
    with pytest.raises(ValidationError, match="cert_file"):
        DicomDestinationConfig.model_validate(
            {"ae_title": "TPS", "host": "h", "port": 104, "tls": {"key_file": "k.pem"}}
        )
    config = DicomDestinationConfig.model_validate({"ae_title": "TPS", "host": "h", "port": 104})
    assert config.calling_ae_title == "RTAUTO"
