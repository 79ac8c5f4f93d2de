"""DVH accuracy on the Nelms benchmark: rtauto's plan_check engine and dicompyler-core side by side.

For every spreadsheet row whose structure and dose grid are in the data set, both engines
compute Dmin, Dmax, Dmean, D99, D95, D5, D1 and D0.03cc; the script prints each engine's error
against the analytic value (cGy) per metric (mean and max of |error|), the share of D-points
within 1 % of the 28 Gy prescription, and, with ``--table``, every D-point.

    .venv/bin/python bench/dvh.py [--table] [--quick] [--data ../shared/data]

``--quick`` leaves out the 0.2 mm structure sets. Needs dicompyler-core and openpyxl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pydicom.dicomio

# dicompyler-core 0.5.6 imports pydicom 2's read_file, which pydicom 3 renamed dcmread
if not hasattr(pydicom.dicomio, "read_file"):
    pydicom.dicomio.read_file = pydicom.dcmread  # type: ignore[attr-defined]
from dicompylercore import dvhcalc  # noqa: E402
from rtauto_plan_check.nelms import METRICS, NelmsCase, d_points, nelms_cases, our_dvh  # noqa: E402

ONE_PERCENT_CGY = 28.0  # 1 % of the 28 Gy upper dose of the benchmark's gradients


def cases(root: Path, quick: bool) -> list[NelmsCase]:
    """The benchmark's cases; ``quick`` leaves out the 0.2 mm structure sets."""
    return [c for c in nelms_cases(root) if not (quick and "_02_" in c.structure.name)]


def ours(case: NelmsCase, doses: dict) -> dict[str, float]:
    return d_points(our_dvh(case, doses))


def dicompyler(case: dict, interpolate: bool = False) -> dict[str, float]:
    rtss = pydicom.dcmread(case.structure)
    roi = next(
        int(r.ReferencedROINumber) for r in rtss.ROIContourSequence if r.get("ContourSequence")
    )
    options = {}
    if interpolate:  # its own supersampling: 4 per dose pixel in plane, 2 between planes
        spacing = float(pydicom.dcmread(case.dose, stop_before_pixels=True).PixelSpacing[0])
        options = {
            "interpolation_resolution": spacing / 4,
            "interpolation_segments_between_planes": 2,
        }
    dvh = dvhcalc.get_dvh(str(case.structure), str(case.dose), roi, **options)
    values = {
        "Dmin": dvh.min,
        "Dmax": dvh.max,
        "Dmean": dvh.mean,
        "D99": dvh.statistic("D99").value,
        "D95": dvh.statistic("D95").value,
        "D5": dvh.statistic("D5").value,
        "D1": dvh.statistic("D1").value,
        "D0.03cc": dvh.statistic("D0.03cc").value,
    }
    return {k: 100.0 * float(v) for k, v in values.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(
            os.environ.get(
                "RTAUTO_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
            )
        ),
    )
    parser.add_argument("--table", action="store_true", help="print every D-point")
    parser.add_argument("--quick", action="store_true", help="leave out the 0.2 mm structures")
    parser.add_argument(
        "--dicompyler-interpolation",
        action="store_true",
        help="run dicompyler-core with its in-plane and between-plane interpolation",
    )
    args = parser.parse_args()
    found = cases(args.data, args.quick)
    if not found:
        print(f"no Nelms benchmark data under {args.data}", file=sys.stderr)
        return 1
    doses: dict = {}
    errors = {"rtauto": [], "dicompyler-core": []}
    seconds = {"rtauto": 0.0, "dicompyler-core": 0.0}
    if args.table:
        print(
            f"{'case':34s} {'metric':8s} {'analytic':>9s} {'rtauto':>9s} {'dicompyler':>10s}  (cGy)"
        )
    for case in found:
        results = {}
        for engine, compute in (
            ("rtauto", lambda c: ours(c, doses)),
            ("dicompyler-core", lambda c: dicompyler(c, args.dicompyler_interpolation)),
        ):
            start = time.perf_counter()
            results[engine] = compute(case)
            seconds[engine] += time.perf_counter() - start
            errors[engine].append([results[engine][m] - case.reference[m] for m in METRICS])
        if args.table:
            for m in METRICS:
                print(
                    f"{case.label:34s} {m:8s} {case.reference[m]:9.1f} {results['rtauto'][m]:9.1f} "
                    f"{results['dicompyler-core'][m]:10.1f}"
                )
    print(f"\nNelms benchmark: {len(found)} cases x {len(METRICS)} D-points; |error| in cGy")
    header = ("metric", "rtauto mean", "rtauto max", "dcore mean", "dcore max")
    print(f"{header[0]:8s} {header[1]:>12s} {header[2]:>11s} {header[3]:>11s} {header[4]:>10s}")
    ours_abs = np.abs(np.asarray(errors["rtauto"]))
    theirs_abs = np.abs(np.asarray(errors["dicompyler-core"]))
    for i, m in enumerate(METRICS):
        print(
            f"{m:8s} {ours_abs[:, i].mean():12.1f} {ours_abs[:, i].max():11.1f} "
            f"{theirs_abs[:, i].mean():11.1f} {theirs_abs[:, i].max():10.1f}"
        )
    for engine, values in (("rtauto", ours_abs), ("dicompyler-core", theirs_abs)):
        within = 100.0 * np.mean(values <= ONE_PERCENT_CGY)
        print(
            f"{engine:16s} all D-points: mean |error| {values.mean():5.1f} cGy, median "
            f"{np.median(values):5.1f}, max {values.max():6.1f}; within 1 % of 28 Gy: "
            f"{within:5.1f} %; {seconds[engine]:.1f} s"
        )
    beyond = [
        f"{case.label} {m}"
        for case, row in zip(found, ours_abs, strict=True)
        for m, error in zip(METRICS, row, strict=True)
        if error > ONE_PERCENT_CGY
    ]
    print(f"rtauto D-points beyond 1 % ({len(beyond)}): {', '.join(beyond) or 'none'}")
    ratio = ours_abs.mean() / max(theirs_abs.mean(), 1e-9)
    print(f"mean |error| ratio rtauto / dicompyler-core: {ratio:.2f}")
    speed = seconds["rtauto"] / seconds["dicompyler-core"]
    print(f"run time ratio rtauto / dicompyler-core: {speed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
