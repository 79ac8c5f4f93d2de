"""DICOM TLS on the storage SCP, with dcmtk's storescu/echoscu as TLS clients."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rtauto.config import ScpSettings, ScpTls, Settings
from rtauto.errors import ConfigError
from rtauto.ingest.scp import StorageSCP
from rtauto.store import Store
from rtauto.testing import make_tls_files, require_tool, write_ct_series


@contextmanager
def tls_scp(tmp_path: Path, tls: ScpTls, **scp: object) -> Iterator[tuple[int, Store]]:
    settings = Settings(
        home=tmp_path / "home", scp=ScpSettings(ae_title="RTAUTO", port=0, tls=tls, **scp)
    )
    settings.ensure_dirs()
    store = Store(settings.database_url, migrate=True)
    server = StorageSCP(settings, settings.database_url)
    port = server.start()
    try:
        yield port, store
    finally:
        server.stop()
        store.close()


def dcmtk(
    tool: str, port: int, *options: str | Path, files: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    command = [require_tool(tool), "-aec", "RTAUTO", *map(str, options), "127.0.0.1", str(port)]
    command += [str(f) for f in files]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("implementation", "processes"), [("native", 1), ("native", 2), ("pynetdicom", 1)]
)
def test_tls_clients_store_and_plain_ones_are_turned_away(
    tmp_path: Path, implementation: str, processes: int
) -> None:
    files = make_tls_files(tmp_path / "tls")
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=4)
    tls = ScpTls(cert_file=files["cert"], key_file=files["key"])
    with tls_scp(tmp_path, tls, implementation=implementation, processes=processes) as (
        port,
        store,
    ):
        secure = ("+tla", "+cf", files["ca"])  # the client checks rtauto's certificate
        sent = dcmtk("storescu", port, *secure, files=tuple(series.files))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        # a plain client gets no association and nothing is stored
        other = write_ct_series(tmp_path / "c2", slices=1).files
        plain = dcmtk("storescu", port, files=tuple(other))
        assert plain.returncode != 0
        # a client that does not trust rtauto's certificate stops at the handshake
        untrusted = dcmtk("echoscu", port, "+tla")
        assert untrusted.returncode != 0
        assert dcmtk("echoscu", port, *secure).returncode == 0  # still serving
        stored = sorted(store.instance_paths())
    assert len(stored) == 4


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls", clients=["linac"])
    other = make_tls_files(tmp_path / "other-ca", clients=["stranger"])
    tls = ScpTls(cert_file=files["cert"], key_file=files["key"], client_ca_file=files["ca"])
    with tls_scp(tmp_path, tls) as (port, _store):
        trusted = ("+cf", files["ca"])
        assert dcmtk("echoscu", port, "+tla", *trusted).returncode != 0  # no certificate
        stranger = ("+tls", other["stranger.key"], other["stranger.cert"])
        assert dcmtk("echoscu", port, *stranger, *trusted).returncode != 0  # another CA
        linac = ("+tls", files["linac.key"], files["linac.cert"])
        echo = dcmtk("echoscu", port, *linac, *trusted)
        assert echo.returncode == 0, echo.stdout + echo.stderr


def test_unreadable_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    tls = ScpTls(cert_file=tmp_path / "missing.pem", key_file=tmp_path / "missing.key")
    with (
        pytest.raises(ConfigError, match="scp.tls: cannot load .*missing.pem"),
        tls_scp(tmp_path, tls),
    ):
        pass
