"""Fixtures of the plan_check tests: the real data sets and a step context built from files."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pydicom
import pytest

from rtauto.steps import InputInstance, InputSeries, Provenance, StepContext, StudyInputs

PROJECT_ROOT = Path(__file__).resolve().parents[3]

MACHINES = {
    "txmachine": {
        "energies": {"PHOTON": [6, 10, 15], "ELECTRON": [6, 9, 12, 16]},
        "techniques": ["STATIC", "DYNAMIC", "ARC"],
        "max_dose_rate": 600,
        "approved": True,
    }
}


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real DICOM-RT data sets (read in place); skips where they are absent."""
    root = Path(os.environ.get("RTAUTO_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    if not (root / "README.md").is_file():
        pytest.skip(f"real DICOM-RT test data not found at {root} (set RTAUTO_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def breast(test_data: Path) -> Path:
    return test_data / "dicompyler-core-example"


def study_inputs(files: Iterable[Path]) -> StudyInputs:
    """A StudyInputs holding ``files`` grouped into series by their headers."""
    series: dict[str, list[tuple[pydicom.Dataset, Path]]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series.setdefault(str(ds.SeriesInstanceUID), []).append((ds, path))
    items = []
    study_uid, patient_id = "", ""
    for uid, members in series.items():
        first = members[0][0]
        study_uid, patient_id = str(first.StudyInstanceUID), str(first.PatientID)
        items.append(
            InputSeries(
                series_instance_uid=uid,
                study_instance_uid=study_uid,
                modality=str(first.Modality),
                instances=tuple(
                    InputInstance(str(ds.SOPInstanceUID), str(ds.SOPClassUID), uid, path)
                    for ds, path in members
                ),
            )
        )
    return StudyInputs(study_instance_uid=study_uid, patient_id=patient_id, series=tuple(items))


def _make_context(files: Iterable[Path], workdir: Path) -> StepContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return StepContext(
        job_id="job-1",
        step_id="check",
        step_type="plan_check.run",
        attempt=1,
        workdir=workdir,
        job_dir=workdir.parent,
        study=study_inputs(files),
        previous={},
        provenance=Provenance(
            "0.1.0",
            "plan-check",
            "0" * 64,
            "job-1",
            "check",
            "plan_check.run",
            "plan_check",
            "0.1.0",
        ),
        settings=None,
        destinations={},
        logger=logging.getLogger("test.plan_check"),
    )


@pytest.fixture(scope="session")
def make_context():
    """``make_context(files, workdir)``: a StepContext whose study holds ``files``."""
    return _make_context


@pytest.fixture(scope="session")
def machines() -> dict:
    """A machine list holding the breast plan's machine (6/10/15 MV photons)."""
    return MACHINES


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The rtauto repository (workflows/ lives there)."""
    return PROJECT_ROOT
