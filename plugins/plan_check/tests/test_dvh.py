"""The DVH engine against analytic answers: synthetic shapes here, the Nelms benchmark below."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from rtauto_plan_check.dvh import DoseGrid, Structure, compute_dvh
from rtauto_plan_check.nelms import METRICS, NelmsCase, d_points, nelms_cases, our_dvh


def _linear_dose(gradient_axis: int, spacing: float = 2.0) -> DoseGrid:
    """Dose = 10 Gy + 1 Gy/mm along one patient axis, on a grid around the origin."""
    n = 41
    coords = (np.arange(n) - n // 2) * spacing
    z, y, x = np.meshgrid(coords, coords, coords, indexing="ij")
    values = (10.0 + (x, y, z)[gradient_axis]).astype(np.float32)
    return DoseGrid(
        values=values,
        origin=np.array([coords[0], coords[0], coords[0]]),
        row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 1.0, 0]),
        normal=np.array([0, 0, 1.0]),
        pixel_spacing=(spacing, spacing),
        frame_offsets=coords - coords[0],
    )


def _box(half: float, planes: np.ndarray) -> Structure:
    square = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    return Structure(number=1, name="box", planes={float(z): [square] for z in planes})


def test_box_volume_and_dose_points_in_a_lateral_gradient() -> None:
    # a 20 x 20 mm box on planes -9..9 every 2 mm: with half-slice end caps it is 20 mm high
    box = _box(10.0, np.arange(-9, 10, 2))
    dvh = compute_dvh(box, _linear_dose(gradient_axis=0))
    assert dvh.volume == pytest.approx(8.0, rel=1e-9)  # cc, from the contours
    # dose is uniform in x over [0, 20] Gy: Dx% = 20 - x/100 * 20, mean 10
    assert dvh.mean == pytest.approx(10.0, abs=0.02)
    assert dvh.d_percent(95) == pytest.approx(1.0, abs=0.05)
    assert dvh.d_percent(50) == pytest.approx(10.0, abs=0.05)
    assert dvh.d_percent(5) == pytest.approx(19.0, abs=0.05)
    assert dvh.minimum == pytest.approx(0.0, abs=1e-6)
    assert dvh.maximum == pytest.approx(20.0, abs=1e-6)
    assert dvh.v_gy(15.1) == pytest.approx(1.96, abs=0.02)  # cc: x >= 5.1 mm
    assert dvh.v_gy_percent(15.1) == pytest.approx(24.5, abs=0.3)
    assert dvh.v_gy(25.0) == 0.0 and dvh.v_gy(-1.0) == pytest.approx(8.0)
    assert dvh.d_cc(0.4) == pytest.approx(19.0, abs=0.05)  # hottest 0.4 cc = last 1 mm
    assert dvh.metric("D0.03cc") == pytest.approx(dvh.d_cc(0.03))
    assert dvh.metric("V15.1Gy%") == pytest.approx(dvh.v_gy_percent(15.1))


def test_end_capping_option_changes_the_volume_only_at_the_ends() -> None:
    box = _box(10.0, np.arange(-9, 10, 2))
    assert box.volume_cc("half") == pytest.approx(8.0)
    assert box.volume_cc("none") == pytest.approx(7.2)  # 18 mm between the end contours
    dvh = compute_dvh(box, _linear_dose(gradient_axis=2), end_cap="none")
    assert dvh.volume == pytest.approx(7.2)
    assert dvh.maximum == pytest.approx(19.0, abs=1e-6)  # stops at the last contour, z = 9


def test_hole_is_subtracted_and_supersampling_converges() -> None:
    outer = np.array([[-10.0, -10], [10, -10], [10, 10], [-10, 10]])
    inner = np.array([[-5.0, -5], [5, -5], [5, 5], [-5, 5]])
    ring = Structure(1, "ring", planes={float(z): [outer, inner] for z in np.arange(-9, 10, 2)})
    assert ring.volume_cc() == pytest.approx((400 - 100) * 20 / 1000)
    dose = _linear_dose(gradient_axis=0)
    coarse = compute_dvh(ring, dose, supersample=1)
    fine = compute_dvh(ring, dose, supersample=8)
    assert fine.volume == pytest.approx(6.0)
    assert fine.mean == pytest.approx(10.0, abs=0.02)
    # the cold 5 %: x in [-10, -10 + 0.05 * 300 / 20 / 2] mm, i.e. below 10 - 10 + 0.375
    assert fine.d_percent(95) == pytest.approx(0.75, abs=0.05)
    assert abs(fine.d_percent(95) - 0.75) <= abs(coarse.d_percent(95) - 0.75) + 1e-9
    assert not ring.contains((0.0, 0.0, 0.0)) and ring.contains((7.5, 0.0, 0.0))


def test_dose_grid_geometry_from_a_dataset_with_reversed_frames(breast: Path) -> None:
    ds = pydicom.dcmread(breast / "rtdose.dcm")
    grid = DoseGrid.from_dataset(ds)
    ds.GridFrameOffsetVector = [-float(v) for v in ds.GridFrameOffsetVector]
    flipped = DoseGrid.from_dataset(ds)  # frames now run the other way along z
    assert grid.frame_spacing == pytest.approx(3.0)
    point = np.array([[72.5, -304.3, -9.3]])
    assert grid.sample(point)[1][0]
    assert math.isfinite(float(grid.sample(point)[0][0]))
    assert flipped.frame_spacing == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------
# Nelms benchmark
# ---------------------------------------------------------------------------------------------

# cGy: the analytic doses span 2.5-29.5 Gy; 1 % of the 28 Gy top of the gradient
ONE_PERCENT_CGY = 28.0


def nelms_errors(case: NelmsCase, dose_cache: dict) -> dict[str, float]:
    """Our value minus the analytic one: cGy for doses, percent for the volume."""
    dvh = our_dvh(case, dose_cache)
    ours = d_points(dvh)
    errors = {m: ours[m] - case.reference[m] for m in METRICS}
    errors["Volume%"] = 100.0 * (dvh.volume - case.reference["Volume"]) / case.reference["Volume"]
    return errors


@pytest.mark.slow
def test_nelms_benchmark_against_analytic_values(test_data: Path) -> None:
    # the 1, 2 and 3 mm structure sets (the 0.2 mm ones repeat the same shapes)
    cases = [c for c in nelms_cases(test_data) if "_02_" not in c.structure.name]
    assert len(cases) >= 60
    cache: dict = {}
    errors = [nelms_errors(case, cache) for case in cases]
    doses = np.array([[abs(e[m]) for m in METRICS] for e in errors])
    volumes = np.array([abs(e["Volume%"]) for e in errors])
    # every D-point within 1 % of the prescription (28 Gy), named when one is not
    beyond = {
        f"{case.structure.stem} {case.dose.stem} {metric}": round(float(error), 1)
        for case, row in zip(cases, doses, strict=True)
        for metric, error in zip(METRICS, row, strict=True)
        if error > ONE_PERCENT_CGY
    }
    assert not beyond
    # Dmin, Dmax, Dmean within 0.1 %; half the D-points within 0.02 %
    assert doses[:, :3].max() <= 0.1 * ONE_PERCENT_CGY
    assert np.median(doses) <= 0.02 * ONE_PERCENT_CGY
    assert volumes.max() <= 5.0
