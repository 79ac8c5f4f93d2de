"""The storage SCP's indexer: index rows committed in the background after acknowledgement,
shared transactions, retries, and recovery of rows a receiving process could not commit."""

from __future__ import annotations

import os
import signal
import threading
import time

from rtauto.config import Settings
from rtauto.ingest.scp import StorageSCP, _Indexer
from rtauto.ingest.spool import Spool
from rtauto.store import InstanceRecord, Store
from rtauto.testing import SyntheticSeries, echoscu, instance_record, wait_until


def _record(n: int) -> InstanceRecord:
    return instance_record(f"1.2.3.{n}", series="1.2.3.100", study="1.2.3.99")


def test_rows_queued_while_a_commit_runs_share_the_next_transaction():
    batches: list[list[str]] = []
    committed: list[str] = []
    gate = threading.Event()

    def commit(records: list[InstanceRecord]) -> None:
        batches.append([r.sop_instance_uid for r in records])
        gate.wait(10)

    indexer = _Indexer(commit, lambda rs: committed.extend(r.sop_instance_uid for r in rs))
    indexer.submit(_record(1))
    wait_until(lambda: batches, timeout=10)  # the first commit is running
    for n in range(2, 6):
        indexer.submit(_record(n))
    gate.set()
    assert indexer.flush(10)
    indexer.close()
    assert batches == [["1.2.3.1"], ["1.2.3.2", "1.2.3.3", "1.2.3.4", "1.2.3.5"]]
    assert committed == [f"1.2.3.{n}" for n in range(1, 6)]


def test_rows_arriving_within_the_linger_share_one_commit():
    batches: list[list[str]] = []
    indexer = _Indexer(
        lambda rs: batches.append([r.sop_instance_uid for r in rs]), lambda _: None, linger=0.5
    )
    for n in range(1, 6):
        indexer.submit(_record(n))
    assert indexer.flush(10)
    assert batches == [[f"1.2.3.{n}" for n in range(1, 6)]]
    # a full batch does not wait for the linger
    full = _Indexer(
        lambda rs: batches.append([r.sop_instance_uid for r in rs]),
        lambda _: None,
        max_batch=3,
        linger=60,
    )
    for n in range(6, 9):
        full.submit(_record(n))
    assert full.flush(10)
    assert batches[-1] == ["1.2.3.6", "1.2.3.7", "1.2.3.8"]
    # closing commits at once what lingers
    lingering = _Indexer(
        lambda rs: batches.append([r.sop_instance_uid for r in rs]), lambda _: None, linger=60
    )
    lingering.submit(_record(9))
    started = time.monotonic()
    lingering.close()
    assert time.monotonic() - started < 10
    assert batches[-1] == ["1.2.3.9"]
    full.close()
    indexer.close()


def test_a_failed_commit_is_retried_with_the_rows_kept():
    attempts: list[int] = []

    def commit(records: list[InstanceRecord]) -> None:
        attempts.append(len(records))
        if len(attempts) < 3:
            raise OSError("database is locked")

    committed: list[InstanceRecord] = []
    indexer = _Indexer(commit, committed.extend)
    indexer.submit(_record(1))
    assert indexer.flush(30)
    indexer.close()
    assert attempts == [1, 1, 1]
    assert [r.sop_instance_uid for r in committed] == ["1.2.3.1"]


def test_close_commits_what_is_queued(settings: Settings, store: Store):
    indexer = _Indexer(store.record_instances, lambda _: None)
    for n in range(20):
        indexer.submit(_record(n))
    indexer.close()
    assert store.counts()["instances"] == 20


def test_rows_of_a_killed_receiving_process_are_recovered(
    settings: Settings, store: Store, ct_series: SyntheticSeries
):
    """An instance durable in the spool without its index row (the receiving process died
    between the success status and the commit) is indexed once the process is replaced."""
    settings.scp.processes = 2
    server = StorageSCP(settings, settings.database_url)
    port = server.start()
    try:
        orphan = Spool(settings).ingest_file(ct_series.files[0])  # on disk, not indexed
        assert store.counts()["instances"] == 0
        victim = server._children[0].pid
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: store.counts()["instances"] == 1, timeout=60)
        assert store.instance_paths() == {orphan.path}
        wait_until(lambda: all(c.pid != victim for c in server._children), timeout=60)
        assert echoscu(port)
    finally:
        server.stop()
