"""A lean DICOM Upper Layer receiver for the storage SCP role (PS3.8, PS3.7 C-STORE/C-ECHO).

It does what rtauto's storage SCP needs and nothing else: it accepts associations (checking
the called and calling AE titles), negotiates presentation contexts against the supported
abstract/transfer syntaxes, answers C-ECHO, and hands every C-STORE data set to a handler as
one contiguous buffer that the PDV fragments were read into straight from the socket (no
per-fragment copies, no decoding). A server may also be given ``on_store_begin``: it is called
once a C-STORE request's command set is complete and may return a :class:`DatasetSink` that is
fed the data set's bytes as they arrive (rtauto writes them to disk meanwhile), and which the
handler then receives. The C-STORE response is sent only after the handler returns, so a
success status means what the handler guarantees (rtauto: durable on disk).

Each association runs in its own thread with a blocking socket; ``network_timeout`` bounds
every wait for the peer (the ARTIM timer before the A-ASSOCIATE-RQ, idle time afterwards) and
an expired wait aborts the association. A-RELEASE is answered, an A-ABORT from the peer ends
the association, anything that breaks the protocol is answered with an A-ABORT.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from rtauto.ingest.header import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = [
    "VERIFICATION",
    "DatasetSink",
    "NativeStorageServer",
    "SinkFactory",
    "StoreHandler",
    "StoreRequest",
]

log = logging.getLogger("rtauto.ingest.native")

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# PDU types (PS3.8 9.3)
_ASSOCIATE_RQ = 0x01
_ASSOCIATE_AC = 0x02
_ASSOCIATE_RJ = 0x03
_P_DATA = 0x04
_RELEASE_RQ = 0x05
_RELEASE_RP = 0x06
_ABORT = 0x07

# A-ASSOCIATE-RJ (result, source, reason), as pynetdicom answers them
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
_REJECTION_TEXT = {
    REJECT_CALLING_AE: "calling AE title not allowed (scp.allowed_calling_ae_titles)",
    REJECT_CALLED_AE: "called AE title is not this SCP's",
    REJECT_APPLICATION_CONTEXT: "application context not supported",
    REJECT_PROTOCOL_VERSION: "protocol version not supported",
}

# presentation context results (PS3.8 9.3.3.2)
_ACCEPTED = 0x00
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
_TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04

# DIMSE command fields and values (PS3.7 E.1)
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_C_ECHO_RQ = 0x0030
_C_ECHO_RSP = 0x8030
_NO_DATASET = 0x0101
_STATUS_SUCCESS = 0x0000


_GROWTH_STEP = 16 << 20  # bytes read into the data set buffer before it grows again
_MAX_COMMAND = 64 << 10  # a command set is a few hundred bytes
_FEED_STEP = 256 << 10  # at most this many bytes are read before a sink is fed them


class _ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted."""


class _PeerAborted(Exception):
    """The peer sent an A-ABORT or closed the connection."""


@dataclass(frozen=True)
class StoreRequest:
    """One C-STORE-RQ as received."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    message_id: int
    priority: int
    move_originator_ae: str
    move_originator_message_id: int | None


class DatasetSink(Protocol):
    """Receives a C-STORE data set's bytes in order while they arrive.

    ``feed`` must not raise (a sink that fails drops what it holds and ignores the rest);
    ``close`` may be called more than once. The server closes a sink whose data set never
    completed; a completed one is handed to the store handler, which closes it.
    """

    def feed(self, chunk: memoryview) -> None: ...

    def close(self) -> None: ...


# on_store_begin(request) -> a sink for its data set, or None
SinkFactory = Callable[[StoreRequest], DatasetSink | None]
# handler(data set bytes, request, sink or None) -> (status, error comment); the buffer is only
# valid during the call
StoreHandler = Callable[[memoryview, StoreRequest, DatasetSink | None], tuple[int, str]]


# -- encoding helpers ------------------------------------------------------------------------
def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _command_set(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """An implicit VR little endian command set with its group length."""
    body = b"".join(_element(tag, value) for tag, value in sorted(elements))
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def _parse_command(data: bytes) -> dict[int, bytes]:
    elements: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if pos + length > len(data):
            raise _ProtocolError("truncated command set")
        elements[(group << 16) | element] = data[pos : pos + length]
        pos += length
    if pos != len(data):
        raise _ProtocolError("trailing bytes in the command set")
    return elements


def _us(elements: Mapping[int, bytes], tag: int, default: int | None = None) -> int | None:
    value = elements.get(tag)
    if value is None or len(value) != 2:
        return default
    return int(struct.unpack("<H", value)[0])


def _text(elements: Mapping[int, bytes], tag: int) -> str:
    return elements.get(tag, b"").decode("ascii", "replace").strip("\x00 ")


@dataclass
class _AssociateRequest:
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    # (context ID, abstract syntax, proposed transfer syntaxes)
    contexts: list[tuple[int, str, list[str]]]
    max_pdu: int


def _parse_associate_rq(body: bytes) -> _AssociateRequest:
    if len(body) < 68:
        raise _ProtocolError("A-ASSOCIATE-RQ too short")
    version = struct.unpack_from(">H", body, 0)[0]
    called = body[4:20].decode("ascii", "replace").strip(" \x00")
    calling = body[20:36].decode("ascii", "replace").strip(" \x00")
    request = _AssociateRequest(version, called, calling, "", [], 0)
    pos = 68
    while pos < len(body):
        if pos + 4 > len(body):
            raise _ProtocolError("truncated A-ASSOCIATE-RQ item")
        item_type, _reserved, length = struct.unpack_from(">BBH", body, pos)
        value = body[pos + 4 : pos + 4 + length]
        if len(value) != length:
            raise _ProtocolError("truncated A-ASSOCIATE-RQ item")
        pos += 4 + length
        if item_type == 0x10:
            request.application_context = value.decode("ascii", "replace").strip("\x00 ")
        elif item_type == 0x20:
            request.contexts.append(_parse_presentation_context(value))
        elif item_type == 0x50:
            request.max_pdu = _parse_user_information(value)
        # other item types are not defined for an RQ; PS3.8 9.3.1 says ignore them
    return request


def _parse_presentation_context(value: bytes) -> tuple[int, str, list[str]]:
    if len(value) < 4:
        raise _ProtocolError("truncated presentation context item")
    context_id = value[0]
    abstract = ""
    transfer: list[str] = []
    pos = 4
    while pos < len(value):
        if pos + 4 > len(value):
            raise _ProtocolError("truncated presentation context sub-item")
        sub_type, _reserved, length = struct.unpack_from(">BBH", value, pos)
        uid = value[pos + 4 : pos + 4 + length].decode("ascii", "replace").strip("\x00 ")
        pos += 4 + length
        if sub_type == 0x30:
            abstract = uid
        elif sub_type == 0x40:
            transfer.append(uid)
    return context_id, abstract, transfer


def _parse_user_information(value: bytes) -> int:
    """The peer's maximum PDU length (0: unlimited); other sub-items (implementation class
    and version, asynchronous operations window, role selection, extended negotiation, user
    identity) are read past: default roles, one operation at a time, no identity response."""
    max_pdu = 0
    pos = 0
    while pos + 4 <= len(value):
        sub_type, _reserved, length = struct.unpack_from(">BBH", value, pos)
        if sub_type == 0x51 and length == 4 and pos + 8 <= len(value):
            max_pdu = struct.unpack_from(">I", value, pos + 4)[0]
        pos += 4 + length
    return int(max_pdu)


# -- the server ------------------------------------------------------------------------------
class NativeStorageServer:
    """Storage SCP on a TCP port; ``start()`` returns the bound port, ``stop()`` aborts
    running associations.

    ``contexts`` maps each supported abstract syntax to the transfer syntaxes accepted for it
    (Verification included when C-ECHO is wanted). ``allowed_calling_ae_titles`` empty: any.
    ``max_pdu`` is the maximum PDU length advertised (0: unlimited). ``on_store_begin``: see
    the module docstring.
    """

    def __init__(
        self,
        *,
        ae_title: str,
        host: str,
        port: int,
        contexts: Mapping[str, Sequence[str]],
        on_store: StoreHandler,
        on_store_begin: SinkFactory | None = None,
        allowed_calling_ae_titles: Sequence[str] = (),
        max_pdu: int = 0,
        network_timeout: float = 60.0,
        reuse_port: bool = False,
        max_associations: int = 64,
        tls: ssl.SSLContext | None = None,
        on_association: Callable[[bool], None] | None = None,
    ):
        self.ae_title = ae_title.strip()
        self.host = host
        self.port = port
        self.contexts = {abstract: frozenset(ts) for abstract, ts in contexts.items()}
        self.on_store = on_store
        self.on_store_begin = on_store_begin
        self.allowed_calling = frozenset(ae.strip() for ae in allowed_calling_ae_titles)
        self.max_pdu = max_pdu
        self.network_timeout = network_timeout
        self.reuse_port = reuse_port
        self.max_associations = max_associations
        self.tls = tls
        self.on_association = on_association  # told of each association: accepted or not
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._active: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="rtauto-scp-acceptor", daemon=True
        )
        self._acceptor.start()
        return self.port

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            # shutdown wakes the acceptor blocked in accept()
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=10)
            self._acceptor = None
        with self._lock:
            active = list(self._active)
        for conn in active:
            with contextlib.suppress(OSError):
                conn.sendall(_abort_pdu(0x00, 0x00))
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._listener = None

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            with self._lock:
                crowded = len(self._active) >= self.max_associations
                if not crowded:
                    self._active.add(conn)
            if crowded:
                log.warning("refused a connection from %s: too many associations", peer)
                self.tell_association(accepted=False)
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn, peer), name="rtauto-scp-association", daemon=True
            ).start()

    def tell_association(self, accepted: bool) -> None:
        """Tell the association observer of an association accepted or refused."""
        if self.on_association is not None:
            try:
                self.on_association(accepted)
            except Exception:
                log.exception("the association observer failed")

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            if self.tls is not None:
                try:
                    conn = self._handshake(conn, peer)
                except OSError:
                    return  # logged; the finally closes the connection
            _Association(self, conn).run()
        except Exception:
            log.exception("association from %s:%s failed", *peer)
        finally:
            with self._lock:
                self._active.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket, peer: tuple[str, int]) -> ssl.SSLSocket:
        """The TLS handshake (within the network timeout); the TLS socket replaces the plain
        one among the active connections. Raises OSError when it fails."""
        assert self.tls is not None
        conn.settimeout(self.network_timeout)
        with self._lock:
            self._active.discard(conn)
        try:
            wrapped = self.tls.wrap_socket(conn, server_side=True)
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            log.warning("TLS handshake with %s:%s failed: %s", *peer, exc)
            raise
        with self._lock:
            self._active.add(wrapped)
        return wrapped


def _abort_pdu(source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", _ABORT, 0, 4, 0, 0, source, reason)


class _Association:
    """One association, acceptor side, from the A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, server: NativeStorageServer, conn: socket.socket):
        self.server = server
        self.conn = conn
        self.calling_ae = ""
        self.called_ae = ""
        self.peer_max_pdu = 0
        self.accepted: dict[int, tuple[str, str]] = {}  # context ID -> (abstract, transfer)
        self.header = bytearray(6)
        self.dataset = bytearray(0)  # reused for every data set of the association
        self.sink: DatasetSink | None = None  # fed the data set being received
        if isinstance(conn, ssl.SSLSocket):
            self._read_into = self._read_into_tls  # type: ignore[method-assign]

    # -- socket --------------------------------------------------------------------------------
    def _read_into(self, view: memoryview) -> None:
        conn = self.conn
        while view:
            try:
                got = conn.recv_into(view, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                # everything that arrived is read: acknowledge it now, before waiting (a sender
                # without TCP_NODELAY holds its last partial segment until our ACK, which
                # Linux would otherwise delay up to 40 ms), then wait for more
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                try:
                    got = conn.recv_into(view)
                except BlockingIOError:  # SO_RCVTIMEO expired
                    raise TimeoutError("network timeout") from None
            if not got:
                raise _PeerAborted("connection closed by the peer")
            view = view[got:]

    def _read_into_tls(self, view: memoryview) -> None:
        # the TLS socket has a Python timeout (set before the handshake), which raises
        # TimeoutError; decrypted records come whole, so there is no ACK to hurry
        while view:
            got = self.conn.recv_into(view)
            if not got:
                raise _PeerAborted("connection closed by the peer")
            view = view[got:]

    def _read(self, size: int) -> bytes:
        buffer = bytearray(size)
        self._read_into(memoryview(buffer))
        return bytes(buffer)

    def _read_pdu_header(self) -> tuple[int, int]:
        self._read_into(memoryview(self.header))
        pdu_type, _reserved, length = struct.unpack(">BBI", self.header)
        return pdu_type, length

    def run(self) -> None:
        conn = self.conn
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a kernel receive timeout instead of Python's (which polls before every recv)
        seconds = self.server.network_timeout
        timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        try:
            try:
                if not self._associate():
                    return
            except TimeoutError:
                log.warning("no A-ASSOCIATE-RQ within %s s; connection closed", seconds)
                return  # ARTIM expired before an association: close without an A-ABORT
            self._serve_messages()
        except _PeerAborted as exc:
            log.info("association with %s ended: %s", self.calling_ae or "?", exc)
        except (_ProtocolError, TimeoutError) as exc:
            log.warning("aborting association with %s: %s", self.calling_ae or "?", exc)
            with contextlib.suppress(OSError):
                conn.sendall(_abort_pdu(0x02, 0x00))
        except OSError as exc:
            log.info("association with %s lost: %s", self.calling_ae or "?", exc)

    # -- association establishment -------------------------------------------------------------
    def _associate(self) -> bool:
        pdu_type, length = self._read_pdu_header()
        if pdu_type != _ASSOCIATE_RQ:
            raise _ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        if length > 1 << 20:
            raise _ProtocolError("A-ASSOCIATE-RQ larger than 1 MiB")
        request = _parse_associate_rq(self._read(length))
        self.calling_ae, self.called_ae = request.calling_ae, request.called_ae
        self.peer_max_pdu = request.max_pdu
        rejection = self._rejection(request)
        if rejection is not None:
            try:
                peer = "{}:{}".format(*self.conn.getpeername()[:2])
            except OSError:
                peer = "?"
            log.warning(
                "rejected association from %r at %s to %r: %s",
                request.calling_ae,
                peer,
                request.called_ae,
                _REJECTION_TEXT.get(rejection, f"result {rejection}"),
            )
            self.server.tell_association(accepted=False)  # counted before the peer hears it
            self.conn.sendall(struct.pack(">BBIBBBB", _ASSOCIATE_RJ, 0, 4, 0, *rejection))
            return False
        self.server.tell_association(accepted=True)
        self.conn.sendall(self._associate_ac(request))
        return True

    def _rejection(self, request: _AssociateRequest) -> tuple[int, int, int] | None:
        if not request.protocol_version & 0x0001:
            return REJECT_PROTOCOL_VERSION
        if request.application_context != APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT
        allowed = self.server.allowed_calling
        if allowed and request.calling_ae not in allowed:
            return REJECT_CALLING_AE
        if request.called_ae != self.server.ae_title:
            return REJECT_CALLED_AE
        return None

    def _associate_ac(self, request: _AssociateRequest) -> bytes:
        items = [_item(0x10, APPLICATION_CONTEXT.encode("ascii"))]
        for context_id, abstract, proposed in request.contexts:
            supported = self.server.contexts.get(abstract)
            chosen = ""
            if supported is None:
                result = _ABSTRACT_SYNTAX_NOT_SUPPORTED
            else:
                chosen = next((ts for ts in proposed if ts in supported), "")
                result = _ACCEPTED if chosen else _TRANSFER_SYNTAXES_NOT_SUPPORTED
            if result == _ACCEPTED:
                self.accepted[context_id] = (abstract, chosen)
            # the transfer syntax sub-item is present but not significant when rejected
            value = struct.pack(">BBBB", context_id, 0, result, 0) + _item(
                0x40, chosen.encode("ascii")
            )
            items.append(_item(0x21, value))
        user = (
            _item(0x51, struct.pack(">I", self.server.max_pdu))
            + _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii"))
            + _item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii"))
        )
        items.append(_item(0x50, user))
        fixed = (
            struct.pack(">HH", 0x0001, 0)
            + request.called_ae.encode("ascii", "replace").ljust(16)[:16]
            + request.calling_ae.encode("ascii", "replace").ljust(16)[:16]
            + bytes(32)
        )
        body = fixed + b"".join(items)
        return struct.pack(">BBI", _ASSOCIATE_AC, 0, len(body)) + body

    # -- data transfer -------------------------------------------------------------------------
    def _serve_messages(self) -> None:
        try:
            self._receive_messages()
        finally:
            self._drop_sink()

    def _drop_sink(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            try:
                sink.close()
            except Exception:
                log.exception("closing a data set sink failed")

    def _receive_messages(self) -> None:
        command = bytearray()
        command_done = False
        context_id = -1
        dataset_used = 0
        request: StoreRequest | None = None
        while True:
            pdu_type, length = self._read_pdu_header()
            if pdu_type == _RELEASE_RQ:
                self._read(length)
                self.conn.sendall(struct.pack(">BBII", _RELEASE_RP, 0, 4, 0))
                return
            if pdu_type == _ABORT:
                raise _PeerAborted("A-ABORT from the peer")
            if pdu_type != _P_DATA:
                raise _ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            remaining = length
            while remaining:
                if remaining < 6:
                    raise _ProtocolError("truncated PDV item")
                self._read_into(memoryview(self.header))
                item_length, pdv_context, control = struct.unpack(">IBB", self.header)
                fragment = item_length - 2
                if item_length < 2 or item_length + 4 > remaining:
                    raise _ProtocolError("PDV item longer than its P-DATA-TF PDU")
                remaining -= item_length + 4
                if pdv_context not in self.accepted:
                    raise _ProtocolError(f"PDV on presentation context {pdv_context} not accepted")
                if context_id not in (-1, pdv_context):
                    raise _ProtocolError("PDV on another presentation context mid-message")
                context_id = pdv_context
                if control & 0x01:  # command fragment
                    if command_done:
                        raise _ProtocolError("command fragment after the last one")
                    if len(command) + fragment > _MAX_COMMAND:
                        raise _ProtocolError("command set larger than 64 KiB")
                    command += self._read(fragment)
                    if not control & 0x02:
                        continue
                    command_done = True
                    elements = _parse_command(bytes(command))
                    if _us(elements, 0x00000800, _NO_DATASET) != _NO_DATASET:
                        # a data set follows
                        request = self._begin_store(context_id, elements)
                        continue
                    self._dispatch(context_id, elements)
                else:
                    if not command_done:
                        raise _ProtocolError("data set fragment before the command")
                    dataset_used = self._append_dataset(dataset_used, fragment)
                    if not control & 0x02:
                        continue
                    if request is None:
                        raise _ProtocolError(
                            "unsupported DIMSE command 0x"
                            f"{_us(_parse_command(bytes(command)), 0x00000100, 0) or 0:04X}"
                        )
                    view = memoryview(self.dataset)[:dataset_used]
                    try:
                        self._store(context_id, request, view)
                    finally:
                        view.release()
                command = bytearray()
                command_done = False
                context_id = -1
                dataset_used = 0
                request = None

    def _append_dataset(self, used: int, size: int) -> int:
        """Read ``size`` bytes from the socket onto the end of the data set buffer (and feed
        them to the sink as they arrive)."""
        end = used + size
        while used < end:
            # memory grows with the bytes that arrive, not with the length a peer claims
            step = min(end, used + _GROWTH_STEP)
            if step > len(self.dataset):
                # a fresh buffer (never a resize: a handler may still hold a view of the old)
                grown = bytearray(min(end, max(step, 2 * len(self.dataset))))
                grown[:used] = memoryview(self.dataset)[:used]
                self.dataset = grown
            with memoryview(self.dataset) as view:
                if self.sink is None:
                    self._read_into(view[used:step])
                else:
                    for start in range(used, step, _FEED_STEP):
                        piece = view[start : min(step, start + _FEED_STEP)]
                        self._read_into(piece)
                        self.sink.feed(piece)
            used = step
        return end

    def _begin_store(self, context_id: int, elements: dict[int, bytes]) -> StoreRequest | None:
        """The C-STORE request whose data set follows (None for any other command), with a
        sink for its data set when the server has a sink factory."""
        if _us(elements, 0x00000100) != _C_STORE_RQ:
            return None
        abstract, transfer = self.accepted[context_id]
        request = StoreRequest(
            sop_class_uid=_text(elements, 0x00000002) or abstract,
            sop_instance_uid=_text(elements, 0x00001000),
            transfer_syntax=transfer,
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            message_id=_us(elements, 0x00000110, 0) or 0,
            priority=_us(elements, 0x00000700, 0) or 0,
            move_originator_ae=_text(elements, 0x00001030),
            move_originator_message_id=_us(elements, 0x00001031),
        )
        self._drop_sink()
        if self.server.on_store_begin is not None:
            try:
                self.sink = self.server.on_store_begin(request)
            except Exception:
                log.exception("preparing for the data set of %s failed", request.sop_instance_uid)
        return request

    def _dispatch(self, context_id: int, elements: dict[int, bytes]) -> None:
        """A command without a data set: C-ECHO (anything else aborts the association)."""
        field = _us(elements, 0x00000100)
        if field != _C_ECHO_RQ:
            raise _ProtocolError(f"unsupported DIMSE command 0x{field or 0:04X}")
        response = _command_set(
            [
                (0x00000002, _uid_bytes(_text(elements, 0x00000002) or VERIFICATION)),
                (0x00000100, struct.pack("<H", _C_ECHO_RSP)),
                (0x00000120, struct.pack("<H", _us(elements, 0x00000110, 0) or 0)),
                (0x00000800, struct.pack("<H", _NO_DATASET)),
                (0x00000900, struct.pack("<H", _STATUS_SUCCESS)),
            ]
        )
        self._send_command(context_id, response)

    def _store(self, context_id: int, request: StoreRequest, dataset: memoryview) -> None:
        """Hand a complete C-STORE data set to the handler and send its response."""
        sink, self.sink = self.sink, None  # the handler closes it
        status, comment = self.server.on_store(dataset, request, sink)
        response_elements = [
            (0x00000002, _uid_bytes(request.sop_class_uid)),
            (0x00000100, struct.pack("<H", _C_STORE_RSP)),
            (0x00000120, struct.pack("<H", request.message_id)),
            (0x00000800, struct.pack("<H", _NO_DATASET)),
            (0x00000900, struct.pack("<H", status)),
            (0x00001000, _uid_bytes(request.sop_instance_uid)),
        ]
        if status != _STATUS_SUCCESS and comment:
            text = comment[:64].encode("ascii", "replace")  # LO: at most 64 characters
            response_elements.append((0x00000902, text + b" " * (len(text) % 2)))
        self._send_command(context_id, _command_set(response_elements))

    def _send_command(self, context_id: int, command: bytes) -> None:
        limit = self.peer_max_pdu
        fragment = len(command) if not limit else max(limit - 6, 2)
        pdus = []
        for start in range(0, len(command), fragment):
            piece = command[start : start + fragment]
            control = 0x03 if start + fragment >= len(command) else 0x01
            pdus.append(
                struct.pack(
                    ">BBIIBB", _P_DATA, 0, len(piece) + 6, len(piece) + 2, context_id, control
                )
                + piece
            )
        self.conn.sendall(b"".join(pdus))
