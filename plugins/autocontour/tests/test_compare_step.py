"""``autocontour.compare``: the figures against independent computations, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rtauto_autocontour.compare import CompareParams, compare_masks, run_compare
from scipy import ndimage as ndi

from rtauto.dicom.geometry import load_series
from rtauto.dicom.rtstruct import Structure, write_rtstruct
from rtauto.dicom.seg import write_seg
from rtauto.errors import StepFailed
from rtauto.steps import Artifact, PreviousStep
from rtauto.testing import write_ct_series


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple) -> np.ndarray:
    """Distances from each surface voxel of either mask to the other's surface, by exact
    Euclidean distance transforms (the step uses a k-d tree)."""
    surface_a = a & ~ndi.binary_erosion(a)
    surface_b = b & ~ndi.binary_erosion(b)
    return np.concatenate(
        [
            ndi.distance_transform_edt(~surface_b, sampling=spacing)[surface_a],
            ndi.distance_transform_edt(~surface_a, sampling=spacing)[surface_b],
        ]
    )


def test_figures_match_distance_transforms() -> None:
    spacing = (3.0, 1.5, 1.0)
    a = np.zeros((20, 40, 40), dtype=bool)
    a[5:15, 10:30, 8:28] = True
    same = compare_masks(a, a.copy(), spacing)
    assert (same["dice"], same["msd_mm"], same["hd95_mm"]) == (1.0, 0.0, 0.0)
    assert same["volume_ml"] == pytest.approx(10 * 20 * 20 * 4.5 / 1000)

    b = np.roll(a, 3, axis=2)  # 3 columns (3 mm) to the side
    figures = compare_masks(a, b, spacing)
    assert figures["dice"] == pytest.approx(17 / 20, abs=1e-4)
    distances = _surface_distances(a, b, spacing)
    assert figures["msd_mm"] == pytest.approx(distances.mean(), abs=1e-3)
    assert figures["hd95_mm"] == pytest.approx(np.percentile(distances, 95), abs=1e-3)

    empty = compare_masks(a, np.zeros_like(a), spacing)
    assert empty["dice"] == 0.0 and empty["msd_mm"] is None


def test_step_compares_a_previous_steps_rtstruct_with_the_reference(
    tmp_path: Path, make_context
) -> None:
    series = write_ct_series(tmp_path / "ct", rows=48, cols=48, slices=16, spacing=(2, 2, 3))
    volume = load_series(series.files)
    z, y, x = np.mgrid[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
    truth = ((x - 24) ** 2 + (y - 24) ** 2 < 15**2) & (z > 2) & (z < 13)
    ours = np.roll(truth, 2, axis=1)  # 2 rows (4 mm) off
    organ = (x - 20) ** 2 + (y - 20) ** 2 + (z - 8) ** 2 < 16
    reference = tmp_path / "reference" / "RS.reference.dcm"
    reference.parent.mkdir()
    write_rtstruct(
        volume,
        [Structure("External", truth), Structure("Organ", organ)],
        reference,
        label="CLINICAL",
    )
    produced = tmp_path / "produced.dcm"
    write_rtstruct(volume, [Structure("BODY", ours), Structure("Extra", organ)], produced)
    previous = {
        "body": PreviousStep(
            "body", "ok", {}, (Artifact(produced, "RTSTRUCT", modality="RTSTRUCT"),)
        )
    }
    ctx = make_context(
        [*series.files, reference],
        step_type="autocontour.compare",
        name="compare",
        previous=previous,
    )
    result = run_compare(ctx, CompareParams(match={"BODY": "external"}))
    body = result.outputs["structures"]["BODY"]
    assert body["reference_roi"] == "External"
    spacing = tuple(volume.spacing[::-1])
    expected = 2 * (truth & ours).sum() / (truth.sum() + ours.sum())
    assert body["dice"] == pytest.approx(expected, abs=1e-4)
    assert body["msd_mm"] == pytest.approx(
        _surface_distances(ours, truth, spacing).mean(), abs=1e-3
    )
    assert result.outputs["unmatched"] == ["Extra"]
    assert result.outputs["metrics"]["BODY.dice"] == body["dice"]
    [report] = [a for a in ctx.artifacts if a.kind == "report-json"]
    assert json.loads(report.path.read_text())["structures"]["BODY"] == body

    # the same structure as a SEG (another step's output) gives the same figures
    segmented = tmp_path / "produced-seg.dcm"
    write_seg(volume, [Structure("BODY", ours)], segmented)
    as_seg = {"seg": PreviousStep("seg", "ok", {}, (Artifact(segmented, "SEG", modality="SEG"),))}
    seg_ctx = make_context(
        [*series.files, reference], step_type="autocontour.compare", name="seg", previous=as_seg
    )
    from_seg = run_compare(seg_ctx, CompareParams(match={"BODY": "External"}))
    assert from_seg.outputs["structures"]["BODY"] == body

    # two steps (two model versions) that both wrote BODY: each is compared, as STEP/BODY
    both = {**previous, **as_seg}
    two_ctx = make_context(
        [*series.files, reference], step_type="autocontour.compare", name="two", previous=both
    )
    two = run_compare(two_ctx, CompareParams(match={"BODY": "External"}))
    assert set(two.outputs["structures"]) == {"body/BODY", "seg/BODY"}
    assert two.outputs["structures"]["body/BODY"] == body
    assert two.outputs["structures"]["seg/BODY"] == body
    assert two.outputs["metrics"]["seg/BODY.dice"] == body["dice"]
    assert two.outputs["unmatched"] == ["Extra"]  # only one step wrote it: its own name

    nothing = make_context(
        series.files, step_type="autocontour.compare", name="none", previous=previous
    )
    with pytest.raises(StepFailed, match="0 reference RTSTRUCTs"):
        run_compare(nothing, CompareParams())
    unmatched = make_context(
        [*series.files, reference], step_type="autocontour.compare", name="u", previous=previous
    )
    with pytest.raises(StepFailed, match="no structure .* has a counterpart"):
        run_compare(unmatched, CompareParams(structures=["BODY"]))
