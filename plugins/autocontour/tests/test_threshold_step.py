"""autocontour.threshold: BODY without the couch, lungs on the right side for any position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from rtauto_autocontour.steps import ThresholdParams, run_threshold
from scipy import ndimage as ndi

from rtauto.dicom.geometry import load_series
from rtauto.dicom.rtstruct import read_rtstruct
from rtauto.testing import ct_phantom, write_ct_series

# The same anatomy in patient space written with each patient position: array flips undo the
# orientation so that patient left stays patient left.
POSITIONS = {
    "HFS": ((1, 0, 0, 0, 1, 0), (-128.0, -128.0, -60.0), (slice(None), slice(None))),
    "HFP": ((-1, 0, 0, 0, -1, 0), (126.0, 126.0, -60.0), (slice(None, None, -1),) * 2),
    "FFS": ((-1, 0, 0, 0, 1, 0), (126.0, -128.0, 57.0), (slice(None), slice(None, None, -1))),
}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _phantom_truth(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    body = np.stack([ndi.binary_fill_holes(s) for s in hu > -350])
    components, _ = ndi.label(body)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    body = components == sizes.argmax()  # the couch is a separate component
    lungs = (hu < -400) & body
    columns = np.arange(hu.shape[2])[None, None, :]
    return body, lungs & (columns >= hu.shape[2] / 2), lungs & (columns < hu.shape[2] / 2)


@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_body_and_lungs(tmp_path: Path, position: str, make_context, dciodvfy) -> None:
    orientation, origin, flip = POSITIONS[position]
    hu = ct_phantom(96, 96, 24, (2.0, 2.0, 3.0), seed=2)
    # FFS: slices are written along -z, so reverse them to keep the anatomy in patient space
    written = hu[::-1] if position == "FFS" else hu
    written = np.ascontiguousarray(written[(slice(None), *flip)])
    series = write_ct_series(
        tmp_path / "ct",
        hu=written,
        spacing=(2.0, 2.0, 3.0),
        patient_position=position,
        orientation=orientation,
        origin=origin,
    )
    ctx = make_context(series.files, step_type="autocontour.threshold")
    result = run_threshold(ctx, ThresholdParams(structures=["BODY", "Lung_L", "Lung_R"]))

    [artifact] = ctx.artifacts
    assert artifact.kind == "RTSTRUCT" and artifact.path.parent == ctx.workdir
    assert dciodvfy(artifact.path) == []
    assert result.outputs["empty_structures"] == []
    ds = pydicom.dcmread(artifact.path)
    assert (
        ds.SOPInstanceUID
        == artifact.sop_instance_uid
        == result.outputs["rtstruct_sop_instance_uid"]
    )
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence][0] == "EXTERNAL"
    assert ds.Manufacturer == "rtauto"
    assert "rtauto-autocontour" not in ds.SoftwareVersions[0]
    assert "autocontour 0.1.0" in list(ds.SoftwareVersions)

    volume = load_series(series.files)
    structures, _ = read_rtstruct(artifact.path, volume)
    masks = {s.name: s.mask for s in structures}
    # back to the phantom's array order
    for name in masks:
        mask = masks[name][(slice(None), *flip)]
        masks[name] = mask[::-1] if position == "FFS" else mask
    body, lung_left, lung_right = _phantom_truth(hu)
    assert _dice(masks["BODY"], body) >= 0.98
    couch_rows = (hu > 100).any(axis=(0, 2)) & ~body.any(axis=(0, 2))
    assert not masks["BODY"][:, couch_rows, :].any(), "the couch is part of BODY"
    assert _dice(masks["Lung_L"], lung_left) >= 0.95
    assert _dice(masks["Lung_R"], lung_right) >= 0.95


def test_params_refuse_unknown_keys_and_structures() -> None:
    with pytest.raises(ValidationError):
        ThresholdParams.model_validate({"structures": ["BODY"], "threshold": -300})
    with pytest.raises(ValidationError):
        ThresholdParams.model_validate({"structures": ["Heart"]})
