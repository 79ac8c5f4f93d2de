"""The ``dicomweb`` destination type: DICOM objects sent by STOW-RS (PS3.18 10.5).

A destination block such as ``pacs: {type: dicomweb, url: https://pacs.local/dicom-web}`` is
validated by :class:`DicomWebDestinationConfig`; :func:`send_dicomweb` POSTs the files, as
stored, in ``multipart/related; type="application/dicom"`` requests of ``batch`` instances to
``{url}/studies``, and reads the service's answer (a DICOM JSON data set) instance by
instance: those in the Referenced SOP Sequence are delivered, those in the Failed SOP Sequence
are refused with their Failure Reason.

Errors follow the destination contract: the service unreachable, a timeout, HTTP 408, 429 or
5xx raise :class:`StepRetry` (the routing step retries with backoff, then tries alternates);
a refusal (other HTTP 4xx, a Failed SOP Sequence entry) raises :class:`StepFailed` once the
rest is delivered. Credentials: HTTP basic (``username`` and ``password_env``, the name of an
environment variable holding the password, so that no secret sits in a configuration file)
or a bearer token (``token_env``).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rtauto.destinations import DestinationType
from rtauto.errors import StepFailed, StepRetry

__all__ = ["DICOMWEB_DESTINATION", "DicomWebDestinationConfig", "send_dicomweb"]

_REFERENCED_SOPS = "00081199"
_FAILED_SOPS = "00081198"
_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_RETRY_STATUSES = frozenset({408, 429})


class DicomWebDestinationConfig(BaseModel):
    """A DICOMweb service that accepts STOW-RS."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        pattern=r"^https?://", description="base URL of the service; STOW-RS goes to URL/studies"
    )
    username: str | None = Field(None, description="HTTP basic authentication user")
    password_env: str | None = Field(
        None, description="environment variable holding the basic authentication password"
    )
    token_env: str | None = Field(
        None, description="environment variable holding a bearer token (instead of basic)"
    )
    batch: int = Field(20, ge=1, le=1000, description="instances per request")
    timeout_seconds: float = Field(60.0, gt=0)
    ca_file: Path | None = Field(None, description="CA bundle for https (default: the system's)")
    verify_tls: bool = True

    @model_validator(mode="after")
    def _one_kind_of_credentials(self) -> DicomWebDestinationConfig:
        if self.token_env and (self.username or self.password_env):
            raise ValueError("give either username/password_env or token_env, not both")
        if bool(self.username) != bool(self.password_env):
            raise ValueError("username and password_env go together")
        return self


def _authorization(config: DicomWebDestinationConfig) -> str | None:
    def secret(name: str) -> str:
        value = os.environ.get(name)
        if value is None:
            raise StepFailed(f"the environment variable {name} (a DICOMweb credential) is not set")
        return value

    if config.token_env:
        return f"Bearer {secret(config.token_env)}"
    if config.username and config.password_env:
        pair = f"{config.username}:{secret(config.password_env)}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")
    return None


def _context(config: DicomWebDestinationConfig) -> ssl.SSLContext | None:
    if not config.url.startswith("https://"):
        return None
    context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    if not config.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _body(paths: Sequence[Path], boundary: str) -> bytes:
    parts = []
    for path in paths:
        parts += [
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"),
            path.read_bytes(),
            b"\r\n",
        ]
    parts.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(parts)


def _sequence(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list((answer.get(tag) or {}).get("Value") or [])


def _value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _post(
    config: DicomWebDestinationConfig,
    paths: Sequence[Path],
    authorization: str | None,
    context: ssl.SSLContext | None,
) -> tuple[int, dict[str, Any] | None]:
    """One STOW-RS request: (HTTP status, the answer data set or None)."""
    boundary = f"rtauto-{uuid.uuid4().hex}"
    request = urllib.request.Request(
        config.url.rstrip("/") + "/studies",
        data=_body(paths, boundary),
        method="POST",
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(
            request, timeout=config.timeout_seconds, context=context
        ) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    except OSError as exc:  # URLError: refused, unreachable, timed out, TLS
        reason = getattr(exc, "reason", exc)
        raise StepRetry(f"DICOMweb service {config.url} unreachable: {reason}") from exc
    try:
        answer = json.loads(text) if text.strip() else None
    except ValueError:
        answer = None
    if isinstance(answer, list):  # some services wrap the data set in a list
        answer = answer[0] if answer else None
    return status, answer if isinstance(answer, dict) else None


def send_dicomweb(
    config: DicomWebDestinationConfig,
    files: Sequence[Path],
    on_delivered: Callable[[Path], None] | None = None,
) -> None:
    """STOW-RS ``files`` in batches; ``on_delivered(path)`` for each instance the service
    confirms. Refused instances are reported at the end (:class:`StepFailed`); a transient
    failure stops and raises :class:`StepRetry` naming what was not delivered."""
    paths = [Path(f) for f in files]
    problems: list[str] = []
    by_uid: dict[str, Path] = {}
    for path in paths:
        try:
            by_uid[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
        except Exception as exc:  # noqa: BLE001 - an unreadable file is reported, not raised
            problems.append(f"{path}: not a readable DICOM file ({exc})")
    uids = list(by_uid)
    authorization, context = _authorization(config), _context(config)
    for start in range(0, len(uids), config.batch):
        batch = uids[start : start + config.batch]
        try:
            status, answer = _post(config, [by_uid[u] for u in batch], authorization, context)
        except StepRetry as exc:
            raise StepRetry(f"{exc}; {len(uids) - start} instance(s) not delivered") from exc
        if status in _RETRY_STATUSES or status >= 500:
            raise StepRetry(
                f"DICOMweb service {config.url} answered HTTP {status}; "
                f"{len(uids) - start} instance(s) not delivered"
            )
        failed = {
            str(_value(item, _SOP_INSTANCE)): _value(item, _FAILURE_REASON)
            for item in _sequence(answer or {}, _FAILED_SOPS)
        }
        stored = {
            str(_value(item, _SOP_INSTANCE)) for item in _sequence(answer or {}, _REFERENCED_SOPS)
        }
        if status == 200 and not failed:
            stored = set(batch)  # 200: every instance was stored (PS3.18 10.5.3.1)
        elif status >= 400 and not failed and not stored:
            raise StepFailed(
                f"DICOMweb service {config.url} refused the request: HTTP {status}"
                + (" (authentication)" if status in (401, 403) else "")
            )
        for uid in batch:
            if uid in stored and uid not in failed:
                if on_delivered is not None:
                    on_delivered(by_uid[uid])
            else:
                reason = failed.get(uid)
                problems.append(
                    f"{uid}: refused"
                    + (f" (Failure Reason {reason:#06x})" if isinstance(reason, int) else "")
                    + (f" (HTTP {status})" if uid not in failed else "")
                )
    if problems:
        raise StepFailed(f"{config.url} did not accept: " + "; ".join(problems))


DICOMWEB_DESTINATION = DestinationType(
    name="dicomweb",
    config=DicomWebDestinationConfig,
    send=send_dicomweb,
    description="a DICOMweb service (STOW-RS over HTTP(S), basic or bearer authentication)",
    dicom_only=True,
)
