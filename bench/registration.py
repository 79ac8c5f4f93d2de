"""Rigid registration: rtauto's ``image_guidance.register`` step against itk-elastix's default.

A 256x256x128 pair is made from the DCPT head-phantom CT (real data): the planning image
resampled onto that grid, and a daily image through a known rigid transform with noise. Both
run in the same process on the same pair, one after the other, and the script prints each
one's time and error (largest displacement error at the corners of a 10 cm cube around the
isocentre, and rotation error), then the time ratio rtauto / elastix.

rtauto's time is the whole step (reading both DICOM series, registering with its quality
checks, writing the REG and the report); its registration time alone is printed as well.
elastix's is its registration of the in-memory images only.

    .venv/bin/python bench/registration.py [--cases 2] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813  (the library's usual name)
from rtauto_image_guidance.io import read_series
from rtauto_image_guidance.plugin import RegisterParams, register_images
from rtauto_image_guidance.registration import (
    cube_corners,
    rigid_register_elastix,
    rotation_angle_deg,
)
from rtauto_image_guidance.testing import (
    euler,
    input_series,
    make_context,
    matrix_of,
    simulate_daily,
    write_image_series,
)

SIZE = (256, 256, 128)


def _errors(
    found_daily_to_plan: np.ndarray, truth: np.ndarray, iso: np.ndarray
) -> tuple[float, float]:
    corners = cube_corners(iso, 100.0)
    moved = corners @ found_daily_to_plan[:3, :3].T + found_daily_to_plan[:3, 3]
    wanted = corners @ truth[:3, :3].T + truth[:3, 3]
    residual = found_daily_to_plan[:3, :3] @ truth[:3, :3].T
    return float(np.linalg.norm(moved - wanted, axis=1).max()), rotation_angle_deg(residual)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get(
        "RTAUTO_TEST_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--cases", type=int, default=2)
    args = parser.parse_args()
    files = sorted((Path(args.data) / "dcpt-headphantom" / "study").glob("CT*.dcm"))
    if not files:
        raise SystemExit(f"DCPT head phantom not found under {args.data}")
    source = read_series(files)
    lo = np.array(source.image.GetOrigin())
    extent = (np.array(source.image.GetSize()) - 1) * np.array(source.image.GetSpacing())
    spacing = tuple(float(e / (n - 1)) for e, n in zip(extent, SIZE, strict=True))
    iso = lo + extent / 2 + np.array([0.0, 20.0, 0.0])
    rng = np.random.default_rng(7)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        identity = sitk.Euler3DTransform()
        planning = simulate_daily(
            source.image, identity, center=lo + extent / 2, size=SIZE, spacing=spacing, noise_hu=0
        )
        plan_series = write_image_series(
            planning, tmp / "plan", patient_id="BENCH", series_description="Planning CT"
        )
        plan_input = input_series(plan_series.files)
        for case in range(args.cases):
            truth = euler(iso, rng.uniform(-3, 3, 3), rng.uniform(-10, 10, 3))
            daily = simulate_daily(
                planning,
                truth,
                center=lo + extent / 2,
                size=SIZE,
                spacing=spacing,
                noise_hu=20.0,
                rng=rng,
            )
            daily_series = write_image_series(
                daily,
                tmp / f"daily{case}",
                patient_id="BENCH",
                study_instance_uid=None,
                series_description="CBCT daily",
            )
            ctx = make_context(
                tmp, [plan_input, input_series(daily_series.files)], patient_id="BENCH"
            )
            params = RegisterParams(
                isocenter_mm=tuple(float(v) for v in iso),
                daily_description="CBCT",
                reference={"rule": "input", "series_description": "Planning"},
            )
            start = time.perf_counter()
            result = register_images(ctx, params)
            rtauto_s = time.perf_counter() - start
            report = next(a.path for a in ctx.artifacts if a.kind == "report-json")
            matrix = np.array(json.loads(report.read_text())["matrix_daily_to_reference"])
            rtauto_err = _errors(matrix, matrix_of(truth), iso)
            elastix_fixed_to_moving, elastix_s = rigid_register_elastix(planning, daily)
            elastix_err = _errors(np.linalg.inv(elastix_fixed_to_moving), matrix_of(truth), iso)
            registration_s = result.outputs["quality"]["elapsed_s"]
            rows.append((rtauto_s, registration_s, rtauto_err, elastix_s, elastix_err))
            print(
                f"case {case}: rtauto step {rtauto_s:.2f} s (registration {registration_s:.2f} s), "
                f"error {rtauto_err[0]:.3f} mm / {rtauto_err[1]:.3f} deg | "
                f"elastix {elastix_s:.2f} s, "
                f"error {elastix_err[0]:.3f} mm / {elastix_err[1]:.3f} deg | "
                f"ratio step/elastix {rtauto_s / elastix_s:.2f}, "
                f"registration/elastix {registration_s / elastix_s:.2f}",
                flush=True,
            )
    step = np.array([r[0] for r in rows])
    reg = np.array([r[1] for r in rows])
    elastix = np.array([r[3] for r in rows])
    print(
        f"summary over {len(rows)} cases ({SIZE[0]}x{SIZE[1]}x{SIZE[2]}): "
        f"rtauto step / elastix time ratio {step.sum() / elastix.sum():.2f} "
        f"(registration only {reg.sum() / elastix.sum():.2f}); "
        f"max error rtauto {max(r[2][0] for r in rows):.3f} mm, "
        f"elastix {max(r[4][0] for r in rows):.3f} mm"
    )


if __name__ == "__main__":
    main()
