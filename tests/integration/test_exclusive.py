"""One daemon per home and per port: a second one is refused with a clear reason, leaves
nothing running, and never takes a share of the first one's associations or jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtauto.config import Settings
from rtauto.daemon import Daemon
from rtauto.errors import RtautoError
from rtauto.testing import echoscu, free_port


def settings(root: Path, home: str, **overrides) -> Settings:
    (root / "workflows").mkdir(exist_ok=True)
    return Settings(home=root / home, workflows_dir=root / "workflows", **overrides)


def test_a_second_daemon_on_the_same_home_or_port_is_refused(tmp_path: Path):
    processes = 2  # receivers sharing the port through SO_REUSEPORT
    port = free_port()
    first = Daemon(
        settings(
            tmp_path, "a", scp={"port": port, "processes": 2}, web={"enabled": True, "port": 0}
        )
    )
    first.start()
    try:
        state = tmp_path / "a" / "daemon.json"
        assert state.exists()
        # the same home: its jobs would run twice
        same_home = Daemon(settings(tmp_path, "a", scp={"port": 0}))
        with pytest.raises(RtautoError, match=r"another rtauto daemon \(pid \d+\) is running"):
            same_home.start()
        assert state.exists()  # the refused daemon leaves the running one's state alone
        # another home on the same port: SO_REUSEPORT would have split the series between them
        same_port = Daemon(settings(tmp_path, "b", scp={"port": port, "processes": processes}))
        with pytest.raises(RtautoError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            same_port.start()
        # the dashboard's port
        same_web = Daemon(
            settings(tmp_path, "c", scp={"port": 0}, web={"enabled": True, "port": first.web_port})
        )
        with pytest.raises(RtautoError, match="the dashboard cannot listen"):
            same_web.start()
        assert same_web.scp is not None and same_web.scp._receiver is None  # stopped again
        assert echoscu(port)  # the first daemon still answers
    finally:
        first.stop()
    assert not state.exists()
    again = Daemon(settings(tmp_path, "a", scp={"port": port, "processes": processes}))
    again.start()  # the home and the port are free once the first daemon stopped
    try:
        assert echoscu(port)
    finally:
        again.stop()
