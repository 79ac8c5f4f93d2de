"""Fixtures for the routing tests: a temporary job store with a job, and step contexts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from rtauto.config import Destination, Settings
from rtauto.steps import (
    Artifact,
    InputInstance,
    InputSeries,
    PreviousStep,
    Provenance,
    StepContext,
    StudyInputs,
)
from rtauto.store import Store
from rtauto.testing import free_port, make_tls_files


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    handle = Store(f"sqlite:///{tmp_path}/rtauto.db", migrate=True)
    yield handle
    handle.close()


WORKFLOW_TEXT = """\
name: route-test
trigger: {modality: CT}
steps:
  - {id: contour, uses: test.contour}
  - {id: send, uses: route.dicom, needs: [contour], with: {destination: tps}}
destinations:
  backup: {type: folder, path: backup}
"""


@pytest.fixture
def job(store: Store, tmp_path: Path) -> Any:
    created = store.create_job(
        dedupe_key="route-test",
        workflow_name="route-test",
        workflow_hash="0" * 64,
        workflow_text=WORKFLOW_TEXT,
        workflow_path="workflows/route-test.yaml",
        scope="study",
        study_uid="1.2.3",
        series_uid=None,
        input_series=[],
        step_ids=[("contour", "test.contour"), ("send", "route.dicom")],
        jobs_dir=tmp_path / "jobs",
    )
    assert created is not None
    return created


def dicom_artifact(path: Path, kind: str | None = None) -> Artifact:
    """An artifact record for a DICOM file, as the producing step would have made it."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Artifact(
        path=path,
        kind=kind or str(ds.Modality),
        modality=str(ds.Modality),
        sop_instance_uid=str(ds.SOPInstanceUID),
    )


def study_of(files: Sequence[Path]) -> StudyInputs:
    """The job input holding these DICOM files, one InputSeries per series."""
    series: dict[str, list[tuple[pydicom.Dataset, Path]]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series.setdefault(str(ds.SeriesInstanceUID), []).append((ds, path))
    built = []
    study_uid = patient_id = ""
    for series_uid, members in series.items():
        first = members[0][0]
        study_uid, patient_id = str(first.StudyInstanceUID), str(first.PatientID)
        built.append(
            InputSeries(
                series_instance_uid=series_uid,
                study_instance_uid=study_uid,
                modality=str(first.Modality),
                instances=tuple(
                    InputInstance(str(ds.SOPInstanceUID), str(ds.SOPClassUID), series_uid, path)
                    for ds, path in members
                ),
            )
        )
    return StudyInputs(study_instance_uid=study_uid, patient_id=patient_id, series=tuple(built))


@dataclass
class ContextFactory:
    """Builds the StepContext the engine would give a routing step of ``job``."""

    tmp_path: Path
    job_id: str
    store_url: str | None
    destinations: dict[str, Destination] = field(default_factory=dict)

    def __call__(
        self,
        *,
        artifacts: dict[str, list[Artifact]] | None = None,
        inputs: Sequence[Path] = (),
        attempt: int = 1,
        max_attempts: int = 1,
        step_id: str = "send",
        store: bool = True,
    ) -> StepContext:
        previous = {
            sid: PreviousStep(step_id=sid, status="ok", outputs={}, artifacts=tuple(found))
            for sid, found in (artifacts or {}).items()
        }
        workdir = self.tmp_path / "jobs" / self.job_id / f"{step_id}-{attempt}"
        workdir.mkdir(parents=True, exist_ok=True)
        study = study_of(inputs) if inputs else StudyInputs("1.2.3", "P", ())
        return StepContext(
            job_id=self.job_id,
            step_id=step_id,
            step_type="route.dicom",
            attempt=attempt,
            workdir=workdir,
            job_dir=self.tmp_path / "jobs" / self.job_id,
            study=study,
            previous=previous,
            provenance=Provenance("0", "route-test", "0" * 64, self.job_id, step_id, "r", "r", "0"),
            settings=Settings(home=self.tmp_path / "home"),
            destinations=dict(self.destinations),
            logger=logging.getLogger("rtauto.test.route"),
            store_url=self.store_url if store else None,
            max_attempts=max_attempts,
        )

    def add(self, name: str, **block: Any) -> None:
        self.destinations[name] = Destination.model_validate(block)


@pytest.fixture
def make_context(tmp_path: Path, store: Store, job: Any) -> ContextFactory:
    return ContextFactory(tmp_path=tmp_path, job_id=job.id, store_url=store.url)


class CountingSCP:
    """A pynetdicom storage SCP that counts associations and keeps each dataset's bytes.

    ``on_store(n)`` (optional) is called on the ``n``-th C-STORE request (1-based); when it
    returns a status, that status is answered instead of storing.
    """

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "COUNTER",
        require_called_aet: bool = False,
        maximum_associations: int = 10,
        ssl_context: Any = None,
        transfer_syntaxes: Sequence[str] | None = None,
        port: int | None = None,
        sop_classes: Sequence[str] | None = None,
    ):
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or free_port()
        self.associations = 0
        self.requests = 0
        self.received: list[str] = []
        self.transfer_syntaxes: list[str] = []
        self.on_store: Any = None
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        ae.maximum_associations = maximum_associations
        for sop_class in sop_classes or [c.abstract_syntax for c in AllStoragePresentationContexts]:
            ae.add_supported_context(sop_class, transfer_syntaxes or None)
        self.ae = ae
        self.ssl_context = ssl_context
        self._server: Any = None

    def _handle_store(self, event: Any) -> int:
        with self._lock:
            self.requests += 1
            number = self.requests
        if self.on_store is not None:
            status = self.on_store(number)
            if status is not None:
                return status
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        with self._lock:
            self.received.append(str(ds.SOPInstanceUID))
            self.transfer_syntaxes.append(str(event.context.transfer_syntax))
        return 0x0000

    def _handle_established(self, _event: Any) -> None:
        with self._lock:
            self.associations += 1

    def start(self) -> CountingSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=self.ssl_context,
            evt_handlers=[
                (evt.EVT_C_STORE, self._handle_store),
                (evt.EVT_ESTABLISHED, self._handle_established),
            ],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> CountingSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def counting_scp(tmp_path: Path) -> Iterator[CountingSCP]:
    with CountingSCP(tmp_path / "counted") as scp:
        yield scp


@pytest.fixture
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (which cannot import this conftest)."""
    return SimpleNamespace(
        dicom_artifact=dicom_artifact,
        study_of=study_of,
        CountingSCP=CountingSCP,
        make_tls_files=make_tls_files,
    )
