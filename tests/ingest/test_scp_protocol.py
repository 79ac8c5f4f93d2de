"""The storage SCP's DICOM Upper Layer behaviour, for both implementations, with real peers:
association negotiation (contexts, transfer syntaxes, rejections, maximum PDU length),
release, aborts, timeouts, fragmented commands and data sets spread over many PDUs and PDVs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from rtauto.config import Settings
from rtauto.ingest.header import read_file_meta
from rtauto.ingest.scp import StorageSCP
from rtauto.store import Store
from rtauto.testing import SyntheticSeries, echoscu, storescu, wait_until

pytestmark = pytest.mark.integration

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
NOT_A_SYNTAX = "1.2.826.0.1.3680043.9.7.1"  # a UID that names no transfer syntax
NOT_A_SOP_CLASS = "1.2.826.0.1.3680043.9.7.2"  # a UID that names no SOP class


@pytest.fixture(params=["native", "pynetdicom"])
def implementation(request: pytest.FixtureRequest, settings: Settings) -> str:
    settings.scp.implementation = request.param
    return str(request.param)


@pytest.fixture
def start_scp(settings: Settings, store: Store, implementation: str) -> Iterator[object]:
    """Call it (after adjusting ``settings``) to start the SCP; returns the port."""
    servers: list[StorageSCP] = []

    def start() -> int:
        server = StorageSCP(settings, settings.database_url)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def spool_files(settings: Settings) -> list[Path]:
    return sorted(settings.spool_dir.glob("*/*/*.dcm"))


def dataset_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    meta = read_file_meta(data)
    assert meta is not None
    return data[meta.dataset_offset :]


def _associate(port: int, contexts: list, calling_ae: str = "PEER", called_ae: str = "RTAUTO"):
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = contexts
    return ae.associate("127.0.0.1", port, ae_title=called_ae)


def _wait_for(condition, patience: float = 60.0) -> bool:
    deadline = time.monotonic() + patience
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())


def _store_pdus(
    series: SyntheticSeries, index: int, context_id: int, fragment: int, per_pdu: int
) -> list[P_DATA]:
    """One C-STORE-RQ (command and data set) cut into PDVs of at most ``fragment`` bytes,
    ``per_pdu`` PDVs in each P-DATA-TF."""
    message = C_STORE_RQ()
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = series.sop_instance_uids[index]
    request.Priority = 0x0002
    request.MoveOriginatorApplicationEntityTitle = "MOVER"
    request.MoveOriginatorMessageID = 3
    request.DataSet = BytesIO(dataset_bytes(series.files[index]))
    message.primitive_to_message(request)
    values = [
        list(pdv)
        for pdata in message.encode_msg(context_id, fragment)
        for pdv in pdata.presentation_data_value_list
    ]
    pdus = []
    for start in range(0, len(values), per_pdu):
        pdata = P_DATA()
        pdata.presentation_data_value_list = values[start : start + per_pdu]
        pdus.append(pdata)
    return pdus


def test_release_and_verification(start_scp, settings: Settings):
    port = start_scp()
    assoc = _associate(port, [build_context(Verification)])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    # more than one message per association, from dcmtk: pynetdicom's requestor can take the
    # response to a second request for an unexpected message under load and time out
    assert echoscu(port, repeat=3)


@pytest.mark.parametrize(
    ("calling_ae", "called_ae", "reason"),
    [("INTRUDER", "RTAUTO", 0x03), ("TPS", "OTHER", 0x07)],
)
def test_rejections_carry_the_reason(
    start_scp, settings: Settings, calling_ae: str, called_ae: str, reason: int
):
    settings.scp.allowed_calling_ae_titles = ["TPS"]
    port = start_scp()
    assoc = _associate(port, [build_context(Verification)], calling_ae, called_ae)
    assert assoc.is_rejected
    answer = assoc.acceptor.primitive
    # rejected permanent, by the service user, calling/called AE title not recognised
    assert (answer.result, answer.result_source, answer.diagnostic) == (0x01, 0x01, reason)
    accepted = _associate(port, [build_context(Verification)], "TPS", "RTAUTO")
    assert accepted.is_established
    accepted.release()


def test_context_negotiation(
    start_scp, settings: Settings, ct_series: SyntheticSeries, implementation: str
):
    settings.scp.max_pdu = 8192
    port = start_scp()
    contexts = [
        build_context(CTImageStorage, [NOT_A_SYNTAX, EXPLICIT_LE, IMPLICIT_LE]),
        build_context(CTImageStorage, [JPEG_BASELINE]),
        build_context(MRImageStorage, [NOT_A_SYNTAX]),
        build_context(NOT_A_SOP_CLASS, [EXPLICIT_LE]),
        build_context(Verification),
    ]
    assoc = _associate(port, contexts)
    assert assoc.is_established
    try:
        accepted = {cx.context_id: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        # native: the first proposed syntax it supports; pynetdicom: the first in its own list
        first = EXPLICIT_LE if implementation == "native" else IMPLICIT_LE
        assert accepted == {1: first, 3: JPEG_BASELINE, 9: IMPLICIT_LE}
        rejected = {cx.context_id: cx.result for cx in assoc.rejected_contexts}
        # 0x04: transfer syntaxes not supported; 0x03: abstract syntax not supported
        assert rejected == {5: 0x04, 7: 0x03}
        assert assoc.acceptor.maximum_length == 8192
        # pynetdicom cuts the 64x64 CT into PDUs of at most 8192 bytes
        assert assoc.send_c_store(ct_series.files[0]).Status == 0x0000
    finally:
        assoc.release()
    [stored] = spool_files(settings)
    # pynetdicom re-encodes the data set in the accepted transfer syntax
    kept, sent = pydicom.dcmread(stored), pydicom.dcmread(ct_series.files[0])
    assert kept.file_meta.TransferSyntaxUID == first
    assert (kept.SOPInstanceUID, kept.PixelData) == (sent.SOPInstanceUID, sent.PixelData)


def test_small_pdus_from_dcmtk(start_scp, settings: Settings, store: Store, tmp_path: Path):
    from rtauto.testing import write_ct_series

    series = write_ct_series(tmp_path / "ct", rows=128, cols=128, slices=3)
    settings.scp.max_pdu = 4096  # a 32 KiB image travels in 9 PDUs
    port = start_scp()
    storescu(port, series.files)
    wait_until(lambda: store.counts()["instances"] == 3, timeout=30)  # indexed just after
    for sent, sop in zip(series.files, series.sop_instance_uids, strict=True):
        [stored] = settings.spool_dir.glob(f"*/*/{sop}.dcm")
        assert dataset_bytes(stored) == dataset_bytes(sent)


@pytest.mark.parametrize(("fragment", "per_pdu"), [(64, 5), (1000, 1), (700, 13)])
def test_fragmented_command_and_data_set_in_many_pdvs(
    start_scp, settings: Settings, store: Store, ct_series: SyntheticSeries, fragment, per_pdu
):
    port = start_scp()
    assoc = _associate(port, [build_context(CTImageStorage, [EXPLICIT_LE])])
    assert assoc.is_established
    [context] = assoc.accepted_contexts
    try:
        pdus = _store_pdus(ct_series, 0, context.context_id, fragment, per_pdu)
        if fragment == 64:  # the command set itself is split into several PDVs
            commands = [
                pdv for p in pdus for pdv in p.presentation_data_value_list if pdv[1][0] & 1
            ]
            assert len(commands) > 2
        # pause pynetdicom's reactor (as its own send_c_* do) so it does not take the response
        assoc._reactor_checkpoint.clear()
        assert _wait_for(lambda: assoc._is_paused)
        for pdata in pdus:
            assoc.dul.send_pdu(pdata)
        _context_id, response = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert response is not None
        assert response.Status == 0x0000
        assert response.MessageIDBeingRespondedTo == 7
        assert response.AffectedSOPInstanceUID == ct_series.sop_instance_uids[0]
    finally:
        assoc.release()
    [stored] = spool_files(settings)
    assert dataset_bytes(stored) == dataset_bytes(ct_series.files[0])
    wait_until(lambda: store.counts()["instances"] == 1, timeout=30)  # indexed just after


def test_abort_from_the_peer_mid_data_set_stores_nothing(
    start_scp, settings: Settings, store: Store, ct_series: SyntheticSeries
):
    port = start_scp()
    assoc = _associate(port, [build_context(CTImageStorage, [EXPLICIT_LE])])
    assert assoc.is_established
    [context] = assoc.accepted_contexts
    pdus = _store_pdus(ct_series, 1, context.context_id, 1000, 2)
    for pdata in pdus[: len(pdus) // 2]:
        assoc.dul.send_pdu(pdata)
    assoc.abort()
    assert assoc.is_aborted
    # the SCP goes on: the whole instance arrives over a new association
    storescu(port, ct_series.files[1:2])
    [stored] = spool_files(settings)
    assert stored.name == f"{ct_series.sop_instance_uids[1]}.dcm"
    assert dataset_bytes(stored) == dataset_bytes(ct_series.files[1])
    wait_until(lambda: store.counts()["instances"] == 1, timeout=30)  # indexed just after
    assert not list(settings.incoming_dir.iterdir())
    assert not list(settings.quarantine_dir.iterdir())
    # the unnamed file the aborted data set was being written into is released: only the
    # receiver's files prepared ahead stay open (the SCP runs in this process)
    wait_until(lambda: len(_open_unnamed_files(settings)) == 4, timeout=10)


def _open_unnamed_files(settings: Settings) -> list[str]:
    """This process's open unnamed files in the spool folder."""
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            targets.append(os.readlink(fd))
    return [t for t in targets if t.startswith(f"{settings.spool_dir}/#")]


def test_abort_from_the_peer_after_association(start_scp, settings: Settings):
    port = start_scp()
    assoc = _associate(port, [build_context(Verification)])
    assert assoc.is_established
    assoc.abort()
    assert echoscu(port)


def test_silent_peers_are_dropped_after_the_network_timeout(start_scp, settings: Settings):
    settings.scp.network_timeout = 1.0
    port = start_scp()
    # a connection that never sends an A-ASSOCIATE-RQ is closed (ARTIM)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=60) as silent,
        contextlib.suppress(ConnectionResetError),  # a reset is a close as well
    ):
        assert silent.recv(64) == b""
    # an association that goes idle is aborted
    assoc = _associate(port, [build_context(Verification)])
    assert assoc.is_established
    assert _wait_for(lambda: assoc.is_aborted or not assoc.is_established)
    assert not assoc.is_released
    assert echoscu(port)


def test_large_data_set_in_one_pdv(start_scp, settings: Settings, tmp_path: Path):
    from rtauto.testing import write_ct_series

    # 2900 x 2900 x 2 bytes: one PDV of ~16.8 MB (the SCP advertises no PDU limit), more
    # than the native receiver reads before it grows its buffer again
    series = write_ct_series(tmp_path / "big", rows=2900, cols=2900, slices=1)
    port = start_scp()
    assoc = _associate(port, [build_context(CTImageStorage, [EXPLICIT_LE])])
    assert assoc.is_established
    try:
        assert assoc.acceptor.maximum_length == 0
        assert assoc.send_c_store(series.files[0]).Status == 0x0000
    finally:
        assoc.release()
    [stored] = spool_files(settings)
    assert dataset_bytes(stored) == dataset_bytes(series.files[0])
