"""Wall time of the full photon profile, with the DVH of every ROI, on the breast plan.

Runs the ``plan_check.run`` step (plan, structure set, dose and CT read from disk, 29 checks,
DVHs of all 9 contoured ROIs, report.json and report.html written) ``--repeat`` times and
prints the median wall time against the 2 s target. As a reference measured in the same run,
it also times reading the same four files with pydicom, so the ratio tells the cost of the
checks themselves on this machine.

    .venv/bin/python bench/plan_check.py [--repeat 7] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from rtauto_plan_check.step import PlanCheckParams

from rtauto.hooks import build_plugin_manager
from rtauto.steps import InputInstance, InputSeries, Provenance, StepContext, StudyInputs

TARGET_SECONDS = 2.0
MACHINES = {
    "txmachine": {
        "energies": {"PHOTON": [6, 10, 15]},
        "techniques": ["STATIC", "DYNAMIC", "ARC"],
        "max_dose_rate": 600,
    }
}


def _context(files: list[Path], workdir: Path) -> StepContext:
    series = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series.append(
            InputSeries(
                series_instance_uid=str(ds.SeriesInstanceUID),
                study_instance_uid=str(ds.StudyInstanceUID),
                modality=str(ds.Modality),
                instances=(
                    InputInstance(
                        str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID), path
                    ),
                ),
            )
        )
    return StepContext(
        job_id="bench",
        step_id="check",
        step_type="plan_check.run",
        attempt=1,
        workdir=workdir,
        job_dir=workdir.parent,
        study=StudyInputs(series[0].study_instance_uid, "bench", tuple(series)),
        previous={},
        provenance=Provenance(
            "0.1.0", "bench", "0" * 64, "bench", "check", "plan_check.run", "plan_check", "0.1.0"
        ),
        settings=None,
        destinations={},
        logger=logging.getLogger("bench.plan_check"),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(
        os.environ.get(
            "RTAUTO_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
        )
    )
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    folder = args.data / "dicompyler-core-example"
    files = sorted(folder.glob("*.dcm"))
    if not files:
        print(f"no breast plan under {folder}", file=sys.stderr)
        return 1
    step = (
        build_plugin_manager(
            autoload=False, extra_plugins={"plan_check": "rtauto_plan_check.plugin"}
        )
        .steps["plan_check.run"]
        .step_type
    )
    overrides = {
        "required_structures": {"names": ["External", "Heart", "Lung_L"]},
        "target_coverage": {"target": "Tumor Bed"},
    }
    params = PlanCheckParams(profile="photon-conventional", machines=MACHINES, overrides=overrides)
    times, reads, cpu_times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            ctx = _context(files, Path(tmp) / f"run{i}")
            (Path(tmp) / f"run{i}").mkdir()
            start, cpu_start = time.perf_counter(), time.process_time()
            result = step.run(ctx, params)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            start = time.perf_counter()
            for path in files:
                pydicom.dcmread(path).get("PixelData")
            reads.append(time.perf_counter() - start)
    median, reference = statistics.median(times), statistics.median(reads)
    print(f"plan_check.run, photon-conventional, DVH of every ROI: {result.summary}")
    print(
        f"median wall time over {args.repeat} runs: {median:.3f} s (target <= {TARGET_SECONDS} s)"
    )
    print(f"min {min(times):.3f} s, max {max(times):.3f} s")
    ratio = median / reference
    print(f"reference (pydicom reading the same files): {reference:.3f} s; ratio {ratio:.1f}")
    cpu = statistics.median(cpu_times)
    print(f"median CPU time of the process: {cpu:.3f} s (wall time on an idle core)")
    print("PASS" if median <= TARGET_SECONDS else "OVER TARGET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
