"""autocontour.segment end to end on synthetic CT, and the bad inputs it must refuse."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
import yaml
from pydantic import ValidationError
from rtauto_autocontour.inference import reorient
from rtauto_autocontour.registry import sha256_of
from rtauto_autocontour.steps import SegmentParams, registry_for, run_segment

from rtauto.dicom.geometry import load_series
from rtauto.dicom.rtstruct import read_rtstruct
from rtauto.errors import StepFailed
from rtauto.testing import ct_phantom, write_ct_series

MODELS = Path(__file__).resolve().parents[3] / "models"
SPACING = (2.0, 2.0, 3.0)


def _ct(folder: Path, *, position: str = "HFS", **kwargs):
    orientation, origin, flip = {
        "HFS": ((1, 0, 0, 0, 1, 0), (-128.0, -128.0, -60.0), False),
        "HFP": ((-1, 0, 0, 0, -1, 0), (126.0, 126.0, -60.0), True),
    }[position]
    hu = ct_phantom(128, 128, 32, SPACING, seed=3)
    written = np.ascontiguousarray(hu[:, ::-1, ::-1]) if flip else hu
    series = write_ct_series(
        folder,
        hu=written,
        spacing=SPACING,
        patient_position=position,
        orientation=orientation,
        origin=origin,
        **kwargs,
    )
    return series, hu


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


@pytest.mark.parametrize("position", ["HFS", "HFP"])
def test_segment_writes_rtstruct_and_seg_a_tps_accepts(
    tmp_path: Path, position: str, make_context, dciodvfy
) -> None:
    series, hu = _ct(tmp_path / "ct", position=position)
    ctx = make_context(series.files)
    result = run_segment(ctx, SegmentParams(model="demo-thorax@latest", output="both"))

    model = registry_for(MODELS.resolve()).resolve("demo-thorax@latest")
    outputs = result.outputs
    assert outputs["model"] == model.ref
    assert outputs["model_card_sha256"] == model.card_hash
    assert outputs["provider"] == "CPUExecutionProvider"
    assert outputs["referenced_images"] == 32
    stages = outputs["timings"]  # where the step's time went, stage by stage
    assert list(stages) == [
        "load",
        "preprocess",
        "network",
        "sliding_window",
        "resample",
        "postprocess",
        "write",
        "total",
    ]
    assert 0 < sum(v for k, v in stages.items() if k not in ("network", "total")) <= stages["total"]
    rtstruct, seg = ctx.artifacts
    assert (rtstruct.kind, rtstruct.modality, seg.kind, seg.modality) == (
        "RTSTRUCT",
        "RTSTRUCT",
        "SEG",
        "SEG",
    )
    assert rtstruct.provenance["model_card_sha256"] == model.card_hash
    assert rtstruct.provenance["workflow_name"] == "autocontour-ct"
    assert sorted(p.name for p in ctx.workdir.iterdir()) == sorted(
        [rtstruct.path.name, seg.path.name]
    )
    for artifact in ctx.artifacts:
        assert dciodvfy(artifact.path) == [], artifact.kind

    ds = pydicom.dcmread(rtstruct.path)
    assert f"model {model.ref}" in list(ds.SoftwareVersions)
    assert model.card_hash in ds.StructureSetDescription
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == series.frame_of_reference_uid
    images = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence
    assert sorted(i.ReferencedSOPInstanceUID for i in images) == sorted(series.sop_instance_uids)
    assert {r.ROIGenerationDescription for r in ds.StructureSetROISequence} == {
        f"model {model.ref}"
    }
    assert hd.seg.segread(seg.path).FrameOfReferenceUID == series.frame_of_reference_uid

    # The anatomy: lungs found, each on the patient's own side (array flips undone for HFP).
    volume = load_series(series.files)
    masks = {s.name: s.mask for s in read_rtstruct(rtstruct.path, volume)[0]}
    if position == "HFP":
        masks = {name: mask[:, ::-1, ::-1] for name, mask in masks.items()}
    body = hu > -400
    lungs = (hu < -400) & np.stack([_fill(s) for s in body])
    columns = np.arange(128)[None, None, :]
    assert _dice(masks["Lung_L"], lungs & (columns >= 64)) >= 0.8
    assert _dice(masks["Lung_R"], lungs & (columns < 64)) >= 0.8


def _fill(mask2d: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.binary_fill_holes(mask2d)


def test_reorient_keeps_every_voxel_in_place() -> None:
    rng = np.random.default_rng(1)
    array = rng.normal(size=(5, 6, 7))
    for orientation in ((-1, 0, 0, 0, -1, 0), (0, 1, 0, 0, 0, -1), (0.8660254, 0.5, 0, 0, 0, -1)):
        row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
        affine = np.eye(4)
        affine[:3, :3] = np.stack([row * 2.0, col * 1.5, np.cross(row, col) * 3.0], axis=1)
        affine[:3, 3] = (10.0, -20.0, 30.0)
        moved, new_affine = reorient(array, affine, "LPS")
        unit = new_affine[:3, :3] / np.linalg.norm(new_affine[:3, :3], axis=0)
        assert all(unit[axis, axis] > 0.7 for axis in range(3)), orientation
        for index in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
            point = affine @ np.array([*index, 1.0])
            new_index = np.round(np.linalg.solve(new_affine, point)[:3]).astype(int)
            assert moved[tuple(new_index)] == array[index]


def test_missing_slice_fails_and_writes_nothing(tmp_path: Path, make_context) -> None:
    series, _ = _ct(tmp_path / "ct")
    files = [f for f in series.files if f.name != "CT.0010.dcm"]
    ctx = make_context(files)
    with pytest.raises(StepFailed, match=r"1 slice\(s\) missing between .*CT.0009.dcm"):
        run_segment(ctx, SegmentParams(model="demo-thorax@1"))
    assert list(ctx.workdir.iterdir()) == [] and ctx.artifacts == []


def test_mixed_orientation_fails_and_writes_nothing(tmp_path: Path, make_context) -> None:
    series, _ = _ct(tmp_path / "ct")
    ds = pydicom.dcmread(series.files[5])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(series.files[5])
    ctx = make_context(series.files)
    with pytest.raises(StepFailed, match="mixed orientations"):
        run_segment(ctx, SegmentParams(model="demo-thorax@1"))
    assert list(ctx.workdir.iterdir()) == [] and ctx.artifacts == []


def test_wrong_sha256_fails_before_inference_and_writes_nothing(
    tmp_path: Path, make_context
) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS / "demo-thorax", models / "demo-thorax")
    weights = models / "demo-thorax" / "1" / "model.onnx"
    weights.write_bytes(weights.read_bytes()[:-16] + bytes(16))  # tampered weights
    series, _ = _ct(tmp_path / "ct")
    ctx = make_context(series.files, models_dir=models)
    with pytest.raises(StepFailed, match="sha256 .* the card says"):
        run_segment(ctx, SegmentParams(model="demo-thorax@latest"))
    assert list(ctx.workdir.iterdir()) == [] and ctx.artifacts == []


def test_unknown_structure_and_params_are_refused(tmp_path: Path, make_context) -> None:
    series, _ = _ct(tmp_path / "ct")
    ctx = make_context(series.files)
    with pytest.raises(StepFailed, match=r"has no structure \['Heart'\]"):
        run_segment(ctx, SegmentParams(model="demo-thorax@1", structures=["Heart"]))
    with pytest.raises(ValidationError):
        SegmentParams.model_validate({"model": "demo-thorax@1", "outputs": "seg"})
    with pytest.raises(ValidationError):
        SegmentParams.model_validate({"model": "Demo Thorax"})


def test_new_version_dropped_in_is_used_by_the_next_job(tmp_path: Path, make_context) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS / "demo-thorax", models / "demo-thorax")
    series, _ = _ct(tmp_path / "ct")
    first = run_segment(
        make_context(series.files, models_dir=models, name="first"),
        SegmentParams(model="demo-thorax@latest", structures=["SpinalCord"]),
    )
    assert first.outputs["model"] == "demo-thorax@1"

    # version 2: same weights, a card that names the structures differently
    folder = models / "demo-thorax" / "2"
    folder.mkdir()
    shutil.copy(models / "demo-thorax" / "1" / "model.onnx", folder / "model.onnx")
    card = yaml.safe_load((models / "demo-thorax" / "1" / "model.yaml").read_text())
    card["version"] = "2"
    card["labels"][3]["name"] = "SpinalCanal"
    card["sha256"] = sha256_of(folder / "model.onnx")
    (folder / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))

    ctx = make_context(series.files, models_dir=models, name="second")
    second = run_segment(ctx, SegmentParams(model="demo-thorax@latest"))
    assert second.outputs["model"] == "demo-thorax@2"
    assert second.outputs["model_card_sha256"] != first.outputs["model_card_sha256"]
    assert "SpinalCanal" in second.outputs["structures"]
    assert ctx.artifacts[0].provenance["model"] == "demo-thorax@2"


def test_backend_no_plugin_provides_fails_and_writes_nothing(tmp_path: Path, make_context) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS / "demo-thorax", models / "demo-thorax")
    card_path = models / "demo-thorax" / "1" / "model.yaml"
    card = yaml.safe_load(card_path.read_text())
    card["backend"] = "tensorrt"
    card_path.write_text(yaml.safe_dump(card, sort_keys=False))
    series, _ = _ct(tmp_path / "ct")
    ctx = make_context(series.files, models_dir=models)
    with pytest.raises(StepFailed, match="no backend 'tensorrt'"):
        run_segment(ctx, SegmentParams(model="demo-thorax@1"))
    assert list(ctx.workdir.iterdir()) == [] and ctx.artifacts == []


class _Untrained(torch.nn.Module):
    """What a network gives before training: logits that do not depend on the image."""

    def __init__(self, patch: list[int], channels: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("noise", torch.randn((1, channels, *patch), generator=generator))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image * 0 + self.noise


def test_a_model_whose_output_is_noise_fails_and_writes_nothing(
    tmp_path: Path, make_context
) -> None:
    card = yaml.safe_load((MODELS / "demo-thorax" / "1" / "model.yaml").read_text())
    folder = tmp_path / "models" / "untrained" / "1"
    folder.mkdir(parents=True)
    torch.onnx.export(
        _Untrained(card["patch_size"], len(card["labels"]) + 1),
        torch.zeros((1, 1, *card["patch_size"])),
        str(folder / "model.onnx"),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    card.update(name="untrained", weights="model.onnx", sha256=sha256_of(folder / "model.onnx"))
    for spec in card["labels"].values():
        spec.update(largest_component=False, fill_holes=False)
    (folder / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    series, _ = _ct(tmp_path / "ct")

    # the trained model's organs: a few contours a slice, far below the limit
    ctx = make_context(series.files, name="trained")
    run_segment(ctx, SegmentParams(model="demo-thorax@1", max_contours=500))
    assert len(ctx.artifacts) == 1

    ctx = make_context(series.files, models_dir=tmp_path / "models", name="untrained")
    with pytest.raises(
        StepFailed,
        match=r"model untrained@1: structure Lung_L: \d{4,} contours on 32 slices, more than "
        r"the limit of 500; .*Nothing was written",
    ):
        run_segment(ctx, SegmentParams(model="untrained@1", output="both", max_contours=500))
    assert list(ctx.workdir.iterdir()) == [] and ctx.artifacts == []


def test_nothing_found_with_drop_empty_fails_and_writes_nothing(
    tmp_path: Path, make_context
) -> None:
    """A scan of air: no structure is found, and an RTSTRUCT without ROIs (or a SEG without
    segments) is not a valid object, so the step fails instead of routing one."""
    air = np.full((32, 128, 128), -1000.0, dtype=np.float32)
    series = write_ct_series(tmp_path / "ct", hu=air, spacing=SPACING)
    ctx = make_context(series.files)
    with pytest.raises(
        StepFailed,
        match=r"no structure was found \(empty: Lung_L, Lung_R, SpinalCord\); nothing was written",
    ):
        run_segment(ctx, SegmentParams(model="demo-thorax@1", output="both", drop_empty=True))
    assert list(ctx.workdir.iterdir()) == [] and ctx.artifacts == []
