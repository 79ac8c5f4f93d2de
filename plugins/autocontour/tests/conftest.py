"""Fixtures for the autocontour plugin's tests: real data, DICOM checkers, step contexts."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from rtauto.config import Settings
from rtauto.steps import (
    InputInstance,
    InputSeries,
    PreviousStep,
    Provenance,
    StepContext,
    StudyInputs,
)
from rtauto.testing import require_tool

PROJECT_ROOT = Path(__file__).resolve().parents[3]
MODELS_DIR = PROJECT_ROOT / "models"


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real DICOM-RT data sets (read in place); skips where they are absent."""
    root = Path(os.environ.get("RTAUTO_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    if not (root / "README.md").is_file():
        pytest.skip(f"real DICOM-RT test data not found at {root} (set RTAUTO_TEST_DATA)")
    return root


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines of dicom3tools' IOD verifier for one file."""
    require_tool("dciodvfy")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def dciodvfy() -> Callable[[Path], list[str]]:
    return dciodvfy_errors


def series_inputs(files: list[Path]) -> StudyInputs:
    """StudyInputs of the series the files on disk belong to, as the engine would build them."""
    grouped: dict[str, tuple[pydicom.Dataset, list[InputInstance]]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        first, instances = grouped.setdefault(str(ds.SeriesInstanceUID), (ds, []))
        instances.append(
            InputInstance(
                str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID), path
            )
        )
    assert grouped
    series = tuple(
        InputSeries(
            series_instance_uid=uid,
            study_instance_uid=str(first.StudyInstanceUID),
            modality=str(first.Modality),
            instances=tuple(instances),
        )
        for uid, (first, instances) in grouped.items()
    )
    first = next(iter(grouped.values()))[0]
    return StudyInputs(str(first.StudyInstanceUID), str(first.PatientID), series)


@pytest.fixture
def make_context(tmp_path: Path) -> Callable[..., StepContext]:
    """``make_context(files, step_type=..., models_dir=..., previous=...)``: a StepContext
    for the series of ``files``."""

    def make(
        files: list[Path],
        *,
        step_type: str = "autocontour.segment",
        models_dir: Path = MODELS_DIR,
        name: str = "step",
        previous: dict[str, PreviousStep] | None = None,
    ) -> StepContext:
        workdir = tmp_path / "jobs" / name / "work"
        workdir.mkdir(parents=True)
        return StepContext(
            job_id="job-1",
            step_id=name,
            step_type=step_type,
            attempt=1,
            workdir=workdir,
            job_dir=workdir.parent,
            study=series_inputs(files),
            previous=previous or {},
            provenance=Provenance(
                rtauto_version="0.1.0",
                workflow_name="autocontour-ct",
                workflow_hash="0123456789abcdef" * 4,
                job_id="job-1",
                step_id=name,
                step_type=step_type,
                plugin_name="autocontour",
                plugin_version="0.1.0",
            ),
            settings=Settings(home=tmp_path / "home", models_dir=models_dir),
            destinations={},
            logger=logging.getLogger(f"rtauto.test.{name}"),
        )

    return make
