"""The spool: validation, durable layout, quarantine with reasons, resends, reconcile."""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from rtauto.config import Settings
from rtauto.errors import IngestError
from rtauto.ingest.header import IMPLEMENTATION_CLASS_UID, read_file_meta
from rtauto.ingest.spool import (
    RETENTION_LOCK,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_DUPLICATE_CONFLICT,
    RefusedInstance,
    Spool,
    SpoolFull,
    free_bytes,
)
from rtauto.store import Store
from rtauto.testing import SyntheticSeries, wait_until

EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"


def spool_files(settings: Settings) -> list[Path]:
    return sorted(settings.spool_dir.glob("*/*/*.dcm"))


def reasons(settings: Settings) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(settings.quarantine_dir.glob("*.json"))]


def dataset_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    meta = read_file_meta(data)
    assert meta is not None
    return data[meta.dataset_offset :]


def test_file_is_copied_byte_for_byte_under_its_uids(
    settings: Settings, ct_series: SyntheticSeries
):
    original = ct_series.files[0]
    before = (original.read_bytes(), original.stat().st_mtime_ns)
    record = Spool(settings).ingest_file(original)
    sop = ct_series.sop_instance_uids[0]
    expected = f"{ct_series.study_instance_uid}/{ct_series.series_instance_uid}/{sop}.dcm"
    assert record.path == expected
    stored = settings.spool_dir / expected
    assert stored.read_bytes() == before[0]
    assert (original.read_bytes(), original.stat().st_mtime_ns) == before  # untouched
    assert record.sop_instance_uid == sop
    assert record.modality == "CT"
    assert record.patient_id == "RTAUTO-TEST"
    assert record.transfer_syntax == EXPLICIT_LE
    assert record.size == stored.stat().st_size
    assert record.source == "folder"
    attrs = record.attributes
    assert attrs["SeriesDescription"] == "Planning CT"
    assert attrs["BodyPartExamined"] == "CHEST"
    assert attrs["PatientPosition"] == "HFS"
    assert attrs["FrameOfReferenceUID"] == ct_series.frame_of_reference_uid
    assert attrs["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert attrs["SeriesNumber"] == 1 and attrs["Rows"] == 64
    assert "PixelData" not in attrs
    json.dumps(attrs)  # JSON-able as the store needs
    assert not list(settings.incoming_dir.iterdir())  # no temporary file left


def test_encoded_dataset_gets_a_file_meta_header_naming_rtauto(
    settings: Settings, ct_series: SyntheticSeries
):
    sent = dataset_bytes(ct_series.files[1])
    record = _ingest_network(Spool(settings), sent, ct_series.sop_instance_uids[1])
    stored = settings.spool_dir / record.path
    assert dataset_bytes(stored) == sent  # stored as received
    ds = pydicom.dcmread(stored)
    meta = ds.file_meta
    assert meta.MediaStorageSOPInstanceUID == ct_series.sop_instance_uids[1]
    assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert meta.TransferSyntaxUID == EXPLICIT_LE
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName.startswith("RTAUTO_")
    assert meta.SourceApplicationEntityTitle == "CT_SCANNER"
    assert ds.SOPInstanceUID == ct_series.sop_instance_uids[1]
    assert (record.calling_ae, record.called_ae, record.source) == ("CT_SCANNER", "RTAUTO", "scp")


def _stream(spool: Spool, sent: bytes, sop_instance_uid: str, piece: int = 1000):
    """What the storage SCP does: an unnamed file fed the data set as it arrives."""
    streamed = spool.begin_encoded(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=EXPLICIT_LE,
        calling_ae="CT_SCANNER",
    )
    assert streamed is not None
    for start in range(0, len(sent), piece):
        streamed.feed(memoryview(sent)[start : start + piece])
    return streamed


def _ingest_network(spool: Spool, sent: bytes, sop_instance_uid: str, streamed=None):
    """A CT data set received from CT_SCANNER (fed to ``streamed`` as it arrived)."""
    return spool.ingest_encoded(
        sent,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=EXPLICIT_LE,
        source="scp",
        calling_ae="CT_SCANNER",
        called_ae="RTAUTO",
        streamed=streamed,
    )


def test_data_set_written_as_it_arrives_is_flushed_and_named(
    settings: Settings, ct_series: SyntheticSeries
):
    """The file fed during the transfer becomes the spool file (not written a second time),
    byte for byte what the ordinary path writes."""
    spool = Spool(settings)
    sent = dataset_bytes(ct_series.files[1])
    streamed = _stream(spool, sent, ct_series.sop_instance_uids[1], piece=777)
    inode = os.fstat(streamed.fd).st_ino
    record = _ingest_network(spool, sent, ct_series.sop_instance_uids[1], streamed)
    stored = settings.spool_dir / record.path
    assert stored.stat().st_ino == inode
    assert not streamed.usable  # released
    assert dataset_bytes(stored) == sent
    reference = Settings(home=settings.home.parent / "reference")
    plain = _ingest_network(Spool(reference), sent, ct_series.sop_instance_uids[1])
    assert stored.read_bytes() == (reference.spool_dir / plain.path).read_bytes()
    assert stored.stat().st_mode & 0o777 == 0o644


def test_data_set_written_as_it_arrives_falls_back_when_incomplete(
    settings: Settings, ct_series: SyntheticSeries
):
    """A streamed file that does not hold the whole data set (a failed write) is dropped and
    the data set written the ordinary way."""
    spool = Spool(settings)
    sent = dataset_bytes(ct_series.files[2])
    streamed = _stream(spool, sent[:-100], ct_series.sop_instance_uids[2])
    inode = os.fstat(streamed.fd).st_ino
    record = _ingest_network(spool, sent, ct_series.sop_instance_uids[2], streamed)
    stored = settings.spool_dir / record.path
    assert stored.stat().st_ino != inode
    assert dataset_bytes(stored) == sent
    assert not streamed.usable


def test_data_set_written_as_it_arrives_is_not_named_when_refused(
    settings: Settings, ct_series: SyntheticSeries
):
    """An invalid data set fed to an unnamed file never gets a name in the spool, and a
    re-sent instance fed the same way is recognised as already stored."""
    spool = Spool(settings)
    sent = dataset_bytes(ct_series.files[3])
    truncated = sent[: len(sent) // 2]
    streamed = _stream(spool, truncated, ct_series.sop_instance_uids[3])
    with pytest.raises(RefusedInstance) as refused:
        _ingest_network(spool, truncated, ct_series.sop_instance_uids[3], streamed)
    assert refused.value.status == STATUS_CANNOT_UNDERSTAND
    assert not streamed.usable
    assert spool_files(settings) == []
    assert len(reasons(settings)) == 1
    first = _ingest_network(
        spool,
        sent,
        ct_series.sop_instance_uids[3],
        _stream(spool, sent, ct_series.sop_instance_uids[3]),
    )
    inode = (settings.spool_dir / first.path).stat().st_ino
    again = _ingest_network(
        spool,
        sent,
        ct_series.sop_instance_uids[3],
        _stream(spool, sent, ct_series.sop_instance_uids[3]),
    )
    assert again.path == first.path
    assert (settings.spool_dir / first.path).stat().st_ino == inode
    assert len(spool_files(settings)) == 1


def test_resend_of_identical_instance_is_idempotent(settings: Settings, ct_series: SyntheticSeries):
    spool = Spool(settings)
    first = spool.ingest_file(ct_series.files[2])
    stored = settings.spool_dir / first.path
    inode = stored.stat().st_ino
    again = spool.ingest_file(ct_series.files[2])
    sent = dataset_bytes(ct_series.files[2])
    over_network = spool.ingest_encoded(
        sent,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=ct_series.sop_instance_uids[2],
        transfer_syntax=EXPLICIT_LE,
        source="scp",
    )
    assert again.path == first.path == over_network.path
    assert stored.stat().st_ino == inode
    assert len(spool_files(settings)) == 1
    assert not list(settings.quarantine_dir.iterdir())


def test_a_resent_instance_whose_file_another_user_owns_is_still_accepted(
    settings: Settings, ct_series: SyntheticSeries, monkeypatch: pytest.MonkeyPatch, caplog
):
    spool = Spool(settings)
    first = spool.ingest_file(ct_series.files[0])
    stored = settings.spool_dir / first.path
    content = stored.read_bytes()
    then = time.time() - 3600
    os.utime(stored, (then, then))

    def not_yours(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr("rtauto.ingest.spool.os.utime", not_yours)
    caplog.set_level("INFO", logger="rtauto.ingest")
    again = spool.ingest_file(ct_series.files[0])
    # the same bytes written anew, as the daemon's own: retention counts from now
    assert again.path == first.path and len(spool_files(settings)) == 1
    assert stored.read_bytes() == content and stored.stat().st_mtime > then + 60
    assert "written anew" in caplog.text
    # where the folder refuses that too, the instance is still accepted
    monkeypatch.setattr(Spool, "_write_durable", not_yours)
    assert spool.ingest_file(ct_series.files[0]).path == first.path
    assert "belongs to another user" in caplog.text
    assert not list(settings.quarantine_dir.iterdir())


def test_same_uid_with_other_content_keeps_the_first(
    settings: Settings, ct_series: SyntheticSeries, tmp_path: Path
):
    spool = Spool(settings)
    first = spool.ingest_file(ct_series.files[3])
    kept = (settings.spool_dir / first.path).read_bytes()
    ds = pydicom.dcmread(ct_series.files[3])
    ds.SeriesDescription = "edited elsewhere"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    with pytest.raises(RefusedInstance) as refused:
        spool.ingest_file(changed)
    assert refused.value.status == STATUS_DUPLICATE_CONFLICT
    assert "duplicate SOPInstanceUID with different content" in refused.value.reason
    here, there = len(dataset_bytes(changed)), len(dataset_bytes(ct_series.files[3]))
    assert f"({here} bytes of data set here, {there} kept)" in refused.value.reason
    assert (settings.spool_dir / first.path).read_bytes() == kept
    assert refused.value.quarantined is not None
    assert refused.value.quarantined.read_bytes() == changed.read_bytes()
    [reason] = reasons(settings)
    assert reason["original_name"] == str(changed)


def _bad_inputs(ct_series: SyntheticSeries, folder: Path) -> dict[str, tuple[Path, str, int]]:
    """The bad inputs of issue 2: name -> (file, expected reason start, status)."""
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(ct_series.files[4].read_bytes()[:-3000])
    text = folder / "notes.txt"
    text.write_text("Patient notes: this is not a DICOM file.\n" * 20)
    ds = pydicom.dcmread(ct_series.files[5])
    traversal = folder / "traversal.dcm"
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.SOPInstanceUID = "1.2.3.4/../../../etc/passwd"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(traversal)
    ds = pydicom.dcmread(ct_series.files[6])
    del ds.SOPInstanceUID
    no_sop = folder / "no_sop.dcm"
    ds.save_as(no_sop)
    return {
        "truncated": (truncated, "truncated: element (7FE0,0010)", STATUS_CANNOT_UNDERSTAND),
        "text": (text, "not DICOM", STATUS_CANNOT_UNDERSTAND),
        "traversal": (
            traversal,
            "SOPInstanceUID '1.2.3.4/../../../etc/passwd' is not a valid DICOM UID",
            STATUS_DATASET_MISMATCH,
        ),
        "no_sop": (no_sop, "missing SOPInstanceUID (0008,0018)", STATUS_DATASET_MISMATCH),
    }


def test_bad_inputs_are_quarantined_with_reasons(
    settings: Settings, ct_series: SyntheticSeries, tmp_path: Path
):
    spool = Spool(settings)
    for name, (path, reason, status) in _bad_inputs(ct_series, tmp_path).items():
        original = path.read_bytes()
        with pytest.raises(IngestError) as refused:
            spool.ingest_file(path)
        assert isinstance(refused.value, RefusedInstance)
        assert refused.value.reason.startswith(reason), (name, refused.value.reason)
        assert refused.value.status == status, name
        quarantined = refused.value.quarantined
        assert quarantined is not None and quarantined.parent == settings.quarantine_dir
        assert quarantined.read_bytes() == original
        assert path.read_bytes() == original  # the original stays as it was
        info = json.loads(quarantined.with_suffix(".json").read_text())
        assert info["reason"] == refused.value.reason
        assert info["source"] == "folder"
        assert info["original_name"] == str(path)
        assert info["time"]
    assert spool_files(settings) == []
    # names are digests, never taken from the content (no ../ anywhere)
    names = [p.name for p in settings.quarantine_dir.iterdir()]
    assert len(names) == 8 and all(".." not in n and len(n.split(".")[0]) == 32 for n in names)
    assert not any(settings.home.rglob("passwd"))


def test_the_same_refused_data_is_kept_once_and_counted(settings: Settings, tmp_path: Path):
    spool = Spool(settings)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"Patient notes, not DICOM.\n" * 10)
    first = second = None
    for _ in range(3):  # a batch read three times, or a sender retrying
        with pytest.raises(RefusedInstance) as refused:
            spool.ingest_file(notes)
        first = first or refused.value.quarantined
        second = refused.value.quarantined
    assert first == second
    [record] = reasons(settings)
    assert record["times"] == 3 and record["last_time"] >= record["time"]
    assert (settings.quarantine_dir / record["file"]).read_bytes() == notes.read_bytes()
    # the same bytes from another place, or refused over a C-STORE, are kept apart
    other = tmp_path / "other.txt"
    other.write_bytes(notes.read_bytes())
    with pytest.raises(RefusedInstance):
        spool.ingest_file(other)
    with pytest.raises(RefusedInstance):
        spool.ingest_encoded(
            notes.read_bytes(),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid="1.2.3.4",
            transfer_syntax=EXPLICIT_LE,
            source="scp",
            calling_ae="CT_SIM",
        )
    assert sorted(r["times"] for r in reasons(settings)) == [1, 1, 3]
    assert len(list(settings.quarantine_dir.glob("*.bin"))) == 3
    assert not list(settings.quarantine_dir.glob(".*"))  # no temporary file left behind


def test_network_data_set_must_match_the_request(settings: Settings, ct_series: SyntheticSeries):
    with pytest.raises(RefusedInstance) as refused:
        Spool(settings).ingest_encoded(
            dataset_bytes(ct_series.files[0]),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid="1.2.3.999",
            transfer_syntax=EXPLICIT_LE,
            source="scp",
            calling_ae="PACS",
        )
    assert refused.value.status == STATUS_DATASET_MISMATCH
    assert "differs from '1.2.3.999' in the C-STORE request" in refused.value.reason
    [info] = reasons(settings)
    assert info["calling_ae"] == "PACS" and info["source"] == "scp"
    assert spool_files(settings) == []


def test_deflated_data_set_is_scanned_and_stored_as_received(
    settings: Settings, ct_series: SyntheticSeries
):
    plain = dataset_bytes(ct_series.files[7])
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(plain) + packer.flush()
    spool = Spool(settings)
    common = {
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "sop_instance_uid": ct_series.sop_instance_uids[7],
        "transfer_syntax": DEFLATED,
        "source": "scp",
    }
    with pytest.raises(RefusedInstance, match="truncated"):
        spool.ingest_encoded(deflated[: len(deflated) // 2], **common)
    record = spool.ingest_encoded(deflated, **common)
    assert dataset_bytes(settings.spool_dir / record.path) == deflated
    assert record.attributes["SeriesDescription"] == "Planning CT"


def test_bare_data_set_file_is_stored_behind_a_built_header(
    settings: Settings, ct_series: SyntheticSeries, tmp_path: Path
):
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, pydicom.dcmread(ct_series.files[0]))
    raw = fp.getvalue()
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(raw)
    assert raw[128:132] != b"DICM"
    record = Spool(settings).ingest_file(bare)
    assert record.transfer_syntax == "1.2.840.10008.1.2"
    assert dataset_bytes(settings.spool_dir / record.path) == raw


def test_reconcile_indexes_unindexed_files_and_removes_stale_temporaries(
    settings: Settings, store: Store, ct_series: SyntheticSeries
):
    spool = Spool(settings)
    records = [spool.ingest_file(f) for f in ct_series.files[:3]]
    store.record_instance(records[0])  # the other two: a crash before their index rows
    stale = settings.incoming_dir / "0123.tmp"
    stale.write_bytes(b"half an instance")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = settings.incoming_dir / "4567.tmp"
    fresh.write_bytes(b"being written now")
    assert spool.reconcile(store) == 2
    assert store.instance_paths() == {r.path for r in records}
    assert not stale.exists() and fresh.exists()
    assert spool.reconcile(store) == 0
    series = store.get_series(ct_series.series_instance_uid)
    assert series is not None and series.instance_count == 3
    assert series.attributes["SeriesDescription"] == "Planning CT"


def test_named_temporary_files_where_unnamed_ones_are_unsupported(
    settings: Settings, store: Store, ct_series: SyntheticSeries
):
    """The write path for file systems without O_TMPFILE: a named file in .incoming, linked
    into place; nothing is left behind and a re-sent instance is still recognised."""
    spool = Spool(settings)
    spool._tmpfile_supported = False
    records = [spool.ingest_file(path) for path in ct_series.files]
    assert [f.read_bytes() for f in spool_files(settings)] == [
        (settings.spool_dir / r.path).read_bytes() for r in sorted(records, key=lambda r: r.path)
    ]
    assert not list(settings.incoming_dir.iterdir())
    again = spool.ingest_file(ct_series.files[0])
    assert again.path == records[0].path
    assert len(spool_files(settings)) == len(ct_series.files)


def test_known_series_skip_the_attribute_conversion(settings: Settings, ct_series: SyntheticSeries):
    spool = Spool(settings)
    first = spool.ingest_file(ct_series.files[0])
    assert first.attributes["SeriesDescription"] == "Planning CT"
    spool.known_series.add(ct_series.series_instance_uid)  # its store row exists
    assert spool.ingest_file(ct_series.files[1]).attributes == {}


def test_files_prepared_ahead_are_used_and_released(settings: Settings, ct_series: SyntheticSeries):
    """The storage SCP's spool creates its unnamed files ahead of need; what it writes through
    them is the same, and closing the spool leaves nothing behind."""
    spool = Spool(settings)
    spool.prepare_files(2)
    try:
        assert spool._prepared is not None
        wait_until(lambda: len(spool._prepared._fds) == 2, timeout=10)
        records = [spool.ingest_file(path) for path in ct_series.files]
        for record, path in zip(records, ct_series.files, strict=True):
            assert (settings.spool_dir / record.path).read_bytes() == path.read_bytes()
            assert (settings.spool_dir / record.path).stat().st_mode & 0o777 == 0o644
    finally:
        spool.close()
    assert spool._prepared is None
    left = [p.name for p in settings.spool_dir.iterdir() if p.name != ".incoming"]
    assert sorted(left) == [RETENTION_LOCK, ct_series.study_instance_uid]
    assert not list(settings.incoming_dir.iterdir())


def test_a_series_folder_removed_behind_the_spool_is_made_again(
    settings: Settings, ct_series: SyntheticSeries
):
    spool = Spool(settings)
    first = spool.ingest_file(ct_series.files[0])
    series_dir = (settings.spool_dir / first.path).parent
    (settings.spool_dir / first.path).unlink()
    series_dir.rmdir()
    second = spool.ingest_file(ct_series.files[1])
    assert (settings.spool_dir / second.path).read_bytes() == ct_series.files[1].read_bytes()
    sent = dataset_bytes(ct_series.files[2])
    (settings.spool_dir / second.path).unlink()
    series_dir.rmdir()
    streamed = _stream(spool, sent, ct_series.sop_instance_uids[2])
    third = _ingest_network(spool, sent, ct_series.sop_instance_uids[2], streamed)
    assert dataset_bytes(settings.spool_dir / third.path) == sent
    (settings.spool_dir / third.path).unlink()
    series_dir.rmdir()
    spool._tmpfile_supported = False  # the named temporary file path
    fourth = spool.ingest_file(ct_series.files[3])
    assert (settings.spool_dir / fourth.path).read_bytes() == ct_series.files[3].read_bytes()


def test_an_image_cut_short_before_its_pixel_data_is_refused(
    settings: Settings, ct_series: SyntheticSeries, tmp_path: Path
):
    """Cut at an element boundary the file parses as a whole data set; a CT image without
    Pixel Data was cut short, and accepting it would make the complete copy a conflict."""
    whole = ct_series.files[0].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: whole.rindex(b"\xe0\x7f\x10\x00")])  # just before (7FE0,0010)
    spool = Spool(settings)
    with pytest.raises(RefusedInstance, match="has no Pixel Data .7FE0,0010."):
        spool.ingest_file(cut)
    assert spool_files(settings) == []
    spool.ingest_file(ct_series.files[0])  # the complete file is then stored
    assert len(spool_files(settings)) == 1


def _beyond_free_space(settings: Settings) -> float:
    """A min_free_mb this file system cannot offer (1 TB above what is free now)."""
    return free_bytes(settings.home) / 1e6 + 1e6


def test_below_the_free_space_reserve_nothing_is_stored_or_quarantined(
    settings: Settings, ct_series: SyntheticSeries
):
    settings.min_free_mb = _beyond_free_space(settings)
    spool = Spool(settings)
    sop = ct_series.sop_instance_uids[0]
    sent = dataset_bytes(ct_series.files[0])
    with pytest.raises(SpoolFull) as full:
        spool.ingest_file(ct_series.files[0])
    assert "nearly full" in full.value.reason and "min_free_mb" in full.value.reason
    assert not isinstance(full.value, IngestError)  # not bad input: nothing was refused
    # over the network: no file is opened for the data set, and it is not stored
    assert (
        spool.begin_encoded(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid=sop,
            transfer_syntax=EXPLICIT_LE,
        )
        is None
    )
    with pytest.raises(SpoolFull):
        _ingest_network(spool, sent, sop)
    # not even bad input is written (the quarantine would take the reserve's room too)
    with pytest.raises(SpoolFull):
        _ingest_network(spool, b"not a data set", sop)
    assert spool_files(settings) == [] and reasons(settings) == []
    assert list(settings.incoming_dir.iterdir()) == []

    # with room again, the same instance is stored as usual
    spool.reserve_bytes = 0
    record = _ingest_network(spool, sent, sop)
    assert (settings.spool_dir / record.path).exists()
    # the reserve counts the incoming data set: just enough free space is not enough
    spool.reserve_bytes = free_bytes(settings.home) - len(sent) // 2
    with pytest.raises(SpoolFull):
        _ingest_network(spool, dataset_bytes(ct_series.files[1]), ct_series.sop_instance_uids[1])
