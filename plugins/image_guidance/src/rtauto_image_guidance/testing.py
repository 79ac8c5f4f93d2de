"""Helpers for testing image-guidance steps: step contexts, simulated daily images, dciodvfy.

Used by this plugin's tests; a site testing its own IGRT workflows can use them the same way.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813  (the library's usual name)

from rtauto.config import Settings
from rtauto.steps import InputInstance, InputSeries, Provenance, StepContext, StudyInputs
from rtauto.testing import SyntheticSeries, require_tool, write_ct_series
from rtauto.uids import new_uid


def input_series(files: Iterable[Path]) -> InputSeries:
    """An InputSeries as the engine builds it, from files of one series."""
    files = sorted(Path(f) for f in files)
    header = pydicom.dcmread(files[0], stop_before_pixels=True) if files else pydicom.Dataset()
    instances = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        instances.append(
            InputInstance(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                path=path,
            )
        )
    attributes = {
        k: str(header.get(k, ""))
        for k in (
            "SeriesDescription",
            "SeriesDate",
            "SeriesTime",
            "FrameOfReferenceUID",
            "PatientID",
        )
    }
    return InputSeries(
        series_instance_uid=str(header.get("SeriesInstanceUID", new_uid())),
        study_instance_uid=str(header.get("StudyInstanceUID", "")),
        modality=str(header.get("Modality", "CT")),
        instances=tuple(instances),
        attributes=attributes,
    )


def make_context(
    tmp_path: Path,
    series: Iterable[InputSeries],
    *,
    patient_id: str,
    step_type: str = "image_guidance.register",
    store_url: str | None = None,
    home: Path | None = None,
    previous: dict | None = None,
) -> StepContext:
    """A StepContext for a job holding ``series`` (the engine builds the same in a worker)."""
    series = tuple(series)
    workdir = tmp_path / f"work-{new_uid()[-8:]}"
    workdir.mkdir(parents=True)
    return StepContext(
        job_id="job-1",
        step_id="register",
        step_type=step_type,
        attempt=1,
        workdir=workdir,
        job_dir=tmp_path,
        study=StudyInputs(
            study_instance_uid=series[0].study_instance_uid if series else "1.2.3",
            patient_id=patient_id,
            series=series,
        ),
        previous=previous or {},
        provenance=Provenance(
            rtauto_version="0.1.0",
            workflow_name="igrt-test",
            workflow_hash="0" * 64,
            job_id="job-1",
            step_id="register",
            step_type=step_type,
            plugin_name="rtauto-image-guidance",
            plugin_version="0.1.0",
        ),
        settings=Settings(home=home or tmp_path / "home"),
        destinations={},
        logger=logging.getLogger("test.image_guidance"),
        store_url=store_url,
    )


def euler(
    center: np.ndarray, angles_deg: Iterable[float], translation: Iterable[float]
) -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform()
    transform.SetCenter([float(v) for v in center])
    transform.SetRotation(*[float(np.radians(a)) for a in angles_deg])
    transform.SetTranslation([float(v) for v in translation])
    return transform


def matrix_of(transform: sitk.Euler3DTransform) -> np.ndarray:
    m = np.array(transform.GetMatrix()).reshape(3, 3)
    c = np.array(transform.GetCenter())
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = np.array(transform.GetTranslation()) + c - m @ c
    return out


def simulate_daily(
    planning: sitk.Image,
    daily_to_planning: sitk.Transform,
    *,
    center: np.ndarray,
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    direction: np.ndarray | None = None,
    noise_hu: float = 20.0,
    rng: np.random.Generator | None = None,
) -> sitk.Image:
    """A daily image: the planning image resampled through a known transform on a cropped grid.

    ``daily_to_planning`` maps a point of the daily image's patient coordinates to the planning
    image's (what the REG object of a correct registration must hold).
    """
    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    half = direction @ ((np.array(size) - 1) * np.array(spacing) / 2)
    grid = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    grid.SetSpacing([float(v) for v in spacing])
    grid.SetDirection([float(v) for v in direction.ravel()])
    grid.SetOrigin([float(v) for v in np.asarray(center, float) - half])
    daily = sitk.Resample(
        planning, grid, daily_to_planning, sitk.sitkLinear, -1000.0, sitk.sitkFloat32
    )
    if noise_hu > 0:
        rng = rng or np.random.default_rng(0)
        array = sitk.GetArrayFromImage(daily)
        array += rng.normal(0.0, noise_hu, array.shape).astype(np.float32)
        noisy = sitk.GetImageFromArray(array)
        noisy.CopyInformation(daily)
        daily = noisy
    return daily


def write_image_series(
    image: sitk.Image,
    folder: Path,
    *,
    patient_id: str,
    study_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_position: str = "HFS",
    series_description: str = "CBCT daily",
) -> SyntheticSeries:
    """Write a SimpleITK image as a CT series with its exact geometry (new Frame of Reference)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    return write_ct_series(
        folder,
        hu=np.rint(sitk.GetArrayFromImage(image)).astype(np.int32),
        spacing=(spacing[0], spacing[1], spacing[2]),
        orientation=[*direction[:, 0], *direction[:, 1]],
        origin=image.GetOrigin(),
        patient_id=patient_id,
        patient_position=patient_position,
        series_description=series_description,
        study_instance_uid=study_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid or new_uid(),
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy reports for a file (warnings are not errors)."""
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dciodvfy_output(path: Path) -> str:
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return result.stdout + result.stderr
