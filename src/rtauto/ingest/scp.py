"""rtauto's storage SCP: C-STORE into the spool (durable before success), C-ECHO.

Every storage SOP class pynetdicom knows (RT Plan, RT Ion Plan, RT Dose, RT Structure Set, RT
Image, RT treatment records, Spatial and Deformable Spatial Registration, Segmentation, all
images) is accepted with every transfer syntax pynetdicom knows, compressed ones included; data
sets are stored exactly as received, never decoded.

The network layer is rtauto's own (:mod:`rtauto.ingest.native`, ``settings.scp.implementation
= "native"``, the default: one thread per association, data sets read from the socket straight
into one buffer) or pynetdicom's (``"pynetdicom"``); both accept the same contexts, answer with
the same statuses and hand data sets to the same spool.

With ``settings.scp.processes`` > 1 the SCP runs that many receiving processes that share the
port through ``SO_REUSEPORT`` (Linux), so concurrent associations use more than one core. Each
child opens its own store handle, asks the kernel to kill it when its parent dies
(``PR_SET_PDEATHSIG``) and also exits when it sees its parent gone. With one process the SCP
runs in threads of the calling process.

A success status is sent once the instance is durable in the spool. Its row in the job store
is committed right after by the receiving process's indexer thread, together with the rows of
the other associations (one transaction for all: the store never slows an association down);
rows that a dying process could not commit are recovered from the spool by
:meth:`Spool.reconcile <rtauto.ingest.spool.Spool.reconcile>`, run when a receiving process
exits and when the daemon starts.

Refused instances are quarantined (see :mod:`rtauto.ingest.spool`) and answered with a failure
status and an Error Comment: 0xA900 (data set does not match: missing, invalid or inconsistent
UIDs), 0xC000 (cannot understand: not DICOM, truncated), 0xC001 (the SOP Instance UID is
already stored with different content); 0xA700 (out of resources) when the spool cannot be
written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from rtauto.config import ScpTls, Settings
from rtauto.errors import ConfigError, RtautoError
from rtauto.ingest.counters import COUNTERS, ScpCounters
from rtauto.ingest.counters import FILE_NAME as COUNTERS_FILE
from rtauto.ingest.native import DatasetSink, StoreRequest
from rtauto.ingest.spool import RefusedInstance, Spool, SpoolFull, StreamedFile
from rtauto.store import InstanceRecord, Store

__all__ = ["StorageSCP", "storage_contexts"]

log = logging.getLogger("rtauto.ingest.scp")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
_PR_SET_PDEATHSIG = 1
_MAX_ASSOCIATIONS = 64
_READY = "rtauto-scp-ready"
_DUL_LOOP_DELAY = 0.0002  # seconds; pynetdicom's default is 0.001


def storage_contexts() -> list[Any]:
    """Presentation contexts the SCP supports: every storage SOP class with every transfer
    syntax pynetdicom knows (uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000, RLE, ...)."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context

    return [
        build_context(cx.abstract_syntax, list(ALL_TRANSFER_SYNTAXES))
        for cx in AllStoragePresentationContexts
    ]


class _SharedContexts(list):  # type: ignore[type-arg]
    """The server's supported contexts, handed to each association without a deep copy."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


def _fast_recv(sock: socket.socket) -> Any:
    """A drop-in for pynetdicom's ``AssociationSocket.recv`` reading a whole PDU per call
    (its own reads 4 KiB at a time, which dominates large-PDU transfers)."""

    def recv(nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            got = sock.recv_into(view[read:], nr_bytes - read)
            if not got:
                return buffer[:read]  # connection closed: what arrived so far
            read += got
        return buffer

    return recv


def server_tls_context(tls: ScpTls) -> ssl.SSLContext:
    """The server side of DICOM TLS: TLS 1.2 or later, rtauto's certificate, and client
    certificates required and verified when ``client_ca_file`` is set. Raises ConfigError
    naming the file that cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        if tls.client_ca_file is not None:
            context.load_verify_locations(cafile=str(tls.client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError(
            f"scp.tls: cannot load {tls.cert_file}, {tls.key_file}"
            + (f" or {tls.client_ca_file}" if tls.client_ca_file else "")
            + f": {exc}"
        ) from exc
    return context


class _Indexer:
    """Commits the index rows of one receiving process in the background.

    The spool file, written durably before the success status, is the record of an
    acknowledged instance; its index row follows within milliseconds. One thread commits
    everything queued since its last commit in one transaction, so concurrent associations
    share commits and no association waits for the database; it lets a first row wait
    ``linger`` seconds for others to join it (an instance arrives every few milliseconds
    during a transfer: one commit per instance would cost more CPU than the rows). A failed
    commit is retried with backoff (the rows stay queued); rows still queued when the process
    dies are indexed by :meth:`Spool.reconcile <rtauto.ingest.spool.Spool.reconcile>`, which
    the storage SCP runs when a receiving process exits and the daemon runs at start.
    """

    def __init__(
        self,
        commit: Callable[[list[InstanceRecord]], None],
        on_committed: Callable[[list[InstanceRecord]], None],
        max_batch: int = 512,
        linger: float = 0.02,
    ):
        self._commit = commit
        self._on_committed = on_committed
        self._max_batch = max_batch
        self._linger = linger
        self._queue: list[InstanceRecord] = []
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="rtauto-scp-indexer", daemon=True)
        self._thread.start()

    def submit(self, record: InstanceRecord) -> None:
        with self._cond:
            self._queue.append(record)
            if len(self._queue) == 1 or len(self._queue) >= self._max_batch:
                self._cond.notify_all()  # the indexer thread (flush() may wait here too)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every row submitted so far is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued (waiting up to ``timeout``) and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._queue:
            log.error(
                "%d index row(s) not committed at shutdown; the spool files are indexed"
                " when the daemon starts again",
                len(self._queue),
            )

    def _run(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                deadline = time.monotonic() + self._linger
                while not self._closing and len(self._queue) < self._max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._queue[: self._max_batch]
                self._busy = True
            try:
                self._commit(batch)
            except Exception:
                log.exception("indexing %d received instance(s) failed", len(batch))
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    if self._closing:
                        return  # the next start's reconcile indexes them
                    self._cond.wait(backoff)  # then retry; close() cuts the wait short
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.05
            self._on_committed(batch)
            with self._cond:
                del self._queue[: len(batch)]
                self._busy = False
                self._cond.notify_all()


class _Receiver:
    """One receiving server (native or pynetdicom) writing into the spool; runs in the current
    process."""

    def __init__(
        self,
        settings: Settings,
        store_url: str,
        counters: ScpCounters | None = None,
        slot: int = 0,
    ):
        self.settings = settings
        self.store_url = store_url
        self.counters = counters  # this process's row is ``slot``
        self.slot = slot
        self.spool = Spool(settings)
        self.spool.prepare_files(4)
        self.store: Store | None = None
        self.server: Any = None
        self._index_lock_fd: int | None = None
        self.indexer: _Indexer | None = None  # commits index rows in the background
        self._full_logged = 0.0  # when a refusal for want of disk space was last logged

    def start(self, port: int, reuse_port: bool) -> int:
        self.store = Store(self.store_url)
        database = _sqlite_path(self.store_url)
        if database is not None:
            self._index_lock_fd = os.open(
                f"{database}.scp-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        self.indexer = _Indexer(self._commit, self._committed)
        if self.settings.scp.implementation == "native":
            return self._start_native(port, reuse_port)
        return self._start_pynetdicom(port, reuse_port)

    def _tls_context(self) -> ssl.SSLContext | None:
        return server_tls_context(self.settings.scp.tls) if self.settings.scp.tls else None

    def _start_native(self, port: int, reuse_port: bool) -> int:
        from pynetdicom import DEFAULT_TRANSFER_SYNTAXES

        from rtauto.ingest.native import VERIFICATION, NativeStorageServer

        scp = self.settings.scp
        contexts = {cx.abstract_syntax: list(cx.transfer_syntax) for cx in storage_contexts()}
        contexts[VERIFICATION] = list(DEFAULT_TRANSFER_SYNTAXES)
        self.server = NativeStorageServer(
            ae_title=scp.ae_title,
            host=scp.host,
            port=port,
            contexts=contexts,
            on_store=self._on_native_store,
            on_store_begin=self._on_native_store_begin,
            on_association=self._count_association,
            allowed_calling_ae_titles=scp.allowed_calling_ae_titles,
            max_pdu=scp.max_pdu,
            network_timeout=scp.network_timeout,
            reuse_port=reuse_port,
            max_associations=_MAX_ASSOCIATIONS,
            tls=self._tls_context(),
        )
        return self.server.start()

    def _start_pynetdicom(self, port: int, reuse_port: bool) -> int:
        from pynetdicom import AE, _config, evt
        from pynetdicom.sop_class import Verification
        from pynetdicom.transport import ThreadedAssociationServer

        # pynetdicom's standard handlers log every PDU; on the receive path that costs time
        _config.LOG_HANDLER_LEVEL = "none"
        scp = self.settings.scp
        ae = AE(ae_title=scp.ae_title)
        ae.supported_contexts = storage_contexts()
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = scp.max_pdu
        ae.maximum_associations = _MAX_ASSOCIATIONS
        ae.network_timeout = scp.network_timeout
        ae.acse_timeout = scp.network_timeout
        ae.dimse_timeout = scp.network_timeout
        ae.require_called_aet = True
        if scp.allowed_calling_ae_titles:
            ae.require_calling_aet = list(scp.allowed_calling_ae_titles)

        class Server(ThreadedAssociationServer):
            def server_bind(self) -> None:
                if reuse_port:
                    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                super().server_bind()

            def shutdown(self) -> None:
                # pynetdicom's own shutdown expects servers made by AE.start_server
                socketserver.TCPServer.shutdown(self)
                self.server_close()
                for association in self.active_associations:
                    association.abort()

        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_ACCEPTED, lambda _event: self._count_association(True)),
            (evt.EVT_REJECTED, lambda _event: self._count_association(False)),
        ]
        self.server = ae.make_server(
            (scp.host, port),
            evt_handlers=handlers,
            server_class=Server,
            ssl_context=self._tls_context(),
        )
        # pynetdicom deep-copies the server's contexts for every association (170 storage
        # classes x all transfer syntaxes: ~0.1-1 s of CPU each); negotiation only reads them
        self.server.contexts = _SharedContexts(self.server.contexts)
        thread = threading.Thread(
            target=self.server.serve_forever, name="rtauto-scp-acceptor", daemon=True
        )
        thread.start()
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            if isinstance(self.server, socketserver.BaseServer):
                self.server.shutdown()
            else:
                self.server.stop()
            self.server = None
        if self.indexer is not None:
            self.indexer.close()
            self.indexer = None
        self.spool.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._index_lock_fd is not None:
            os.close(self._index_lock_fd)
            self._index_lock_fd = None

    def _count(self, name: str, amount: int = 1) -> None:
        if self.counters is not None:
            self.counters.add(self.slot, name, amount)

    def _count_association(self, accepted: bool) -> None:
        self._count("associations_accepted" if accepted else "associations_rejected")

    def _record(self, record: InstanceRecord) -> None:
        """Queue the index row of an instance already durable in the spool."""
        assert self.indexer is not None
        self.indexer.submit(record)

    def _committed(self, records: list[InstanceRecord]) -> None:
        for record in records:
            self.spool.known_series.add(record.series_instance_uid)

    def _commit(self, records: list[InstanceRecord]) -> None:
        assert self.store is not None
        if self._index_lock_fd is None:
            self.store.record_instances(records)
            return
        # SQLite lets one writer in and makes the others sleep and retry (milliseconds each);
        # receiving processes queue on a lock instead and are woken the moment it is free
        fcntl.flock(self._index_lock_fd, fcntl.LOCK_EX)
        try:
            self.store.record_instances(records)
        finally:
            fcntl.flock(self._index_lock_fd, fcntl.LOCK_UN)

    @staticmethod
    def _on_connection(event: Any) -> None:
        # pynetdicom's DUL loop sleeps this long whenever it finds nothing to do; its 1 ms
        # default is paid several times per instance on the receive path
        event.assoc.dul._run_loop_delay = _DUL_LOOP_DELAY
        transport = event.assoc.dul.socket
        raw = getattr(transport, "socket", None)
        if isinstance(raw, socket.socket):
            transport.recv = _fast_recv(raw)

    def _store(
        self,
        encoded: memoryview,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str,
        called_ae: str,
        streamed: StreamedFile | None = None,
    ) -> tuple[int, str]:
        """Spool and index one received data set; the C-STORE status and Error Comment."""
        try:
            record = self.spool.ingest_encoded(
                encoded,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                transfer_syntax=transfer_syntax,
                source="scp",
                calling_ae=calling_ae,
                called_ae=called_ae,
                streamed=streamed,
            )
            self._record(record)
        except RefusedInstance as refused:
            self._count("instances_refused")
            return refused.status, refused.reason
        except SpoolFull as full:
            self._count("instances_not_stored")
            now = time.monotonic()
            if now - self._full_logged > 60:  # a push would log every image otherwise
                self._full_logged = now
                log.error("C-STOREs are refused (0xA700) from %s: %s", calling_ae, full.reason)
            return STATUS_OUT_OF_RESOURCES, full.reason
        except OSError as exc:
            # the disk filled up below the reserve, or failed: the sender keeps the instance
            self._count("instances_not_stored")
            log.error("C-STORE of %s from %s failed: %s", sop_instance_uid, calling_ae, exc)
            return STATUS_OUT_OF_RESOURCES, f"rtauto could not store it: {exc}"
        except Exception as exc:
            self._count("instances_not_stored")
            log.exception("C-STORE of %s failed", sop_instance_uid)
            return STATUS_OUT_OF_RESOURCES, f"rtauto could not store it: {exc}"
        self._count("instances_stored")
        self._count("bytes_received", len(encoded))
        return STATUS_SUCCESS, ""

    def _on_native_store_begin(self, request: StoreRequest) -> StreamedFile | None:
        return self.spool.begin_encoded(
            sop_class_uid=request.sop_class_uid,
            sop_instance_uid=request.sop_instance_uid,
            transfer_syntax=request.transfer_syntax,
            calling_ae=request.calling_ae,
        )

    def _on_native_store(
        self, encoded: memoryview, request: StoreRequest, sink: DatasetSink | None
    ) -> tuple[int, str]:
        return self._store(
            encoded,
            request.sop_class_uid,
            request.sop_instance_uid,
            request.transfer_syntax,
            request.calling_ae,
            request.called_ae,
            sink if isinstance(sink, StreamedFile) else None,
        )

    def _on_store(self, event: Any) -> int | Dataset:
        request = event.request
        assoc = event.assoc
        encoded = request.DataSet.getbuffer()
        try:
            status, comment = self._store(
                encoded,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax),
                assoc.requestor.ae_title,
                assoc.acceptor.ae_title,
            )
        finally:
            encoded.release()
        return STATUS_SUCCESS if status == STATUS_SUCCESS else _failure(status, comment)


def _sqlite_path(store_url: str) -> str | None:
    """The database file of a SQLite store URL; None for other databases."""
    from sqlalchemy.engine import make_url

    url = make_url(store_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return str(url.database)


def _failure(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]  # LO: at most 64 characters
    return response


class StorageSCP:
    """The storage SCP of the daemon. ``start()`` returns the bound port."""

    def __init__(self, settings: Settings, store_url: str):
        self.settings = settings
        self.store_url = store_url
        self.port: int | None = None
        self._receiver: _Receiver | None = None
        self._reservation: socket.socket | None = None
        self._children: list[subprocess.Popen[str]] = []
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._counters: ScpCounters | None = None

    def start(self) -> int:
        """Start listening (``settings.scp.port``; 0 lets the OS choose) and return the port.

        Raises :class:`RtautoError` when the port is taken (by another program, or by another
        rtauto daemon, whose receiving processes would otherwise share it).
        """
        scp = self.settings.scp
        try:
            return self._start()
        except OSError as exc:
            self.stop()
            why = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                why += " (another program, or another rtauto daemon, listens there)"
            raise RtautoError(
                f"the storage SCP cannot listen on {scp.host}:{scp.port}: {why}"
            ) from exc

    def _start(self) -> int:
        scp = self.settings.scp
        self.settings.ensure_dirs()
        self._counters = ScpCounters(self._counters_path, scp.processes, create=True)
        if scp.processes == 1:
            self._receiver = _Receiver(self.settings, self.store_url, self._counters, 0)
            self.port = self._receiver.start(scp.port, reuse_port=False)
            return self.port
        if scp.tls is not None:
            server_tls_context(scp.tls)  # a bad certificate fails here, before any child starts
        if scp.port:
            # SO_REUSEPORT would let this daemon's receivers join another daemon's on the same
            # port (and split its series): the port must be free for a plain bind first
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
                probe.bind((scp.host, scp.port))
        # hold the port (bound, never listening) so every child binds the same one
        self._reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._reservation.bind((scp.host, scp.port))
        self.port = int(self._reservation.getsockname()[1])
        started = threading.Event()
        failure: list[BaseException] = []
        # children are spawned by a thread that lives until stop(): PR_SET_PDEATHSIG fires
        # when the spawning thread ends, not only the process
        self._supervisor = threading.Thread(
            target=self._supervise, args=(started, failure), name="rtauto-scp", daemon=True
        )
        self._supervisor.start()
        started.wait()
        if failure:
            self.stop()
            raise failure[0]
        return self.port

    @property
    def _counters_path(self) -> Path:
        return Path(self.settings.home) / COUNTERS_FILE

    def counters(self) -> dict[str, int]:
        """What the receiving processes counted since the start (see :mod:`.counters`)."""
        if self._counters is None:
            return dict.fromkeys(COUNTERS, 0)
        return self._counters.totals()

    def stop(self) -> None:
        """Stop receiving; running associations are cut."""
        self._stopping.set()
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None
        if self._supervisor is not None:
            self._supervisor.join(timeout=30)
            self._supervisor = None
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    # -- child processes ---------------------------------------------------------------------
    def _child_config(self, slot: int) -> str:
        return json.dumps(
            {
                "settings": self.settings.model_dump(mode="json"),
                "store_url": self.store_url,
                "port": self.port,
                "parent_pid": os.getpid(),
                "counters": str(self._counters_path),
                "slot": slot,
            }
        )

    def _spawn(self, slot: int) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-m", "rtauto.ingest.scp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            close_fds=True,
        )
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(self._child_config(slot))
        child.stdin.close()
        line = child.stdout.readline().strip()
        if line != _READY:
            child.kill()
            child.wait()
            raise RuntimeError(f"a receiving process of the storage SCP did not start ({line!r})")
        return child

    def _reconcile(self) -> None:
        """Index what a receiving process that exited had acknowledged but not indexed."""
        try:
            store = Store(self.store_url)
            try:
                Spool(self.settings).reconcile(store)
            finally:
                store.close()
        except Exception:
            log.exception("could not index the spool after a receiving process exited")

    def _supervise(self, started: threading.Event, failure: list[BaseException]) -> None:
        try:
            for slot in range(self.settings.scp.processes):
                self._children.append(self._spawn(slot))
        except BaseException as exc:  # reported to start()
            failure.append(exc)
            self._stopping.set()
        started.set()
        while not self._stopping.wait(0.5):
            for index, child in enumerate(self._children):
                if child.poll() is not None:
                    log.error(
                        "receiving process %d exited with %s; starting another",
                        child.pid,
                        child.returncode,
                    )
                    with contextlib.suppress(RuntimeError, OSError):
                        self._children[index] = self._spawn(index)
                    self._reconcile()
        for child in self._children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in self._children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
        self._children = []


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child_main() -> None:
    config = json.loads(sys.stdin.read())
    parent_pid = int(config["parent_pid"])
    if sys.platform.startswith("linux"):
        _die_with_parent(parent_pid)
    settings = Settings.model_validate(config["settings"])
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s scp[{os.getpid()}] %(name)s: %(message)s",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    counters = ScpCounters(Path(config["counters"]), settings.scp.processes)
    receiver = _Receiver(settings, config["store_url"], counters, int(config["slot"]))
    receiver.start(int(config["port"]), reuse_port=True)
    print(_READY, flush=True)
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            break
    receiver.stop()


if __name__ == "__main__":
    _child_main()
