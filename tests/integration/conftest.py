"""The daemon as a subprocess, for tests that treat rtauto as a planning server would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rtauto.store import Store
from rtauto.testing import echoscu, wait_for_port, wait_until

SITE_PLUGINS = Path(__file__).with_name("site_plugins")


class DaemonProcess:
    """``rtauto serve`` in a subprocess with its own home, config and workflows folder."""

    def __init__(self, root: Path, config: dict[str, Any] | None = None):
        self.root = root
        self.home = root / "home"
        self.workflows = root / "workflows"
        self.workflows.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "rtauto.yaml"
        self.log_path = root / "daemon.log"
        self.config: dict[str, Any] = {
            "home": str(self.home),
            "workflows_dir": str(self.workflows),
            "scp": {"port": 0, "ae_title": "RTAUTO", "processes": 2},
            "completion": {"series_quiet_seconds": 2, "study_quiet_seconds": 4},
            "executor": {"workers": 2, "poll_seconds": 0.1},
            "plugin_modules": {"site": "rtauto_site_steps"},
            "log_level": "INFO",
        }
        for key, value in (config or {}).items():
            if isinstance(value, dict) and isinstance(self.config.get(key), dict):
                self.config[key].update(value)
            else:
                self.config[key] = value
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    def add_workflow(self, name: str, text: str) -> Path:
        path = self.workflows / f"{name}.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def start(self) -> DaemonProcess:
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SITE_PLUGINS), *filter(None, [env.get("PYTHONPATH")])]
        )
        state = self.home / "daemon.json"
        state.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rtauto.cli", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()

        def started() -> dict[str, Any] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"the daemon exited:\n{self.log()}")
            try:
                data = json.loads(state.read_text())
            except (OSError, ValueError):
                return None
            return data if data.get("pid") == self.process.pid else None

        data = wait_until(started, timeout=120)
        self.port = data["port"]
        wait_for_port(self.port)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        """SIGKILL the daemon and its whole process group (SCP children, workers)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def echo(self) -> bool:
        return echoscu(self.port, called_ae=self.config["scp"]["ae_title"])

    def store(self) -> Store:
        return Store(f"sqlite:///{self.home / 'rtauto.db'}")

    def jobs(self, workflow: str | None = None) -> list[Any]:
        store = self.store()
        try:
            return [j for j in store.list_jobs() if workflow is None or j.workflow_name == workflow]
        finally:
            store.close()

    def wait_for_jobs(self, workflow: str, count: int = 1, timeout: float = 180) -> list[Any]:
        def finished() -> list[Any] | None:
            jobs = [j for j in self.jobs(workflow) if j.status in ("ok", "fail")]
            return jobs if len(jobs) >= count else None

        try:
            return wait_until(finished, timeout=timeout, interval=0.3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log ---\n{self.log()[-6000:]}") from None


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(config: dict[str, Any] | None = None, name: str = "d") -> DaemonProcess:
        daemon = DaemonProcess(tmp_path / name, config)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        if daemon.process is not None:
            try:
                daemon.stop()
            except Exception:
                daemon.kill9()
