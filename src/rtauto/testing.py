"""Testing helpers for rtauto and its plugins: real DICOM peers and synthetic series.

Loaded as a pytest plugin (entry point ``pytest11``), so plugin authors get the fixtures too:

* ``free_port()``: a TCP port the OS gives, on loopback;
* ``orthanc`` fixture / :class:`OrthancServer`: a real Orthanc PACS on loopback (REST + DICOM);
* :class:`ReceivingSCP`: a pynetdicom storage SCP that writes what it receives to a folder;
* :func:`write_ct_series`: a synthetic CT series (body, lungs, spine, couch) with exact geometry;
* :func:`storescu`: dcmtk's storescu as the sending client.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "OrthancServer",
    "ReceivingSCP",
    "free_port",
    "instance_record",
    "require_tool",
    "storescu",
    "echoscu",
    "write_ct_series",
]


def require_tool(name: str) -> str:
    """Path of an external program; skips the calling test with the reason when it is missing."""
    import pytest

    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (`make install` installs it)")
    return path


def instance_record(
    sop: str, series: str = "1.2.3.2", study: str = "1.2.3.1", **fields: Any
) -> Any:
    """An index row of a CT instance under made-up UIDs (for store and indexer tests);
    ``fields`` override the other columns."""
    from rtauto.store import InstanceRecord

    values: dict[str, Any] = {
        "sop_instance_uid": sop,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "series_instance_uid": series,
        "study_instance_uid": study,
        "patient_id": "P1",
        "modality": "CT",
        "transfer_syntax": "1.2.840.10008.1.2.1",
        "path": f"{study}/{series}/{sop}.dcm",
        "size": 10,
        "source": "scp",
    }
    values.update(fields)
    return InstanceRecord(**values)


def wait_until(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy and return its value; fail with a clear message
    after ``timeout`` seconds (a guard against hanging, never a speed check)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def free_port() -> int:
    """A free TCP port on loopback, chosen by the OS."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def nodelay_env() -> dict[str, str]:
    """Environment for dcmtk and Orthanc servers: TCP_NODELAY=1, so Nagle does not stall them."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


# --------------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------------


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancServer:
    """A real Orthanc started on loopback with its own storage folder; stopped on exit.

    ``dicomweb``: with Orthanc's DICOMweb plugin (Debian ``orthanc-dicomweb``), served at
    :attr:`dicomweb_url`; ``users``: HTTP basic authentication with these user: password
    pairs (the test's own requests then authenticate as the first).
    """

    def __init__(
        self,
        folder: Path,
        aet: str = "ORTHANC",
        *,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.aet = aet
        self.dicomweb = dicomweb
        self.users = users or {}
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> OrthancServer:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not os.path.exists(binary):
            raise FileNotFoundError("Orthanc is not installed (`make install` installs it)")
        if self.dicomweb and not DICOMWEB_PLUGIN.exists():
            raise FileNotFoundError(
                "Orthanc's DICOMweb plugin is not installed (`make install` installs it)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "rtauto-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "StorageCompression": False,
            "StableAge": 1,
            "DicomModalities": {},
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
        }
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(config))
        self.log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [binary, str(config_path)], stdout=self.log, stderr=subprocess.STDOUT, env=nodelay_env()
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()}")
            try:
                self.get("/system")
                wait_for_port(self.dicom_port, timeout=5)
                return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("Orthanc did not start in 60 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        with contextlib.suppress(Exception):
            self.log.close()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _request(self, path: str) -> urllib.request.Request:
        request = urllib.request.Request(self.url + path)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            request.add_header("Authorization", f"Basic {token}")
        return request

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self._request(path), timeout=10) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self._request(path), timeout=30) as response:
            return response.read()

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.get("/instances"))  # type: ignore[arg-type]

    def sop_instance_uids(self) -> list[str]:
        uids = []
        for oid in self.instances():
            tags = self.get(f"/instances/{oid}/simplified-tags")
            uids.append(tags["SOPInstanceUID"])  # type: ignore[index]
        return uids

    def dataset(self, orthanc_id: str) -> Dataset:
        from io import BytesIO

        return pydicom.dcmread(BytesIO(self.get_bytes(f"/instances/{orthanc_id}/file")))


class ReceivingSCP:
    """A pynetdicom storage SCP on loopback writing each received instance to ``folder``.

    ``refuse`` makes it answer every C-STORE with a failure status (a destination that is up
    but refuses), for routing tests.
    """

    def __init__(self, folder: Path, ae_title: str = "RECEIVER", refuse: bool = False):
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.refuse = refuse
        self.port = free_port()
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> ReceivingSCP:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)

        def on_store(event: object) -> int:
            if self.refuse:
                return 0xA700
            ds = event.dataset  # type: ignore[attr-defined]
            ds.file_meta = event.file_meta  # type: ignore[attr-defined]
            ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            with self._lock:
                self.received.append(str(ds.SOPInstanceUID))
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> ReceivingSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def storescu(
    port: int,
    files: Sequence[Path | str],
    *,
    host: str = "127.0.0.1",
    called_ae: str = "RTAUTO",
    calling_ae: str = "STORESCU",
    extra: Sequence[str] = (),
    check: bool = True,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk's storescu over one association."""
    cmd = [
        require_tool("storescu"),
        "-aec",
        called_ae,
        "-aet",
        calling_ae,
        *extra,
        host,
        str(port),
        *map(str, files),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def echoscu(
    port: int, *, host: str = "127.0.0.1", called_ae: str = "RTAUTO", repeat: int = 1
) -> bool:
    """True when dcmtk's echoscu succeeds: ``repeat`` C-ECHOs on one association."""
    cmd = [require_tool("echoscu"), "-aec", called_ae, "--repeat", str(repeat), host, str(port)]
    return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0


def make_tls_files(
    folder: Path, names: str = "DNS:localhost,IP:127.0.0.1", clients: Sequence[str] = ()
) -> dict[str, Path]:
    """A test CA and certificates it signs, made with openssl: ``ca``, the server's ``cert``
    and ``key`` for ``names`` (subjectAltName), and ``<client>.cert`` / ``<client>.key`` for
    each name in ``clients``. Skips the calling test without openssl."""
    openssl = require_tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = folder / "ca.key", folder / "ca.pem"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    def signed(name: str, subject: str, extension: str) -> tuple[Path, Path]:
        key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
        ext = folder / f"{name}.ext"
        ext.write_text(extension + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", f"/CN={subject}")  # fmt: skip
        run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
        return cert, key

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
        str(ca_cert), "-days", "2", "-subj", "/CN=rtauto test CA")  # fmt: skip
    files = {"ca": ca_cert}
    files["cert"], files["key"] = signed("server", "localhost", f"subjectAltName={names}")
    for client in clients:
        files[f"{client}.cert"], files[f"{client}.key"] = signed(
            client, client, "extendedKeyUsage=clientAuth"
        )
    return files


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSeries:
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    files: list[Path]
    sop_instance_uids: list[str]


def ct_phantom(
    rows: int = 128,
    cols: int = 128,
    slices: int = 40,
    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
    *,
    seed: int = 0,
) -> np.ndarray:
    """A CT-like phantom in HU, shape (slices, rows, cols): body, two lungs, spine, couch."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:slices, 0:rows, 0:cols].astype(np.float32)
    sy, sx = spacing[1], spacing[0]
    cy, cx = rows / 2, cols / 2
    yy, xx = (y - cy) * sy, (x - cx) * sx
    body_a, body_b = cols * sx * 0.36, rows * sy * 0.26
    body = (xx / body_a) ** 2 + (yy / body_b) ** 2 <= 1
    hu = np.full((slices, rows, cols), -1000.0, dtype=np.float32)
    hu[body] = 40.0
    for side in (-1, 1):
        lung = ((xx - side * body_a * 0.45) / (body_a * 0.32)) ** 2 + (
            (yy + body_b * 0.05) / (body_b * 0.6)
        ) ** 2 <= 1
        hu[lung & body] = -800.0
    spine = (xx / (body_a * 0.1)) ** 2 + ((yy - body_b * 0.6) / (body_b * 0.15)) ** 2 <= 1
    hu[spine & body] = 700.0
    couch_top = cy + body_b / sy + 4
    couch = (y >= couch_top) & (y < couch_top + 4) & (np.abs(xx) < body_a * 1.3)
    hu[couch] = 200.0
    hu += rng.normal(0, 10, hu.shape).astype(np.float32)
    return hu


def write_ct_series(
    folder: Path,
    *,
    rows: int = 128,
    cols: int = 128,
    slices: int = 40,
    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
    patient_position: str = "HFS",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-128.0, -128.0, -60.0),
    patient_id: str = "RTAUTO-TEST",
    patient_name: str = "Phantom^Synthetic",
    series_description: str = "Planning CT",
    body_part: str = "CHEST",
    study_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    hu: np.ndarray | None = None,
    seed: int = 0,
) -> SyntheticSeries:
    """Write a synthetic CT series, one file per slice, with consistent patient geometry.

    Slice ``k`` lies at ``origin + k * spacing[2] * normal`` where ``normal`` is the cross
    product of the row and column directions of ``orientation`` (ImageOrientationPatient).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hu is None:
        hu = ct_phantom(rows, cols, slices, spacing, seed=seed)
    slices, rows, cols = hu.shape
    study_uid = study_instance_uid or generate_uid()
    series_uid = generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    row_dir = np.asarray(orientation[:3], dtype=float)
    col_dir = np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    pixels = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    files, sops = [], []
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    for k in range(slices):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate, ds.StudyTime = now
        ds.SeriesDate, ds.SeriesTime = now
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "rtauto synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "rtauto synthetic study"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = body_part
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.KVP = "120"
        ds.PatientPosition = patient_position
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        position = np.asarray(origin, dtype=float) + k * spacing[2] * normal
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(position @ normal):.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # row spacing, column spacing
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = pixels[k].tobytes()
        path = folder / f"CT.{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(sop_uid)
    return SyntheticSeries(study_uid, series_uid, for_uid, files, sops)


# --------------------------------------------------------------------------------------------
# pytest fixtures (this module is registered as a pytest plugin)
# --------------------------------------------------------------------------------------------

try:
    import pytest

    @pytest.fixture
    def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
        """A running Orthanc on loopback; stopped after the test."""
        require_tool("Orthanc")
        with OrthancServer(tmp_path / "orthanc") as server:
            yield server

    @pytest.fixture
    def receiving_scp(tmp_path: Path) -> Iterator[ReceivingSCP]:
        """A pynetdicom storage SCP on loopback writing into ``tmp_path/received``."""
        with ReceivingSCP(tmp_path / "received") as scp:
            yield scp

except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pass
