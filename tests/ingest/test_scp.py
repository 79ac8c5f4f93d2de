"""The storage SCP against real peers: dcmtk storescu/echoscu and a pynetdicom SCU.

Every test starts rtauto's StorageSCP on a free loopback port (``settings.scp.port = 0``), once
with each implementation (rtauto's native receiver and pynetdicom).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, SpatialRegistrationStorage

from rtauto.config import Settings
from rtauto.ingest.header import build_file_meta, read_file_meta
from rtauto.ingest.scp import StorageSCP, storage_contexts
from rtauto.store import Store
from rtauto.testing import (
    SyntheticSeries,
    echoscu,
    require_tool,
    storescu,
    wait_until,
    write_ct_series,
)
from rtauto.uids import new_uid

pytestmark = pytest.mark.integration

EXPLICIT_LE = "1.2.840.10008.1.2.1"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"


@pytest.fixture(autouse=True, params=["native", "pynetdicom"])
def implementation(request: pytest.FixtureRequest, settings: Settings) -> str:
    """Every test runs against both network layers of the SCP."""
    settings.scp.implementation = request.param
    return str(request.param)


@pytest.fixture
def scp(settings: Settings, store: Store) -> Iterator[int]:
    """rtauto's storage SCP in this process; yields its port."""
    server = StorageSCP(settings, settings.database_url)
    port = server.start()
    yield port
    server.stop()


def dataset_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    meta = read_file_meta(data)
    assert meta is not None
    return data[meta.dataset_offset :]


def spool_files(settings: Settings) -> list[Path]:
    return sorted(settings.spool_dir.glob("*/*/*.dcm"))


def reasons(settings: Settings) -> list[dict]:
    return [json.loads(p.read_text()) for p in settings.quarantine_dir.glob("*.json")]


def send_raw(
    port: int, folder: Path, payload: bytes, sop_instance_uid: str, calling_ae: str = "MISBEHAVING"
) -> Dataset:
    """C-STORE ``payload`` as the data set, byte for byte, as a faulty sender would: pynetdicom
    streams a file's data set unparsed when ``STORE_SEND_CHUNKED_DATASET`` is set."""
    path = folder / f"{new_uid()}.raw"
    path.write_bytes(build_file_meta(CTImageStorage, sop_instance_uid, EXPLICIT_LE) + payload)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTAUTO")
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def test_series_is_durable_and_indexed(
    settings: Settings, store: Store, scp: int, ct_series: SyntheticSeries
):
    storescu(scp, ct_series.files, calling_ae="CT_SIM")
    files = spool_files(settings)
    assert len(files) == len(ct_series.files)
    # acknowledged = durable in the spool; the index rows follow from the indexer thread
    wait_until(lambda: store.counts()["instances"] == len(files), timeout=30)
    assert store.instance_paths() == {str(f.relative_to(settings.spool_dir)) for f in files}
    for sent, sop in zip(ct_series.files, ct_series.sop_instance_uids, strict=True):
        stored = (
            settings.spool_dir
            / ct_series.study_instance_uid
            / ct_series.series_instance_uid
            / f"{sop}.dcm"
        )
        assert dataset_bytes(stored) == dataset_bytes(sent)
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.SourceApplicationEntityTitle == "CT_SIM"
    series = store.get_series(ct_series.series_instance_uid)
    assert series is not None
    assert (series.instance_count, series.modality, series.source) == (8, "CT", "scp")
    assert (series.calling_ae, series.called_ae) == ("CT_SIM", "RTAUTO")
    assert series.attributes["SeriesDescription"] == "Planning CT"
    assert not list(settings.incoming_dir.iterdir())


def test_resent_series_is_idempotent(
    settings: Settings, store: Store, scp: int, ct_series: SyntheticSeries
):
    storescu(scp, ct_series.files)
    first = {f: f.stat().st_ino for f in spool_files(settings)}
    result = storescu(scp, ct_series.files)
    assert result.returncode == 0
    assert {f: f.stat().st_ino for f in spool_files(settings)} == first
    wait_until(lambda: store.counts()["instances"] == len(ct_series.files), timeout=30)
    time.sleep(0.5)  # nothing more arrives: a re-sent instance is not indexed twice
    assert store.counts()["instances"] == len(ct_series.files)
    assert not list(settings.quarantine_dir.iterdir())


def test_bad_inputs_are_quarantined_and_echo_still_answers(
    settings: Settings, store: Store, scp: int, ct_series: SyntheticSeries, tmp_path: Path
):
    good = dataset_bytes(ct_series.files[0])
    no_sop = pydicom.dcmread(ct_series.files[1])
    del no_sop.SOPInstanceUID
    buffer = BytesIO()
    no_sop.save_as(buffer, enforce_file_format=True)
    no_sop_bytes = buffer.getvalue()[read_file_meta(buffer.getvalue()).dataset_offset :]
    traversal = "1.2.3.4/../../../etc/passwd"
    cases = [
        (good[:-3000], ct_series.sop_instance_uids[0], 0xC000, "truncated"),
        (b"Patient notes, not DICOM.\n" * 40, new_uid(), 0xC000, "not DICOM"),
        (good, new_uid(), 0xA900, "SOPInstanceUID"),  # not the UID of the request
        (no_sop_bytes, ct_series.sop_instance_uids[1], 0xA900, "missing SOPInstanceUID"),
    ]
    for payload, sop, status, comment in cases:
        response = send_raw(scp, tmp_path, payload, sop)
        assert response.Status == status
        assert response.ErrorComment.startswith(comment)
    # a sender whose request and data set carry the ../ UID (pynetdicom reads it from the file)
    evil = pydicom.dcmread(ct_series.files[2])
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        evil.SOPInstanceUID = traversal
        evil.file_meta.MediaStorageSOPInstanceUID = traversal
        evil_path = settings.home / "evil.dcm"
        evil.save_as(evil_path)
    ae = AE(ae_title="MISBEHAVING")
    ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", scp, ae_title="RTAUTO")
    response = assoc.send_c_store(evil_path)
    assoc.release()
    assert response.Status == 0xA900
    assert echoscu(scp)
    found = sorted(r["reason"] for r in reasons(settings))
    assert len(found) == 5
    assert any(r.startswith("truncated: element (7FE0,0010)") for r in found)
    assert any(r.startswith("not DICOM") for r in found)
    assert any("differs from" in r for r in found)  # data set UID is not the request's
    assert "missing SOPInstanceUID (0008,0018)" in found
    assert f"SOPInstanceUID {traversal!r} is not a valid DICOM UID" in found
    assert all(r["calling_ae"] == "MISBEHAVING" and r["source"] == "scp" for r in reasons(settings))
    assert spool_files(settings) == []
    assert store.counts()["instances"] == 0
    assert not any(settings.home.rglob("passwd"))
    # and the SCP still stores good data
    storescu(scp, ct_series.files[:1])
    assert len(spool_files(settings)) == 1


def test_refused_c_stores_are_counted(
    settings: Settings, store: Store, ct_series: SyntheticSeries, tmp_path: Path
):
    server = StorageSCP(settings, settings.database_url)
    port = server.start()
    try:
        response = send_raw(port, tmp_path, b"Patient notes, not DICOM.\n" * 40, new_uid())
        assert response.Status == 0xC000
        storescu(port, ct_series.files[:2])
        storescu(port, ct_series.files[:2])  # again: answered success, stored once
        counted = server.counters()
    finally:
        server.stop()
    assert counted == {
        "associations_accepted": 3,
        "associations_rejected": 0,
        "instances_stored": 4,
        "instances_refused": 1,
        "instances_not_stored": 0,
        "bytes_received": 2 * sum(len(dataset_bytes(f)) for f in ct_series.files[:2]),
    }
    # the next start counts afresh
    again = StorageSCP(settings, settings.database_url)
    again.start()
    try:
        assert set(again.counters().values()) == {0}
    finally:
        again.stop()


def test_associations_over_the_limit_are_refused_and_counted(
    settings: Settings, store: Store, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("rtauto.ingest.scp._MAX_ASSOCIATIONS", 1)
    server = StorageSCP(settings, settings.database_url)
    port = server.start()
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", port, ae_title="RTAUTO")
        assert held.is_established
        try:
            assert not echoscu(port)  # a second association is one too many
        finally:
            held.release()
        assert wait_until(lambda: echoscu(port), timeout=10)  # room again once it is released
        counted = server.counters()
    finally:
        server.stop()
    assert counted["associations_rejected"] >= 1
    assert counted["associations_accepted"] == 2


def test_below_the_free_space_reserve_c_stores_get_out_of_resources(
    settings: Settings, store: Store, ct_series: SyntheticSeries, tmp_path: Path
):
    from rtauto.ingest.spool import free_bytes

    settings.min_free_mb = free_bytes(settings.home) / 1e6 + 1e6  # more than there is
    server = StorageSCP(settings, settings.database_url)
    port = server.start()
    try:
        sent = storescu(port, ct_series.files[:3], extra=["-v"], check=False)
        assert sent.returncode != 0
        assert "Received Store Response (Refused: OutOfResources)" in sent.stdout + sent.stderr
        response = send_raw(
            port, tmp_path, dataset_bytes(ct_series.files[3]), ct_series.sop_instance_uids[3]
        )
        assert response.Status == 0xA700
        assert response.ErrorComment.startswith("rtauto's disk is nearly full")
        assert echoscu(port)  # the SCP itself keeps answering
        counted = server.counters()
        assert counted["instances_not_stored"] >= 2  # storescu may stop after its first
        assert counted["instances_stored"] == counted["bytes_received"] == 0
    finally:
        server.stop()
    # nothing stored, nothing quarantined: the senders still hold their instances
    assert spool_files(settings) == [] and reasons(settings) == []
    assert store.counts()["instances"] == 0


def test_calling_ae_titles_are_enforced(
    settings: Settings, store: Store, ct_series: SyntheticSeries
):
    settings.scp.allowed_calling_ae_titles = ["TPS", "CT_SIM"]
    server = StorageSCP(settings, settings.database_url)
    port = server.start()
    try:
        refused = storescu(port, ct_series.files[:2], calling_ae="INTRUDER", check=False)
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stderr + refused.stdout
        assert spool_files(settings) == []
        echo = subprocess.run(
            [require_tool("echoscu"), "-aet", "INTRUDER", "-aec", "RTAUTO", "127.0.0.1", str(port)],
            capture_output=True,
        )
        assert echo.returncode != 0
        storescu(port, ct_series.files[:2], calling_ae="TPS")
        assert len(spool_files(settings)) == 2
        wrong_called = storescu(
            port, ct_series.files[2:3], called_ae="OTHER", calling_ae="TPS", check=False
        )
        assert wrong_called.returncode != 0
        counted = server.counters()
        assert (counted["associations_rejected"], counted["associations_accepted"]) == (3, 1)
        assert counted["instances_stored"] == 2
    finally:
        server.stop()


def test_compressed_transfer_syntax_is_stored_as_sent(
    settings: Settings, scp: int, ct_series: SyntheticSeries, tmp_path: Path
):
    rle = tmp_path / "rle.dcm"
    subprocess.run(
        [require_tool("dcmcrle"), str(ct_series.files[3]), str(rle)],
        check=True,
        capture_output=True,
    )
    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == RLE_LOSSLESS
    storescu(scp, [rle], extra=["-xr"])
    [stored] = spool_files(settings)
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == RLE_LOSSLESS
    assert dataset_bytes(stored) == dataset_bytes(rle)
    # the pixels decode to the original image (nothing was re-encoded on the way)
    assert (
        pydicom.dcmread(stored).pixel_array == pydicom.dcmread(ct_series.files[3]).pixel_array
    ).all()


def test_storage_contexts_cover_rt_objects_and_compressed_syntaxes():
    contexts = {cx.abstract_syntax: cx.transfer_syntax for cx in storage_contexts()}
    for sop_class in (
        "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
        "1.2.840.10008.5.1.4.1.1.481.8",  # RT Ion Plan
        "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
        "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
        "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
        "1.2.840.10008.5.1.4.1.1.481.4",  # RT Beams Treatment Record
        "1.2.840.10008.5.1.4.1.1.481.9",  # RT Ion Beams Treatment Record
        "1.2.840.10008.5.1.4.1.1.66.1",  # Spatial Registration
        "1.2.840.10008.5.1.4.1.1.66.3",  # Deformable Spatial Registration
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    ):
        syntaxes = contexts[sop_class]
        for ts in (
            "1.2.840.10008.1.2",  # implicit VR little endian
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.1.99",  # deflated
            "1.2.840.10008.1.2.4.50",  # JPEG baseline
            "1.2.840.10008.1.2.4.51",  # JPEG extended
            "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
            "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
            "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
            "1.2.840.10008.1.2.4.91",  # JPEG 2000
            RLE_LOSSLESS,
        ):
            assert ts in syntaxes, (sop_class, ts)


def _registration(folder: Path, ct: SyntheticSeries) -> Path:
    """A minimal Spatial Registration object (identity) on the CT's Frame of Reference."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SpatialRegistrationStorage
    meta.MediaStorageSOPInstanceUID = new_uid()
    meta.TransferSyntaxUID = EXPLICIT_LE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SpatialRegistrationStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "REG"
    ds.PatientID = "RTAUTO-TEST"
    ds.StudyInstanceUID = ct.study_instance_uid
    ds.SeriesInstanceUID = new_uid()
    ds.FrameOfReferenceUID = ct.frame_of_reference_uid
    matrix = Dataset()
    matrix.FrameOfReferenceTransformationMatrixType = "RIGID"
    matrix.FrameOfReferenceTransformationMatrix = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    registration = Dataset()
    registration.FrameOfReferenceUID = ct.frame_of_reference_uid
    registration.MatrixRegistrationSequence = [Dataset()]
    registration.MatrixRegistrationSequence[0].MatrixSequence = [matrix]
    ds.RegistrationSequence = [registration]
    path = folder / "reg.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rt_objects_and_images_from_real_data_are_accepted(
    settings: Settings, store: Store, scp: int, test_data: Path, ct_series: SyntheticSeries
):
    files = [
        *sorted((test_data / "dcpt-headphantom" / "study").glob("RN.*.dcm")),  # RT Ion Plan
        *sorted((test_data / "dcpt-headphantom" / "study").glob("RS.*.dcm")),  # RTSTRUCT
        test_data / "dicompyler-core-example" / "rtplan.dcm",
        test_data / "dicompyler-core-example" / "rtdose.dcm",
        test_data / "orthanc-tests" / "DicomSeg.dcm",
        *sorted((test_data / "orthanc-tests" / "Knee" / "T2").glob("*.dcm"))[:3],  # MR, J2K
        *sorted((test_data / "orthanc-tests" / "Brainix" / "Flair").glob("*.dcm"))[:3],  # MR
        _registration(settings.home, ct_series),
    ]
    sent = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sent[str(ds.SOPInstanceUID)] = (str(ds.SOPClassUID), str(ds.Modality))
    # -R: contexts for exactly these SOP classes (RT Ion Plan is not in storescu's default
    # list); -xw: JPEG 2000 as well, so the JPEG 2000 MR travels compressed
    storescu(scp, files, extra=["-R", "-xw"])
    stored = {}
    for path in spool_files(settings):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored[str(ds.SOPInstanceUID)] = (str(ds.SOPClassUID), str(ds.Modality))
    assert stored == sent
    modalities = {m for _c, m in sent.values()}
    assert {"RTPLAN", "RTSTRUCT", "RTDOSE", "SEG", "MR", "REG"} <= modalities
    wait_until(lambda: store.counts()["instances"] == len(files), timeout=30)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.4.91":
            continue
        folder = settings.spool_dir / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
        stored_file = folder / f"{ds.SOPInstanceUID}.dcm"
        kept = pydicom.dcmread(stored_file)
        # storescu re-encodes headers (OW becomes OB) but the JPEG 2000 stream is untouched
        assert kept.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"
        assert kept.PixelData == pydicom.dcmread(path).PixelData


def test_receiving_processes_share_the_port(settings: Settings, store: Store, tmp_path: Path):
    series = write_ct_series(tmp_path / "ct", rows=128, cols=128, slices=24)
    settings.scp.processes = 2
    server = StorageSCP(settings, settings.database_url)
    port = server.start()
    try:
        children = [child.pid for child in server._children]
        assert len(set(children)) == 2 and os.getpid() not in children
        quarters = [series.files[i::4] for i in range(4)]
        pushes = [
            subprocess.Popen(
                [require_tool("storescu"), "-aec", "RTAUTO", "127.0.0.1", str(port), *map(str, q)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for q in quarters
        ]
        assert [p.wait(timeout=300) for p in pushes] == [0, 0, 0, 0]
        wait_until(lambda: store.counts()["instances"] == 24, timeout=30)
        assert len(spool_files(settings)) == 24
        assert echoscu(port)
        # both processes' counts, summed by the parent
        counted = server.counters()
        assert counted["associations_accepted"] == 5 and counted["instances_stored"] == 24
        assert counted["bytes_received"] == sum(len(dataset_bytes(f)) for f in series.files)
    finally:
        server.stop()
    for pid in children:
        _wait_gone(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: its parent just has not reaped it yet
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, patience: float = 30.0) -> None:
    deadline = time.monotonic() + patience
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"receiving process {pid} outlived its parent"


def test_receiving_processes_die_with_a_killed_parent(settings: Settings, store: Store):
    config = settings.home / "scp-settings.json"
    config.write_text(settings.model_dump_json())
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from rtauto.config import Settings
        from rtauto.ingest.scp import StorageSCP
        settings = Settings.model_validate_json(open({str(config)!r}).read())
        settings.scp.processes = 2
        server = StorageSCP(settings, settings.database_url)
        port = server.start()
        children = [c.pid for c in server._children]
        print(json.dumps({{"port": port, "children": children}}), flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        info = json.loads(parent.stdout.readline())
        assert echoscu(info["port"])
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        for pid in info["children"]:
            _wait_gone(pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_same_series_sent_twice_at_once_is_stored_once(
    settings: Settings, store: Store, ct_series: SyntheticSeries
):
    settings.scp.processes = 2
    server = StorageSCP(settings, settings.database_url)
    port = server.start()
    try:
        pushes = [
            subprocess.Popen(
                [require_tool("storescu"), "-aec", "RTAUTO", "127.0.0.1", str(port)]
                + [str(f) for f in ct_series.files],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(3)
        ]
        assert [p.wait(timeout=300) for p in pushes] == [0, 0, 0]
    finally:
        server.stop()
    assert len(spool_files(settings)) == len(ct_series.files)
    assert store.counts()["instances"] == len(ct_series.files)
    series = store.get_series(ct_series.series_instance_uid)
    assert series is not None and series.instance_count == len(ct_series.files)
    assert not list(settings.quarantine_dir.iterdir())
    assert not list(settings.incoming_dir.iterdir())
