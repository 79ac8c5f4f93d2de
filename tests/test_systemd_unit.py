"""The systemd unit shipped in examples/ is one systemd accepts, running a command rtauto has."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "examples" / "systemd" / "rtauto.service"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_the_unit_runs_rtauto_serve_and_lets_the_daemon_stop_its_children():
    section = service()
    command = shlex.split(section["ExecStart"])
    assert Path(command[0]).name == "rtauto" and command[1:3] == ["serve", "--config"]
    help_text = subprocess.run(
        [sys.executable, "-m", "rtauto.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert all(flag in help_text for flag in command[2::2])
    # SIGTERM to the daemon only (it stops the SCP's processes and the workers itself)
    assert (section["KillMode"], section["KillSignal"]) == ("mixed", "SIGTERM")
    assert section["Restart"] == "on-failure"


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    rtauto = Path(sys.executable).with_name("rtauto")
    text = UNIT.read_text().replace("/opt/rtauto/.venv/bin/rtauto", str(rtauto))
    # the rtauto user exists only on a server set up as the unit's comments say
    text = text.replace("User=rtauto", "User=root").replace("Group=rtauto", "Group=root")
    unit = tmp_path / "rtauto.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "rtauto.service" not in result.stderr, result.stderr
