"""Fusion on real MR pairs (orthanc-tests): Knee T1/T2 and Brainix FLAIR/EPI.

Each pair was acquired in one session and shares a Frame of Reference, so the registration
must stay close to the identity while the similarity improves or holds; the REG objects must
be valid. The metric values are printed (run with ``-s``) for the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rtauto_image_guidance.plugin import RegisterParams, register_images
from rtauto_image_guidance.registration import cube_corners
from rtauto_image_guidance.testing import (
    dciodvfy_errors,
    dciodvfy_output,
    input_series,
    make_context,
)

PAIRS = {
    "knee-t1-t2": ("Knee/T1", "Knee/T2"),
    "brainix-flair-epi": ("Brainix/Flair", "Brainix/Epi"),
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_mr_pair_fusion(tmp_path: Path, test_data: Path, pair: str, independent_matrices) -> None:
    reference_dir, moving_dir = (test_data / "orthanc-tests" / p for p in PAIRS[pair])
    reference = input_series(sorted(reference_dir.glob("*.dcm")))
    moving = input_series(sorted(moving_dir.glob("*.dcm")))
    ctx = make_context(tmp_path, [reference, moving], patient_id=reference.attributes["PatientID"])
    reference_pattern = "^" + reference.attributes["SeriesDescription"].replace("(", r"\(")
    params = RegisterParams(
        couch_shift=False,
        resolution_mm=2.0,
        reference={"rule": "input", "series_description": reference_pattern},
        daily_description="^" + moving.attributes["SeriesDescription"].replace("(", r"\("),
    )
    result = register_images(ctx, params)
    quality = result.outputs["quality"]
    print(f"{pair}: {quality}")
    reg_path = next(a.path for a in ctx.artifacts if a.kind == "REG")
    assert dciodvfy_errors(reg_path) == [], dciodvfy_output(reg_path)
    rcs, matrices = independent_matrices(reg_path)
    assert rcs == reference.attributes["FrameOfReferenceUID"]
    moving_sops = frozenset(i.sop_instance_uid for i in moving.instances)
    matrix = matrices[(moving.attributes["FrameOfReferenceUID"], moving_sops)]
    assert quality["similarity_after"]["nmi"] >= quality["similarity_before"]["nmi"] - 1e-3
    assert quality["fov_overlap"] > 0.3
    assert quality["inverse_consistency_mm"] < 2.0
    # same session, same Frame of Reference: a few millimetres of motion at most
    center = np.array(result.outputs.get("isocenter_mm") or [0, 0, 0], float)
    corners = cube_corners(center, 50.0)
    moved = corners @ matrix[:3, :3].T + matrix[:3, 3]
    assert np.linalg.norm(moved - corners, axis=1).max() < 10.0
    report = next(a.path for a in ctx.artifacts if a.kind == "report-json")
    assert report.is_file()
