"""The ``dicom`` destination type: files sent as stored by C-STORE over one association.

A destination block such as ``tps: {ae_title: TPS, host: tps.local, port: 104}`` is validated
by :class:`DicomDestinationConfig`; :func:`send_dicom` delivers files to it. Errors follow the
destination contract: :class:`StepRetry` when the peer is unreachable, busy or aborts,
:class:`StepFailed` when it refuses for good.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pydicom
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from rtauto.config import AE_TITLE_PATTERN
from rtauto.destinations import DestinationType
from rtauto.errors import StepFailed, StepRetry

__all__ = [
    "DICOM_DESTINATION",
    "DicomDestinationConfig",
    "TlsConfig",
    "presentation_contexts",
    "send_dicom",
    "store_status_outcome",
]

log = logging.getLogger("rtauto.route.dicom")

MAX_PRESENTATION_CONTEXTS = 128  # odd context ids 1..255 (PS3.8 9.3.2.2)

UNCOMPRESSED_SYNTAXES = frozenset(
    {
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    }
)

# C-STORE failures worth another attempt later: the peer is short of resources or busy.
TRANSIENT_FAILURES = frozenset({0x0110, 0x0210, 0x0213})

OnDelivered = Callable[[Path], None]


class TlsConfig(BaseModel):
    """TLS for a DICOM destination (the peer's certificate is always verified)."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = Field(None, description="CA bundle; default: the system's")
    cert_file: Path | None = Field(None, description="our certificate, for mutual TLS")
    key_file: Path | None = Field(None, description="the key of cert_file")
    check_hostname: bool = True

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("tls.key_file is set but tls.cert_file is not")
        return self


class DicomDestinationConfig(BaseModel):
    """A DICOM node that accepts C-STORE."""

    model_config = ConfigDict(extra="forbid")

    ae_title: str = Field(pattern=AE_TITLE_PATTERN, description="the peer's (called) AE title")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str = Field("RTAUTO", pattern=AE_TITLE_PATTERN)
    tls: TlsConfig | None = None
    timeout: float = Field(30.0, gt=0, description="seconds for connect, negotiation, replies")
    max_pdu: int = Field(0, ge=0, description="largest PDU we receive; 0 = unlimited")


def presentation_contexts(
    syntaxes: Iterable[tuple[str, str]],
) -> list[PresentationContext]:
    """The contexts to propose for files with these (SOP class, transfer syntax) pairs.

    One context per pair, each with exactly that transfer syntax, so a file is sent in its own
    encoding whenever the peer accepts it; uncompressed files also get explicit and implicit
    VR little endian contexts, as fallbacks for a peer that refuses their encoding.
    """
    wanted: dict[tuple[str, str], None] = {}
    for sop_class, syntax in syntaxes:
        wanted[(sop_class, syntax)] = None
        if syntax in UNCOMPRESSED_SYNTAXES:
            wanted[(sop_class, ExplicitVRLittleEndian)] = None
            wanted[(sop_class, ImplicitVRLittleEndian)] = None
    if len(wanted) > MAX_PRESENTATION_CONTEXTS:
        raise StepFailed(
            f"the files need {len(wanted)} presentation contexts, more than the "
            f"{MAX_PRESENTATION_CONTEXTS} one association can carry; route them in smaller groups"
        )
    return [build_context(sop_class, [syntax]) for sop_class, syntax in wanted]


def store_status_outcome(status: int) -> str:
    """``"delivered"``, ``"warning"`` (delivered), ``"transient"`` or ``"permanent"``."""
    if status == 0x0000:
        return "delivered"
    if code_to_category(status) == "Warning" or status in (0xB000, 0xB006, 0xB007):
        return "warning"
    if 0xA700 <= status <= 0xA7FF or status in TRANSIENT_FAILURES:
        return "transient"
    return "permanent"


def _describe_status(status: int) -> str:
    text = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", "unknown status"))[1]
    return f"0x{status:04X} ({text or 'success'})"


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
        context.check_hostname = tls.check_hostname
        if tls.cert_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise StepFailed(f"the TLS settings cannot be used: {exc}") from exc
    return context


def _header(path: Path) -> tuple[str, str]:
    """SOP class and transfer syntax of a DICOM file, read without its pixel data."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if "SOPClassUID" not in ds or not syntax:
        raise InvalidDicomError("it has no SOP Class UID or no Transfer Syntax UID")
    return str(ds.SOPClassUID), str(syntax)


def _association_refused(assoc: object, config: DicomDestinationConfig) -> Exception:
    """The StepRetry or StepFailed that says why no association was established."""
    where = f"{config.ae_title}@{config.host}:{config.port}"
    response = assoc.acceptor.primitive  # type: ignore[attr-defined]
    if assoc.is_rejected and response is not None:  # type: ignore[attr-defined]
        reason = f"{response.result_str}, {response.source_str}: {response.reason_str}"
        if response.result == 0x02:
            return StepRetry(f"{where} rejected the association for now ({reason})")
        return StepFailed(f"{where} rejected the association ({reason})")
    refused = assoc.rejected_contexts  # type: ignore[attr-defined]
    if response is not None and response.result == 0x00 and refused:
        names = sorted({str(cx.abstract_syntax.name) for cx in refused})
        return StepFailed(f"{where} accepts none of the proposed SOP classes ({', '.join(names)})")
    if response is None:
        return StepRetry(f"{where}: {_why_no_answer(config)}")
    return StepRetry(f"{where} aborted the association")


def _why_no_answer(config: DicomDestinationConfig) -> str:
    """Why no association answer came: the node cannot be reached, or it was reached and
    stayed silent (a port that is not a DICOM node's, or one expecting TLS or not)."""
    try:
        with socket.create_connection((config.host, config.port), timeout=min(config.timeout, 10)):
            pass
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"
    if config.tls is not None:
        return (
            f"connected, but the TLS handshake or the association request got no answer within "
            f"{config.timeout:g} s (does the node expect TLS, and trust rtauto's certificate?)"
        )
    return (
        f"connected, but the association request got no answer within {config.timeout:g} s "
        "(is this port a DICOM node's, and does it expect TLS?)"
    )


def send_dicom(
    config: DicomDestinationConfig,
    files: Sequence[Path],
    on_delivered: OnDelivered | None = None,
) -> None:
    """Send ``files`` to the DICOM node over one association, each as stored on disk.

    ``on_delivered(path)`` is called right after each success or warning status, so a caller
    can record the delivery before the next file goes. Files the peer refuses for good are
    skipped and reported at the end (:class:`StepFailed`); a transient failure stops the
    association and raises :class:`StepRetry` naming what was not delivered.
    """
    paths = [Path(f) for f in files]
    if not paths:
        return
    problems: list[str] = []
    headers: dict[Path, tuple[str, str]] = {}
    for path in paths:
        try:
            headers[path] = _header(path)
        except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
            problems.append(f"{path}: not a readable DICOM file ({exc})")
    transient: str | None = None
    if headers:
        transient = _send_over_one_association(config, headers, problems, on_delivered)
    if transient is not None:
        pending = "; ".join([transient, *problems])
        raise StepRetry(f"delivery to {config.ae_title} incomplete: {pending}")
    if problems:
        raise StepFailed(f"{config.ae_title} did not accept: " + "; ".join(problems))


def _send_over_one_association(
    config: DicomDestinationConfig,
    headers: dict[Path, tuple[str, str]],
    problems: list[str],
    on_delivered: OnDelivered | None,
) -> str | None:
    """Send every file in ``headers``; returns why it stopped early (transient), else None."""
    contexts = presentation_contexts(headers.values())
    ae = AE(ae_title=config.calling_ae_title)
    ae.acse_timeout = config.timeout
    ae.dimse_timeout = config.timeout
    ae.network_timeout = config.timeout
    ae.connection_timeout = config.timeout
    ae.maximum_pdu_size = config.max_pdu
    tls_args = None
    if config.tls is not None:
        # the host name is sent for SNI; it is verified only when check_hostname is set
        tls_args = (_ssl_context(config.tls), config.host)
    assoc = ae.associate(
        config.host,
        config.port,
        contexts=contexts,
        ae_title=config.ae_title,
        max_pdu=config.max_pdu,
        tls_args=tls_args,
    )
    if not assoc.is_established:
        error = _association_refused(assoc, config)
        if isinstance(error, StepFailed):
            problems.insert(0, str(error))
            return None
        return str(error)
    try:
        for done, (path, (sop_class, _syntax)) in enumerate(headers.items()):
            remaining = len(headers) - done
            try:
                # read in full, not decoded: elements go back out as the bytes on disk
                dataset = pydicom.dcmread(path)
            except (InvalidDicomError, OSError, ValueError) as exc:
                problems.append(f"{path}: not a readable DICOM file ({exc})")
                continue
            if not assoc.is_established:
                return f"the association ended with {remaining} file(s) unsent"
            try:
                response = assoc.send_c_store(dataset)
            except ValueError as exc:  # no accepted context for this SOP class / syntax
                problems.append(f"{path}: {exc}")
                continue
            except (RuntimeError, AttributeError) as exc:
                return f"{path}: cannot be sent ({exc}), {remaining} file(s) unsent"
            if "Status" not in response:
                return (
                    f"no C-STORE response for {path} (peer aborted or timed out), "
                    f"{remaining} file(s) unsent"
                )
            status = int(response.Status)
            outcome = store_status_outcome(status)
            if outcome in ("delivered", "warning"):
                if outcome == "warning":
                    log.warning(
                        "%s stored %s with warning %s (%s)",
                        config.ae_title,
                        path,
                        _describe_status(status),
                        response.get("ErrorComment", ""),
                    )
                if on_delivered is not None:
                    on_delivered(path)
            elif outcome == "transient":
                return (
                    f"{path}: refused with status {_describe_status(status)}, "
                    f"{remaining} file(s) unsent"
                )
            else:
                comment = response.get("ErrorComment", "")
                problems.append(
                    f"{path} ({sop_class}): refused with status {_describe_status(status)}"
                    + (f": {comment}" if comment else "")
                )
    finally:
        if assoc.is_established:
            assoc.release()
    return None


DICOM_DESTINATION = DestinationType(
    name="dicom",
    config=DicomDestinationConfig,
    send=send_dicom,
    description="a DICOM node (C-STORE SCU over one association, TLS optional)",
    dicom_only=True,
)
