"""kill -9 of the process running a routing step, mid-association: after the re-run every
item has been delivered exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from rtauto.testing import write_ct_series

WORKER = Path(__file__).with_name("_route_worker.py")


def run_worker(spec: dict, path: Path) -> subprocess.Popen[str]:
    path.write_text(json.dumps(spec))
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_during_delivery_then_rerun_delivers_each_item_once(store, job, kit, tmp_path):
    series = write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=12)
    workdir = tmp_path / "jobs" / job.id / "send"
    workdir.mkdir(parents=True)
    killed = threading.Event()
    worker: dict[str, subprocess.Popen[str]] = {}

    def kill_on_sixth(n: int) -> int | None:
        if n == 6 and not killed.is_set():
            # the sender dies while the sixth C-STORE waits for its response
            os.kill(worker["process"].pid, signal.SIGKILL)
            worker["process"].wait()
            killed.set()
            return 0xA700
        return None

    with kit.CountingSCP(tmp_path / "counted") as scp:
        scp.on_store = kill_on_sixth
        spec = {
            "store_url": store.url,
            "job_id": job.id,
            "port": scp.port,
            "files": [str(f) for f in series.files],
            "attempt": 1,
            "max_attempts": 3,
            "workdir": str(workdir),
        }
        worker["process"] = run_worker(spec, tmp_path / "spec1.json")
        worker["process"].wait(timeout=120)
        assert killed.is_set() and worker["process"].returncode == -signal.SIGKILL
        statuses = [r.status for r in store.deliveries_of(job.id)]
        assert statuses == ["delivered"] * 5 + ["sending"] * 7

        rerun = run_worker({**spec, "attempt": 2}, tmp_path / "spec2.json")
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err

    assert json.loads(out) == {"delivered": 7, "destination": "tps", "already_delivered": 5}
    assert scp.received == series.sop_instance_uids  # every slice once, none twice
    assert [r.status for r in store.deliveries_of(job.id)] == ["delivered"] * 12
