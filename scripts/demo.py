"""`make demo`: the daemon on the embedded default, end to end, on this machine.

1. writes a synthetic planning CT (generated here, not downloaded) and a daemon configuration
   (SQLite store, local executor, loopback ports chosen by the OS) under demo-out/;
2. starts a second DICOM node (Orthanc) standing in for the treatment planning system;
3. starts ``rtauto serve`` and pushes the CT with dcmtk's storescu;
4. waits for workflows/demo.yaml to finish, prints the job summary and where the outputs went;
5. stops everything it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rtauto.store import Store
from rtauto.testing import OrthancServer, storescu, wait_for_port, write_ct_series

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-out"


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "workflows").mkdir(parents=True)
    (OUT / "results").mkdir()
    print("rtauto demo")
    print("- writing a synthetic planning CT (256x256x100, 1.5 mm x 1.5 mm x 3 mm)")
    ct = write_ct_series(
        OUT / "sample-ct",
        rows=256,
        cols=256,
        slices=100,
        spacing=(1.5, 1.5, 3.0),
        origin=(-192.0, -192.0, -150.0),
        series_description="Planning CT demo",
        patient_id="RTAUTO-DEMO",
        patient_name="Demo^Phantom",
    )

    orthanc = OrthancServer(OUT / "tps-orthanc", aet="TPS")
    print("- starting a second DICOM node (Orthanc, AE TPS) for the results")
    orthanc.start()
    daemon = None
    try:
        workflow = (ROOT / "workflows" / "demo.yaml").read_text()
        (OUT / "workflows" / "demo.yaml").write_text(workflow)
        config = {
            "home": str(OUT / "home"),
            "workflows_dir": str(OUT / "workflows"),
            "models_dir": str(ROOT / "models"),
            "scp": {"ae_title": "RTAUTO", "host": "127.0.0.1", "port": 0},
            "completion": {"series_quiet_seconds": 3},
            "destinations": {
                "tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": orthanc.dicom_port},
                "results": {"type": "folder", "path": str(OUT / "results")},
            },
            "log_level": "INFO",
        }
        config_path = OUT / "rtauto.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"- starting rtauto serve --config {config_path.relative_to(ROOT)}")
        log = open(OUT / "daemon.log", "wb")  # noqa: SIM115 (handed to the child)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "rtauto.cli", "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        state_path = OUT / "home" / "daemon.json"
        deadline = time.monotonic() + 180
        while not state_path.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print((OUT / "daemon.log").read_text()[-3000:])
                raise SystemExit("the daemon did not start")
            time.sleep(0.2)
        state = json.loads(state_path.read_text())
        wait_for_port(state["port"])
        print(f"  listening as RTAUTO on 127.0.0.1:{state['port']}")

        print(f"- pushing {len(ct.files)} CT slices with storescu")
        started = time.monotonic()
        storescu(state["port"], ct.files)
        print(f"  sent in {time.monotonic() - started:.1f} s; waiting for the demo workflow")

        store = Store(f"sqlite:///{OUT / 'home' / 'rtauto.db'}")
        deadline = time.monotonic() + 600
        job = None
        while time.monotonic() < deadline:
            jobs = store.list_jobs()
            if jobs and jobs[0].status in ("ok", "fail"):
                job = jobs[0]
                break
            time.sleep(0.5)
        if job is None:
            print((OUT / "daemon.log").read_text()[-3000:])
            raise SystemExit("the demo job did not finish in 10 minutes")
        elapsed = time.monotonic() - started
        print(f"- job finished {elapsed:.1f} s after the first slice was sent\n")
        subprocess.run(
            [sys.executable, "-m", "rtauto.cli", "jobs", job.id, "--config", str(config_path)],
            check=False,
        )
        print("\nwhere the outputs went:")
        for path in sorted((OUT / "results").rglob("*")):
            if path.is_file():
                print(f"  folder  {path.relative_to(ROOT)}")
        for oid in orthanc.instances():
            tags = orthanc.get(f"/instances/{oid}/simplified-tags")
            print(
                f"  TPS     {tags.get('Modality')} {tags.get('SOPInstanceUID')}"
                f"  '{tags.get('SeriesDescription', '')}'"
            )
        print(f"\nstate and logs: {OUT.relative_to(ROOT)}/ (daemon.log, home/)")
        return 0 if job.status == "ok" else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
        orthanc.stop()
        print("stopped the daemon and the demo TPS node")


if __name__ == "__main__":
    raise SystemExit(main())
