"""The folder watcher: settle time, exactly-once ingest, start scan, bad files, deletion."""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest

from rtauto.config import Settings, WatchFolder
from rtauto.errors import RtautoError
from rtauto.ingest.watcher import FolderWatcher
from rtauto.store import Store
from rtauto.testing import SyntheticSeries, wait_until


def spool_files(settings: Settings) -> list[Path]:
    return sorted(settings.spool_dir.glob("*/*/*.dcm"))


def reasons(settings: Settings) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(settings.quarantine_dir.glob("*.json"))]


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    folder = tmp_path / "drop"
    folder.mkdir()
    return folder


@contextmanager
def watching(
    settings: Settings, store: Store, drop: Path, **options: object
) -> Iterator[FolderWatcher]:
    settings.watch = [WatchFolder(path=drop, **options)]  # type: ignore[arg-type]
    watcher = FolderWatcher(settings, store.url)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


def test_file_written_slowly_in_pieces_is_ingested_once_after_settling(
    settings: Settings, store: Store, drop: Path, ct_series: SyntheticSeries
):
    data = ct_series.files[0].read_bytes()
    target = drop / "slice.dcm"
    with watching(settings, store, drop, settle_seconds=2.0) as watcher:
        pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)][:6]
        pieces.append(data[6000:])
        with open(target, "wb") as out:
            for piece in pieces:
                out.write(piece)
                out.flush()
                # pauses far shorter than the settle time: nothing may be read yet
                assert spool_files(settings) == [] and reasons(settings) == []
                time.sleep(0.2)
        wait_until(lambda: watcher.ingested == 1)
        # a second settle period passes without a second ingest of the unchanged file
        time.sleep(2.5)
        assert (watcher.ingested, watcher.refused) == (1, 0)
    stored = spool_files(settings)
    assert len(stored) == 1
    assert stored[0].read_bytes() == data  # the whole file, never a half-written one
    assert reasons(settings) == []
    assert store.has_instance(ct_series.sop_instance_uids[0])
    assert target.read_bytes() == data  # the original stays (delete_after_ingest is off)


def test_files_dropped_before_start_are_ingested_and_copies_are_idempotent(
    settings: Settings, store: Store, drop: Path, ct_series: SyntheticSeries
):
    (drop / "sub").mkdir()
    for i, src in enumerate(ct_series.files[:3]):
        (drop / "sub" / f"{i}.dcm").write_bytes(src.read_bytes())
    (drop / ".partial.dcm").write_bytes(ct_series.files[3].read_bytes())  # hidden: skipped
    with watching(settings, store, drop, settle_seconds=0.2) as watcher:
        wait_until(lambda: watcher.ingested == 3)
        # the same instance dropped again under another name: no second spool file
        (drop / "again.dcm").write_bytes(ct_series.files[0].read_bytes())
        wait_until(lambda: watcher.ingested == 4)
    assert len(spool_files(settings)) == 3
    assert reasons(settings) == []
    assert store.instance_paths() == {
        p.relative_to(settings.spool_dir).as_posix() for p in spool_files(settings)
    }


def test_non_recursive_folder_ignores_subfolders(
    settings: Settings, store: Store, drop: Path, ct_series: SyntheticSeries
):
    (drop / "sub").mkdir()
    (drop / "sub" / "deep.dcm").write_bytes(ct_series.files[0].read_bytes())
    (drop / "top.dcm").write_bytes(ct_series.files[1].read_bytes())
    with watching(settings, store, drop, settle_seconds=0.2, recursive=False) as watcher:
        wait_until(lambda: watcher.ingested == 1)
        (drop / "sub" / "later.dcm").write_bytes(ct_series.files[2].read_bytes())
        time.sleep(1.0)
        assert watcher.ingested == 1
    assert store.has_instance(ct_series.sop_instance_uids[1])
    assert not store.has_instance(ct_series.sop_instance_uids[0])


def bad_files(folder: Path, ct_series: SyntheticSeries) -> dict[str, Path]:
    """The issue's bad inputs, written as a sender would drop them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    data = ct_series.files[0].read_bytes()
    files["truncated"] = folder / "truncated.dcm"
    files["truncated"].write_bytes(data[: len(data) * 2 // 3])
    files["text"] = folder / "notes.txt"
    files["text"].write_text("This is a text file, not DICOM.\n" * 20)
    ds = pydicom.dcmread(ct_series.files[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID we want
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../4"
    files["dotdot"] = folder / "dotdot.dcm"
    ds.save_as(files["dotdot"])
    ds = pydicom.dcmread(ct_series.files[2])
    del ds.SOPInstanceUID
    del ds.file_meta.MediaStorageSOPInstanceUID
    files["no_sop"] = folder / "no_sop.dcm"
    ds.save_as(files["no_sop"])
    return files


def test_bad_files_are_quarantined_with_reasons_and_kept(
    settings: Settings, store: Store, drop: Path, ct_series: SyntheticSeries
):
    bad = bad_files(drop, ct_series)
    originals = {name: path.read_bytes() for name, path in bad.items()}
    with watching(settings, store, drop, settle_seconds=0.2) as watcher:
        wait_until(lambda: watcher.refused == 4)
        assert watcher.ingested == 0
    found = {Path(r["original_name"]).name: r for r in reasons(settings)}
    assert set(found) == {p.name for p in bad.values()}
    assert "truncated" in found["truncated.dcm"]["reason"]
    assert "not DICOM" in found["notes.txt"]["reason"]
    assert "SOPInstanceUID" in found["dotdot.dcm"]["reason"]
    assert "../" in found["dotdot.dcm"]["reason"]
    assert "SOPInstanceUID" in found["no_sop.dcm"]["reason"]
    for name, path in bad.items():
        record = found[path.name]
        assert record["source"] == "folder"
        copy = settings.quarantine_dir / record["file"]
        assert copy.read_bytes() == originals[name]  # the quarantined copy is what was dropped
        assert path.read_bytes() == originals[name]  # and the original stays
    assert spool_files(settings) == []
    assert store.instance_paths() == set()
    # nothing outside the spool and quarantine was written from a UID with '..'
    assert not any(".." in p.name for p in settings.home.rglob("*"))


def test_delete_after_ingest_removes_files_once_their_copy_is_durable(
    settings: Settings, store: Store, drop: Path, ct_series: SyntheticSeries
):
    good = drop / "good.dcm"
    good.write_bytes(ct_series.files[0].read_bytes())
    bad = bad_files(drop / "bad", ct_series)
    with watching(settings, store, drop, settle_seconds=0.2, delete_after_ingest=True) as watcher:
        wait_until(lambda: watcher.ingested == 1 and watcher.refused == 4)
        wait_until(lambda: not good.exists() and not any(p.exists() for p in bad.values()))
    assert [p.read_bytes() for p in spool_files(settings)] == [ct_series.files[0].read_bytes()]
    assert len(reasons(settings)) == 4
    for record in reasons(settings):
        assert (settings.quarantine_dir / record["file"]).stat().st_size > 0


def test_a_restart_reads_again_only_what_changed(
    settings: Settings, store: Store, drop: Path, ct_series: SyntheticSeries
):
    """Kept files, good or bad, are read once across restarts: a restart neither re-reads a
    kept instance nor quarantines a kept bad file a second time; a file changed or added
    while the daemon was down is read, and a file removed meanwhile is forgotten."""
    kept = drop / "kept.dcm"
    kept.write_bytes(ct_series.files[0].read_bytes())
    changed = drop / "changed.dcm"
    changed.write_bytes(ct_series.files[1].read_bytes())
    removed = drop / "removed.dcm"
    removed.write_bytes(ct_series.files[2].read_bytes())
    bad = drop / "notes.txt"
    bad.write_text("not DICOM\n" * 20)
    with watching(settings, store, drop, settle_seconds=0.2) as watcher:
        wait_until(lambda: (watcher.ingested, watcher.refused) == (3, 1))
    assert len(store.watched_files(drop)) == 4

    # while the daemon is down: one file gets other content, one goes, one arrives
    changed.write_bytes(ct_series.files[3].read_bytes())
    removed.unlink()
    (drop / "new.dcm").write_bytes(ct_series.files[4].read_bytes())
    with watching(settings, store, drop, settle_seconds=0.2) as watcher:
        wait_until(lambda: watcher.ingested == 2)
        time.sleep(1.0)  # several settle periods: nothing else is read
        assert (watcher.ingested, watcher.refused) == (2, 0)
    assert len(reasons(settings)) == 1  # the bad file was quarantined once
    assert set(store.watched_files(drop)) == {
        str(drop / name) for name in ("kept.dcm", "changed.dcm", "new.dcm", "notes.txt")
    }
    for n in (0, 1, 2, 3, 4):
        assert store.has_instance(ct_series.sop_instance_uids[n])

    # a folder switched to delete_after_ingest has everything in it read, and deleted
    with watching(settings, store, drop, settle_seconds=0.2, delete_after_ingest=True) as w:
        wait_until(lambda: (w.ingested, w.refused) == (3, 1))
        wait_until(lambda: not list(drop.iterdir()))
    assert store.watched_files(drop) == {}


def test_special_files_and_links_are_refused_without_reading_them(
    settings: Settings, store: Store, drop: Path, tmp_path: Path, ct_series: SyntheticSeries
):
    """A FIFO would block a reader forever; a link could expose any file the daemon can read
    (its target copied into the quarantine): both are refused unread, and ingest goes on."""
    import os

    os.mkfifo(drop / "fifo.dcm")
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(ct_series.files[0].read_bytes())
    secret.chmod(0o600)
    (drop / "link.dcm").symlink_to(secret)
    with watching(settings, store, drop, settle_seconds=0.2) as watcher:
        (drop / "good.dcm").write_bytes(ct_series.files[1].read_bytes())
        wait_until(lambda: watcher.ingested == 1 and watcher.refused == 2, timeout=30)
    found = {Path(r["original_name"]).name: r for r in reasons(settings)}
    assert "not a regular file (a FIFO); nothing was read" in found["fifo.dcm"]["reason"]
    assert "a symbolic link" in found["link.dcm"]["reason"]
    for record in found.values():
        assert (settings.quarantine_dir / record["file"]).read_bytes() == b""
    assert len(spool_files(settings)) == 1  # only the regular file


def test_files_wait_in_their_folder_while_the_disk_is_below_its_reserve(
    settings: Settings, store: Store, drop: Path, ct_series: SyntheticSeries, caplog
):
    from rtauto.ingest.spool import free_bytes

    caplog.set_level("INFO", logger="rtauto.ingest.watcher")
    settings.min_free_mb = free_bytes(settings.home) / 1e6 + 1e6  # more than there is
    target = drop / "slice.dcm"
    target.write_bytes(ct_series.files[0].read_bytes())
    with watching(settings, store, drop, settle_seconds=0.1) as watcher:
        wait_until(lambda: "disk is nearly full" in caplog.text)
        time.sleep(0.5)
        # not read, not refused: the file waits where it is
        assert (watcher.ingested, watcher.refused) == (0, 0)
        assert spool_files(settings) == [] and reasons(settings) == []
        assert target.exists()
        watcher.spool.reserve_bytes = 0  # room again (files deleted elsewhere)
        wait_until(lambda: watcher.ingested == 1)
    assert store.has_instance(ct_series.sop_instance_uids[0])
    assert "drop folders are read again" in caplog.text


def test_a_missing_drop_folder_is_made_only_where_its_parent_exists(tmp_path: Path, caplog):
    settings = Settings(home=tmp_path / "home")
    settings.ensure_dirs()
    store = Store(settings.database_url, migrate=True)
    try:
        share = tmp_path / "share" / "drop"  # the share is not mounted: its folder is missing
        settings.watch = [WatchFolder(path=share)]
        with pytest.raises(RtautoError, match="does not exist, nor does"):
            FolderWatcher(settings, store.url).start()
        assert not share.parent.exists()  # nothing made in its place

        local = tmp_path / "drop-new"
        with (
            caplog.at_level(logging.WARNING, logger="rtauto.ingest.watcher"),
            watching(settings, store, local),
        ):
            assert local.is_dir()
        assert "did not exist; created it" in caplog.text
    finally:
        store.close()
