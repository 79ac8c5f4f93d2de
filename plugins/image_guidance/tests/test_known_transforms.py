"""Known-transform recovery and couch-shift signs on the real DCPT head-phantom CT.

Simulated daily images: the planning CT resampled through a random rigid transform (up to
10 mm and 3 degrees), on a cropped CBCT-like field of view, with noise, written as a new
series with its own Frame of Reference. The ``image_guidance.register`` step must write a REG
whose matrix (read back by tag number) maps the daily image onto the planning CT within 0.5 mm
at the corners of a 10 cm cube around the isocentre and 0.2 degrees, at the 95th percentile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from rtauto_image_guidance.couch import couch_shift
from rtauto_image_guidance.io import SeriesImage, read_series
from rtauto_image_guidance.plugin import RegisterParams, register_images
from rtauto_image_guidance.registration import cube_corners
from rtauto_image_guidance.testing import (
    dciodvfy_errors,
    euler,
    input_series,
    make_context,
    matrix_of,
    simulate_daily,
    write_image_series,
)

CASES = 10


@pytest.fixture(scope="module")
def planning(test_data: Path) -> tuple[list[Path], SeriesImage, np.ndarray]:
    files = sorted((test_data / "dcpt-headphantom" / "study").glob("CT*.dcm"))
    assert len(files) == 177
    image = read_series(files)
    # isocentre in the head, above the support slabs
    iso = image.center() + np.array([0.0, 20.0, 0.0])
    return files, image, iso


def _run_case(
    tmp_path: Path,
    planning: tuple[list[Path], SeriesImage, np.ndarray],
    daily_to_planning,
    *,
    name: str,
    direction: np.ndarray | None = None,
    patient_position: str = "HFS",
    seed: int = 0,
):
    files, plan, iso = planning
    daily = simulate_daily(
        plan.image,
        daily_to_planning,
        center=iso,
        size=(180, 180, 70),
        spacing=(1.0, 1.0, 2.0),
        direction=direction,
        noise_hu=20.0,
        rng=np.random.default_rng(seed),
    )
    written = write_image_series(
        daily,
        tmp_path / name,
        patient_id=plan.patient_id,
        patient_position=patient_position,
        series_description="CBCT daily",
    )
    ctx = make_context(
        tmp_path, [input_series(files), input_series(written.files)], patient_id=plan.patient_id
    )
    params = RegisterParams(
        isocenter_mm=tuple(float(v) for v in iso),
        reference={"rule": "input", "series_description": "(?i)^(?!cbct)"},
        daily_description="(?i)cbct",
    )
    result = register_images(ctx, params)
    return ctx, result, written


def test_known_transforms_are_recovered(tmp_path, planning, independent_matrices) -> None:
    files, plan, iso = planning
    rng = np.random.default_rng(2024)
    corners = cube_corners(iso, 100.0)
    errors_mm, errors_deg = [], []
    for case in range(CASES):
        angles = rng.uniform(-3.0, 3.0, 3)
        translation = rng.uniform(-10.0, 10.0, 3)
        truth = euler(iso, angles, translation)
        ctx, result, written = _run_case(tmp_path, planning, truth, name=f"daily{case}", seed=case)
        reg_path = next(a.path for a in ctx.artifacts if a.kind == "REG")
        assert dciodvfy_errors(reg_path) == []
        rcs, matrices = independent_matrices(reg_path)
        assert rcs == plan.frame_of_reference_uid
        found = matrices[(written.frame_of_reference_uid, frozenset(written.sop_instance_uids))]
        expected = matrix_of(truth)
        moved = corners @ found[:3, :3].T + found[:3, 3]
        wanted = corners @ expected[:3, :3].T + expected[:3, 3]
        errors_mm.append(float(np.linalg.norm(moved - wanted, axis=1).max()))
        residual = found[:3, :3] @ expected[:3, :3].T
        errors_deg.append(
            float(np.degrees(np.arccos(np.clip((np.trace(residual) - 1) / 2, -1, 1))))
        )
        print(
            f"case {case}: angles {np.round(angles, 2)} deg,"
            f" translation {np.round(translation, 2)} mm"
            f" -> corner error {errors_mm[-1]:.3f} mm, rotation error {errors_deg[-1]:.3f} deg,"
            f" quality {result.outputs['quality']}"
        )
    p95_mm = float(np.percentile(errors_mm, 95))
    p95_deg = float(np.percentile(errors_deg, 95))
    print(f"95th percentile over {CASES} cases: {p95_mm:.3f} mm, {p95_deg:.3f} deg")
    assert p95_mm <= 0.5
    assert p95_deg <= 0.2


# Anatomy displacement (patient coordinates, planned -> daily) and the couch correction it
# needs, derived by hand from IEC 61217 and DICOM LPS (see couch.py): for HFS the patient's
# left is +X (lateral), head is +Y (longitudinal), anterior is +Z (up); for HFP left is -X
# and anterior is down.
SIGN_CASES = {
    "HFS": [
        ((0, 0, 0), (5, 0, 0), dict(lateral_mm=-5)),
        ((0, 0, 0), (0, 0, 5), dict(longitudinal_mm=-5)),
        ((0, 0, 0), (0, -5, 0), dict(vertical_mm=-5)),
        ((2, 0, 0), (0, 0, 0), dict(pitch_deg=-2)),
        ((0, 0, 2), (0, 0, 0), dict(roll_deg=-2)),
        ((0, 2, 0), (0, 0, 0), dict(yaw_deg=2)),
    ],
    "HFP": [
        ((0, 0, 0), (5, 0, 0), dict(lateral_mm=5)),
        ((0, 0, 0), (0, 0, 5), dict(longitudinal_mm=-5)),
        ((0, 0, 0), (0, -5, 0), dict(vertical_mm=5)),
        ((2, 0, 0), (0, 0, 0), dict(pitch_deg=2)),
        ((0, 0, 2), (0, 0, 0), dict(roll_deg=-2)),
        ((0, 2, 0), (0, 0, 0), dict(yaw_deg=-2)),
    ],
}
AXES = ("lateral_mm", "longitudinal_mm", "vertical_mm", "pitch_deg", "roll_deg", "yaw_deg")


@pytest.mark.parametrize("position", ["HFS", "HFP"])
def test_couch_shift_signs_per_axis(position: str) -> None:
    iso = np.array([10.0, -20.0, 30.0])
    for angles, translation, expected in SIGN_CASES[position]:
        displacement = matrix_of(euler(iso, angles, translation))
        shift = couch_shift(displacement, iso, position).to_json()
        for axis in AXES:
            assert shift[axis] == pytest.approx(expected.get(axis, 0.0), abs=1e-6), (axis, shift)


@pytest.mark.parametrize("position", ["HFS", "HFP"])
def test_couch_shift_from_images(tmp_path, planning, position: str) -> None:
    """End to end: the daily image of a displaced patient, HFS or HFP, gives the right shift."""
    _, _, iso = planning
    # anatomy 4 mm towards the patient's left, 6 mm towards the head, 3 mm anterior, and
    # rotated 1.5 degrees about the head-feet axis
    displacement = euler(iso, (0.0, 0.0, 1.5), (4.0, -3.0, 6.0))
    daily_to_planning = displacement.GetInverse()
    # an HFP scanner writes rows right-to-left, columns posterior-to-anterior
    direction = np.diag([-1.0, -1.0, 1.0]) if position == "HFP" else None
    _, result, _ = _run_case(
        tmp_path,
        planning,
        daily_to_planning,
        name="daily",
        direction=direction,
        patient_position=position,
    )
    shift = result.outputs["couch_shift"]
    lateral = -4.0 if position == "HFS" else 4.0
    vertical = -3.0 if position == "HFS" else 3.0
    assert shift["lateral_mm"] == pytest.approx(lateral, abs=0.3)
    assert shift["longitudinal_mm"] == pytest.approx(-6.0, abs=0.3)
    assert shift["vertical_mm"] == pytest.approx(vertical, abs=0.3)
    assert shift["roll_deg"] == pytest.approx(-1.5, abs=0.2)
    assert shift["pitch_deg"] == pytest.approx(0.0, abs=0.2)
    assert shift["yaw_deg"] == pytest.approx(0.0, abs=0.2)
    assert result.outputs["outcome"] == "flag"  # 6 mm is beyond the 3 mm default action level


def test_couch_rotations_turn_about_the_plans_isocentre(tmp_path, planning, test_data) -> None:
    """The real RT Ion Plan's isocentre is found in the job's input and the couch shift is
    written about it: anatomy turned 3 degrees about that isocentre needs a pure rotation,
    while about the centre of the daily field of view it would read as a translation too."""
    files, plan, _ = planning
    plan_file = next((test_data / "dcpt-headphantom" / "study").glob("RN*.dcm"))
    ion_plan = pydicom.dcmread(plan_file)  # read here independently of the step
    plan_iso = np.array(
        [float(v) for v in ion_plan.IonBeamSequence[0].IonControlPointSequence[0].IsocenterPosition]
    )
    # the daily field of view centred 30 mm left of and 20 mm behind the isocentre
    view_center = plan_iso + np.array([30.0, 20.0, 0.0])
    displacement = euler(plan_iso, (0.0, 0.0, 3.0), (0.0, 0.0, 0.0))  # planned -> daily
    daily = simulate_daily(
        plan.image,
        displacement.GetInverse(),
        center=view_center,
        size=(180, 180, 70),
        spacing=(1.0, 1.0, 2.0),
        rng=np.random.default_rng(3),
    )
    written = write_image_series(
        daily, tmp_path / "daily", patient_id=plan.patient_id, series_description="CBCT daily"
    )
    inputs = [input_series(files), input_series([plan_file]), input_series(written.files)]
    params = {
        "reference": {"rule": "input", "series_description": "(?i)^(?!cbct)"},
        "daily_description": "(?i)cbct",
    }
    ctx = make_context(tmp_path, inputs, patient_id=plan.patient_id)
    result = register_images(ctx, RegisterParams(isocenter_from="plan", **params))
    source = result.outputs["isocenter_source"]
    assert source["source"] == "plan (input)"
    assert source["plan_sop_instance_uid"] == str(ion_plan.SOPInstanceUID)
    assert result.outputs["isocenter_mm"] == pytest.approx(plan_iso.tolist(), abs=1e-3)
    shift = result.outputs["couch_shift"]
    assert shift["roll_deg"] == pytest.approx(-3.0, abs=0.2)
    for axis in ("lateral_mm", "longitudinal_mm", "vertical_mm"):
        assert shift[axis] == pytest.approx(0.0, abs=0.4), (axis, shift)

    # about the daily image's centre the same correction carries a translation of
    # |(R - I)(centre - isocentre)| = 2 sin(1.5 deg) * 36 mm = 1.9 mm
    ctx = make_context(tmp_path, inputs, patient_id=plan.patient_id)
    centred = register_images(ctx, RegisterParams(isocenter_from="image_center", **params))
    assert centred.outputs["isocenter_source"] == {"source": "image_center"}
    moved = centred.outputs["couch_shift"]
    lever = np.linalg.norm((view_center - plan_iso)[:2])
    expected = 2 * np.sin(np.radians(1.5)) * lever
    translation = np.hypot(moved["lateral_mm"], moved["vertical_mm"])
    print(f"about the plan isocentre: {shift}; about the image centre: {moved}")
    assert translation == pytest.approx(expected, abs=0.4)
