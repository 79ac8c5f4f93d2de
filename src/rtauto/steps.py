"""The step API: what a workflow step is, what it receives and what it returns.

A plugin provides step types through the ``rtauto_register_steps`` hook::

    from pydantic import BaseModel
    from rtauto import hookimpl, StepType, StepContext, StepResult, StepFailed

    class ThresholdParams(BaseModel):
        hu: float = -300

    def body_threshold(ctx: StepContext, params: ThresholdParams) -> StepResult:
        ct = ctx.study.one_series(modality="CT")     # raises StepFailed if absent/ambiguous
        out = ctx.workdir / "rtstruct.dcm"
        ...                                           # write the file
        ctx.add_artifact(out, kind="RTSTRUCT", modality="RTSTRUCT")
        return StepResult(outputs={"structures": ["BODY"]})

    @hookimpl
    def rtauto_register_steps(register):
        register(StepType(name="mine.body", params=ThresholdParams, run=body_threshold))

Outcome rules (the engine applies them):

* returning normally (a ``StepResult``, a mapping of outputs, or ``None``) ends the step **OK**;
* raising :class:`StepFailed` ends it **FAIL**: bad data, retrying cannot help;
* raising :class:`StepRetry` asks for **RETRY**: a transient condition (destination down, lock
  held); the engine waits with backoff and runs the step again, up to the step's ``retry``
  policy, after which the step ends FAIL;
* any other exception ends the step FAIL with the traceback recorded;
* running past the step's ``timeout`` kills the worker process and ends the step FAIL.

Outputs are what later steps and ``if:`` conditions read, and what the job store keeps: numbers,
strings, booleans, None, and lists and mappings of them. NumPy scalars and arrays (and tensors)
become numbers and lists, tuples and sets lists, paths strings, dates ISO 8601 text; any other
object fails the step with the name of the output.

A step runs in a worker process, never in the daemon. It must be idempotent: after a crash the
engine may run an unfinished step again, in a fresh ``workdir``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rtauto.errors import StepFailed, StepRetry

__all__ = [
    "Artifact",
    "InputInstance",
    "InputSeries",
    "Provenance",
    "StepContext",
    "StepFailed",
    "StepResult",
    "StepRetry",
    "StepType",
    "StudyInputs",
    "PreviousStep",
    "SERIES_NUMBER_BASE",
]

# SeriesNumber of the series rtauto writes: 9001 and up (StepContext.series_number), far above
# the numbers scanners and planning systems give, so rtauto's series sort after the images
SERIES_NUMBER_BASE = 9000


class NoParams(BaseModel):
    """Params model for a step that takes none."""

    model_config = {"extra": "forbid"}


@dataclass(frozen=True)
class StepType:
    """A step type a plugin provides.

    ``name`` is what a workflow writes after ``uses:`` (``plugin.verb``, lower case).
    ``params`` validates the step's ``with:`` block (use ``extra="forbid"`` so a typo is an error).
    ``run(ctx, params)`` does the work in a worker process.
    ``outputs`` documents the keys of ``StepResult.outputs`` a workflow's ``if:`` may read.
    ``warmup()`` is called once when a worker process starts, so the first job does not pay
    for loading heavy libraries.
    ``resources(params, settings)`` names what the step will use beyond its params, resolved
    now: ``{"model": "demo-thorax@2", "model_card_sha256": "..."}`` for ``NAME@latest``. It
    raises :class:`StepFailed` when one cannot be resolved. ``rtauto batch`` calls it before
    the first case (a wrong model name stops the batch at once instead of failing every case)
    and makes the answer part of the run's identity, so a new model version is a new run.
    """

    name: str
    run: Callable[[StepContext, Any], StepResult | Mapping[str, Any] | None]
    params: type[BaseModel] = NoParams
    description: str = ""
    outputs: Mapping[str, str] = field(default_factory=dict)
    warmup: Callable[[], None] | None = None
    resources: Callable[[Any, Any], Mapping[str, str]] | None = None


@dataclass(frozen=True)
class InputInstance:
    """One received DICOM instance of the job's study, as stored in the spool (read-only)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    path: Path


@dataclass(frozen=True)
class InputSeries:
    """One series of the job's input, with the attributes the trigger matched on."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    instances: tuple[InputInstance, ...]
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [i.path for i in self.instances]


@dataclass(frozen=True)
class StudyInputs:
    """The series a job runs on: one series for a series-scoped job, all for a study job."""

    study_instance_uid: str
    patient_id: str
    series: tuple[InputSeries, ...]

    def by_modality(self, modality: str) -> list[InputSeries]:
        return [s for s in self.series if s.modality.upper() == modality.upper()]

    def one_series(self, modality: str) -> InputSeries:
        """The only series of ``modality``; raises :class:`StepFailed` if none or several."""
        found = self.by_modality(modality)
        if not found:
            raise StepFailed(f"the job's input holds no {modality} series")
        if len(found) > 1:
            uids = ", ".join(s.series_instance_uid for s in found)
            raise StepFailed(f"the job's input holds {len(found)} {modality} series ({uids})")
        return found[0]

    @property
    def files(self) -> list[Path]:
        return [p for s in self.series for p in s.files]


@dataclass
class Artifact:
    """A file a step produced, with what downstream steps and routing need to know."""

    path: Path
    kind: str  # e.g. "RTSTRUCT", "SEG", "REG", "report-json", "report-html"
    modality: str | None = None  # DICOM Modality when the artifact is a DICOM object
    sop_instance_uid: str | None = None
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "modality": self.modality,
            "sop_instance_uid": self.sop_instance_uid,
            "description": self.description,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Artifact:
        return cls(
            path=Path(data["path"]),
            kind=data["kind"],
            modality=data.get("modality"),
            sop_instance_uid=data.get("sop_instance_uid"),
            description=data.get("description", ""),
            provenance=dict(data.get("provenance") or {}),
        )


@dataclass
class StepResult:
    """What a step returns: outputs for ``if:`` and later steps, artifacts, a one-line summary."""

    outputs: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    summary: str = ""


@dataclass(frozen=True)
class PreviousStep:
    """An earlier step of the same job, as a later step sees it."""

    step_id: str
    status: str  # "ok" | "fail" | "skipped"
    outputs: Mapping[str, Any]
    artifacts: tuple[Artifact, ...]


@dataclass(frozen=True)
class Provenance:
    """Where an artifact comes from: written into outputs (e.g. DICOM SoftwareVersions)."""

    rtauto_version: str
    workflow_name: str
    workflow_hash: str
    job_id: str
    step_id: str
    step_type: str
    plugin_name: str
    plugin_version: str

    def software_versions(self) -> list[str]:
        return [f"rtauto {self.rtauto_version}", f"{self.plugin_name} {self.plugin_version}"]

    def derivation_description(self) -> str:
        return (
            f"rtauto workflow {self.workflow_name} ({self.workflow_hash[:12]}), "
            f"step {self.step_id} ({self.step_type}), job {self.job_id}"
        )

    def to_json(self) -> dict[str, str]:
        return dict(self.__dict__)


@dataclass
class StepContext:
    """Everything a step may use. Built by the engine inside the worker process."""

    job_id: str
    step_id: str
    step_type: str
    attempt: int
    workdir: Path  # empty folder for this attempt's files; artifacts are written here
    job_dir: Path
    study: StudyInputs
    previous: Mapping[str, PreviousStep]  # every finished earlier step of the job, by id
    provenance: Provenance
    settings: Any  # rtauto.config.Settings (home, models_dir, uid_root, ...)
    destinations: Mapping[str, Any]  # destination name -> rtauto.config.Destination
    logger: logging.Logger
    artifacts: list[Artifact] = field(default_factory=list)
    store_url: str | None = None  # for steps that look up earlier studies (read only)
    max_attempts: int = 1  # the step's retry policy; attempt >= max_attempts is the last
    # destination types of the worker's plugins, by name (route steps resolve destinations)
    destination_types: Mapping[str, Any] = field(default_factory=dict)
    # a dry run (``rtauto run --dry-run``): the folder that takes whatever the step would send
    # outside rtauto (rtauto's routing steps copy their items there instead of delivering);
    # None in ordinary runs. A step that talks to other systems itself must honour it.
    dry_run: Path | None = None
    # the step's position in its workflow (0 for the first step): see series_number()
    step_index: int = 0

    def series_number(self, output: int = 0) -> int:
        """A SeriesNumber for the ``output``-th series (0-9) this step writes.

        ``9001 + 10 * step_index + output``: the first step's first series is 9001, its second
        9002, the next step's 9011, and so on. Two steps of one workflow that write into the
        same study therefore never give two series the same number, and a job run again
        numbers its series as before (the TPS lists the new series next to the old one).
        """
        if not 0 <= output <= 9:
            raise ValueError(f"output must be 0-9, not {output}")
        return SERIES_NUMBER_BASE + 10 * self.step_index + output + 1

    def add_artifact(
        self,
        path: Path | str,
        kind: str,
        *,
        modality: str | None = None,
        sop_instance_uid: str | None = None,
        description: str = "",
        provenance: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Record a file this step wrote (inside ``workdir``) as an artifact of the job.

        Raises ValueError for a file that does not exist or lies outside ``workdir``: an
        artifact is delivered and kept with the job, and a step run again after a crash gets
        a fresh ``workdir``, so a file elsewhere could be another job's, or gone."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"artifact {path} does not exist")
        if not path.resolve().is_relative_to(Path(self.workdir).resolve()):
            raise ValueError(
                f"artifact {path} is outside the step's workdir {self.workdir}: write it there"
            )
        merged = self.provenance.to_json()
        merged.update(provenance or {})
        artifact = Artifact(
            path=path,
            kind=kind,
            modality=modality,
            sop_instance_uid=sop_instance_uid,
            description=description,
            provenance=merged,
        )
        self.artifacts.append(artifact)
        return artifact

    def artifacts_of(self, *step_ids: str, kind: str | None = None) -> list[Artifact]:
        """Artifacts of the named earlier steps (all earlier steps when none are named)."""
        ids = step_ids or tuple(self.previous)
        found = [a for sid in ids if sid in self.previous for a in self.previous[sid].artifacts]
        return [a for a in found if kind is None or a.kind == kind]
