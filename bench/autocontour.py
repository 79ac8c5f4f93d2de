"""Benchmark of the autocontour plugin on the demo model and a 512x512x177 CT.

    .venv/bin/python bench/autocontour.py [--repeat 2] [--ct DIR]

(a) overhead: the ``autocontour.segment`` step's wall time (DICOM load, preprocessing,
    sliding window, resampling, post-processing, RTSTRUCT writing) against the backend's raw
    inference time on the same preprocessed tensor (the sum of ONNX Runtime ``run`` calls
    over the same patches), measured in the same run. Also the sliding-window stage alone.
(b) PyTorch (TorchScript, ``demo-thorax-ts``) against ONNX Runtime (``demo-thorax``) for the
    same network on the same tensor, and the peak RSS of a whole step with each, measured in
    a fresh process per backend.
(c) daemon latency (last slice received -> RTSTRUCT delivered): see
    :func:`measure_daemon_latency`.

Every figure is printed as a ratio against a reference measured in the same run; absolute
seconds are printed for context only (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def measure_daemon_latency(ct_dir: Path, workdir: Path) -> dict[str, float]:
    """(c) Seconds from the last CT slice received by the daemon to the RTSTRUCTs delivered.

    The daemon runs in this process (SCP on a free loopback port) with
    workflows/autocontour-ct.yaml; storescu sends the CT; a pynetdicom SCP stands in for the
    TPS. The time includes the workflow's series quiet period (reported separately).
    """
    import yaml

    from rtauto.config import Settings
    from rtauto.daemon import Daemon
    from rtauto.testing import ReceivingSCP, storescu

    workflow = yaml.safe_load((ROOT / "workflows" / "autocontour-ct.yaml").read_text())
    quiet = float(str(workflow["completion"]["series_quiet"]).rstrip("s"))
    (workdir / "workflows").mkdir(parents=True)
    shutil.copy(ROOT / "workflows" / "autocontour-ct.yaml", workdir / "workflows")
    (workdir / "results").mkdir()
    files = sorted(ct_dir.glob("*.dcm"))
    with ReceivingSCP(workdir / "tps", ae_title="TPS") as tps:
        settings = Settings(
            home=workdir / "home",
            workflows_dir=workdir / "workflows",
            models_dir=ROOT / "models",
            scp={"port": 0},
            destinations={
                "tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.port},
                "results": {"type": "folder", "path": str(workdir / "results")},
            },
        )
        daemon = Daemon(settings)
        daemon.start()
        try:
            storescu(daemon.scp_port, files)
            last_received = time.time()
            deadline = time.monotonic() + 600
            while len(tps.received) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            delivered = time.time()
            if len(tps.received) < 2:
                raise RuntimeError("the RTSTRUCTs did not reach the TPS within 10 minutes")
        finally:
            daemon.stop()
    total = delivered - last_received
    return {
        "c_daemon_latency_s": total,
        "c_quiet_period_s": quiet,
        "c_after_quiet_s": total - quiet,
    }


def _context(files: list[Path], workdir: Path, name: str):
    import pydicom

    from rtauto.config import Settings
    from rtauto.steps import InputInstance, InputSeries, Provenance, StepContext, StudyInputs

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    instances = tuple(
        InputInstance(
            str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID),
            str(first.SOPClassUID),
            str(first.SeriesInstanceUID),
            path,
        )
        for path in files
    )
    series = InputSeries(str(first.SeriesInstanceUID), str(first.StudyInstanceUID), "CT", instances)
    workdir.mkdir(parents=True, exist_ok=True)
    return StepContext(
        job_id="bench",
        step_id=name,
        step_type="autocontour.segment",
        attempt=1,
        workdir=workdir,
        job_dir=workdir.parent,
        study=StudyInputs(str(first.StudyInstanceUID), str(first.PatientID), (series,)),
        previous={},
        provenance=Provenance(
            "0.1.0", "bench", "0" * 64, "bench", name, "autocontour.segment", "autocontour", "0.1.0"
        ),
        settings=Settings(home=workdir / "home", models_dir=MODELS),
        destinations={},
        logger=logging.getLogger("bench"),
    )


def _write_ct(folder: Path) -> list[Path]:
    from rtauto.testing import ct_phantom, write_ct_series

    spacing = (0.8, 0.8, 2.0)
    hu = ct_phantom(512, 512, 177, spacing, seed=7)
    series = write_ct_series(folder, hu=hu, spacing=spacing, origin=(-204.8, -204.8, -176.0))
    return series.files


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process image and starts
    afresh at exec; ru_maxrss would report the parent's peak when that one was larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(backend_ref: str, ct: Path, out: Path) -> None:
    """One whole step in this (fresh) process; prints its peak RSS and wall time as JSON."""
    from rtauto_autocontour.steps import SegmentParams, run_segment

    files = sorted(ct.glob("*.dcm"))
    start = time.perf_counter()
    run_segment(_context(files, out, "child"), SegmentParams(model=backend_ref, device="cpu"))
    wall = time.perf_counter() - start
    peak_mb = _peak_rss_mb()
    print(json.dumps({"model": backend_ref, "wall_s": wall, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--ct", type=Path, help="a CT series folder (default: synthetic)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.ct, args.out)
        return

    from rtauto_autocontour.backends import load_predictor
    from rtauto_autocontour.inference import preprocess, run_network
    from rtauto_autocontour.registry import ModelRegistry
    from rtauto_autocontour.steps import SegmentParams, run_segment

    from rtauto.dicom.geometry import load_series

    with tempfile.TemporaryDirectory(prefix="rtauto-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.ct:
            files = sorted(p for p in args.ct.glob("*.dcm") if p.name.startswith("CT"))
            ct_dir = args.ct
        else:
            ct_dir = tmp_path / "ct"
            files = _write_ct(ct_dir)
        volume = load_series(files)
        print(
            f"CT {volume.shape[2]}x{volume.shape[1]}x{volume.shape[0]}, spacing "
            f"{tuple(round(s, 3) for s in volume.spacing)} mm"
        )
        registry = ModelRegistry(MODELS)
        onnx_model = registry.resolve("demo-thorax@latest")
        torch_model = registry.resolve("demo-thorax-ts@latest")
        onnx = load_predictor(onnx_model, device="cpu")
        torch_predictor = load_predictor(torch_model, device="cpu")
        tensor = preprocess(volume, onnx_model.card)
        print(f"network input {tuple(tensor.tensor.shape)}")

        batch = SegmentParams(model="demo-thorax@latest").sw_batch_size  # as the step runs
        step_walls, raw, sliding, torch_raw = [], [], [], []
        stages: dict[str, list[float]] = {}
        for repeat in range(args.repeat + 1):  # the first round warms caches and is dropped
            ctx = _context(files, tmp_path / f"step{repeat}", f"step{repeat}")
            start = time.perf_counter()
            step = run_segment(ctx, SegmentParams(model="demo-thorax@latest", device="cpu"))
            step_wall = time.perf_counter() - start
            timings: dict[str, float] = {}
            start = time.perf_counter()
            run_network(tensor, onnx_model.card, onnx, sw_batch_size=batch, timings=timings)
            sliding_wall = time.perf_counter() - start
            torch_timings: dict[str, float] = {}
            run_network(
                tensor,
                torch_model.card,
                torch_predictor,
                sw_batch_size=batch,
                timings=torch_timings,
            )
            if repeat:
                step_walls.append(step_wall)
                raw.append(timings["network"])
                sliding.append(sliding_wall)
                torch_raw.append(torch_timings["network"])
                for stage, seconds in step.outputs["timings"].items():
                    stages.setdefault(stage, []).append(seconds)

        med = statistics.median
        results = {
            "a_step_wall_s": med(step_walls),
            "a_raw_inference_s": med(raw),
            "a_overhead_ratio": med(step_walls) / med(raw),
            "a_sliding_window_ratio": med(sliding) / med(raw),
            **{f"a_step_{stage}_s": med(seconds) for stage, seconds in stages.items()},
            "b_torch_inference_s": med(torch_raw),
            "b_torch_over_onnx_ratio": med(torch_raw) / med(raw),
        }
        for ref in ("demo-thorax@latest", "demo-thorax-ts@latest"):
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    ref,
                    "--ct",
                    str(ct_dir),
                    "--out",
                    str(tmp_path / f"child-{ref}"),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            line = json.loads(child.stdout.strip().splitlines()[-1])
            key = "onnx" if "ts" not in ref else "torch"
            results[f"b_{key}_step_peak_rss_mb"] = line["peak_rss_mb"]
            results[f"b_{key}_step_wall_s"] = line["wall_s"]
        results["b_torch_over_onnx_peak_rss_ratio"] = (
            results["b_torch_step_peak_rss_mb"] / results["b_onnx_step_peak_rss_mb"]
        )
        results.update(measure_daemon_latency(Path(ct_dir), tmp_path / "daemon"))

    print(
        f"(a) step wall / raw ONNX Runtime inference: {results['a_overhead_ratio']:.2f} "
        f"(target <= 1.15); sliding window / raw: {results['a_sliding_window_ratio']:.2f}"
    )
    breakdown = ", ".join(
        f"{stage} {statistics.median(seconds):.2f}"
        for stage, seconds in stages.items()
        if stage != "total"
    )
    print(f"    the step's stages in seconds: {breakdown} (network is within sliding_window)")
    print(
        f"(b) PyTorch / ONNX Runtime inference: {results['b_torch_over_onnx_ratio']:.2f}; "
        f"peak RSS of a step, PyTorch / ONNX Runtime: "
        f"{results['b_torch_over_onnx_peak_rss_ratio']:.2f}"
    )
    print(
        f"(c) last slice received -> RTSTRUCTs delivered by the daemon: "
        f"{results['c_daemon_latency_s']:.1f} s (target <= 30 s), of which the workflow's "
        f"series quiet period {results['c_quiet_period_s']:.0f} s"
    )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
