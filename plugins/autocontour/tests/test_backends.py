"""Backends: ONNX Runtime, TorchScript and a MONAI bundle give the same network output."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from rtauto_autocontour.backends import load_predictor
from rtauto_autocontour.registry import ModelRegistry, sha256_of

MODELS = Path(__file__).resolve().parents[3] / "models"


def _bundle(models: Path) -> None:
    """The TorchScript demo network as a MONAI bundle folder with its own card."""
    folder = models / "demo-thorax-bundle" / "1"
    bundle = folder / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    shutil.copy(MODELS / "demo-thorax-ts" / "1" / "model.ts", bundle / "models" / "model.ts")
    metadata = {"name": "demo-thorax", "version": "1", "network_data_format": {}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    card = yaml.safe_load((MODELS / "demo-thorax-ts" / "1" / "model.yaml").read_text())
    card.update(
        name="demo-thorax-bundle",
        backend="monai_bundle",
        weights="bundle",
        sha256=sha256_of(bundle / "models" / "model.ts"),
    )
    (folder / "model.yaml").write_text(yaml.safe_dump(card))


def test_three_backends_agree_and_log_their_provider(tmp_path: Path, caplog) -> None:
    shutil.copytree(MODELS / "demo-thorax", tmp_path / "demo-thorax")
    shutil.copytree(MODELS / "demo-thorax-ts", tmp_path / "demo-thorax-ts")
    _bundle(tmp_path)
    registry = ModelRegistry(tmp_path)
    rng = np.random.default_rng(0)
    patch = rng.uniform(0, 1, (2, 1, *registry.resolve("demo-thorax@1").card.patch_size))
    outputs = {}
    with caplog.at_level(logging.INFO, logger="rtauto_autocontour.backends"):
        for ref in ("demo-thorax@1", "demo-thorax-ts@1", "demo-thorax-bundle@1"):
            predictor = load_predictor(registry.resolve(ref), device="cpu")
            outputs[ref] = predictor.predict(patch.astype(np.float32))
            assert outputs[ref].shape == (2, 4, *patch.shape[2:])
    assert "demo-thorax@1 runs on CPUExecutionProvider (onnx)" in caplog.text
    assert "demo-thorax-ts@1 runs on torch-cpu (torchscript)" in caplog.text
    assert "demo-thorax-bundle@1 runs on torch-cpu (monai_bundle)" in caplog.text
    reference = outputs["demo-thorax@1"]
    for ref, logits in outputs.items():
        np.testing.assert_allclose(logits, reference, atol=1e-3, err_msg=ref)


def test_cuda_asked_for_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    from rtauto_autocontour.registry import ModelError

    model = ModelRegistry(MODELS).resolve("demo-thorax@1")
    with pytest.raises(ModelError, match="device cuda"):
        load_predictor(model, device="cuda")


@pytest.mark.parametrize("codes", ["LPS", "RAS", "SLP"])
def test_label_maps_on_the_image_grid_agree_between_the_two_resamplers(codes: str) -> None:
    """The separable resampler (network axes along image axes, any permutation and flips)
    gives the label map of the general trilinear one, boundary points included."""
    import torch
    from rtauto_autocontour import inference

    from rtauto.dicom.geometry import Volume

    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = (-100.0, -90.0, -40.0)
    volume = Volume(
        array=np.zeros((23, 50, 60), np.float32),
        affine=affine,
        spacing=(0.8, 0.8, 2.0),
        direction=np.eye(3),
        origin=affine[:3, 3],
        sop_instance_uids=[],
        frame_of_reference_uid="1.2.3",
        study_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3.5",
        patient_position="HFS",
    )
    array_ijk = np.zeros((60, 50, 23), np.float32)
    _, network_affine = inference.reorient(array_ijk, affine, codes)
    network_affine = network_affine.copy()
    network_affine[:3, :3] *= 4.1  # coarser grid, not aligned with the image's
    network_affine[:3, 3] += 0.7
    shape = (13, 11, 9)
    logits = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 4, *shape)).astype("f4"))
    separable = inference.to_image_grid(logits, network_affine, volume)

    probabilities = torch.softmax(logits, dim=1)[0].numpy()
    cell = inference._cell_labels(probabilities)
    mapping = np.linalg.inv(network_affine) @ affine
    general = inference._to_image_grid_general(probabilities, cell, mapping, volume)
    assert (separable == general).all()
    assert len(np.unique(separable)) == 4  # boundaries between every label were exercised
