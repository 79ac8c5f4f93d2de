"""Choosing the image of the day and its reference (planning) series.

The reference comes from the job's own input (a study job holding both series) or from what
the job store already holds for the patient, by one of these rules:

* ``input``: another image series of the job's input (matched by ``reference_description``,
  else the oldest one);
* ``planned_ct``: the CT an RTPLAN in the store was planned on (plan -> its structure set ->
  the structure set's referenced series; else the plan's Frame of Reference);
* ``latest_ct``: the newest CT of the same PatientID other than the image of the day;
* ``same_frame_of_reference``: the newest CT sharing the image of the day's Frame of Reference;
* ``auto``: ``input`` when the input holds two image series, else ``planned_ct``, else
  ``latest_ct``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom

from rtauto.errors import StepFailed
from rtauto.steps import InputSeries, StepContext

__all__ = ["IMAGE_MODALITIES", "ReferenceRule", "SeriesChoice", "choose_daily", "resolve_reference"]

IMAGE_MODALITIES = ("CT", "MR", "PT")
ReferenceRule = Literal["auto", "input", "planned_ct", "latest_ct", "same_frame_of_reference"]


@dataclass
class SeriesChoice:
    """A series picked as the image of the day or the reference, with how it was found."""

    series_instance_uid: str
    files: list[Path]
    description: str
    found_by: str
    attributes: dict[str, Any] = field(default_factory=dict)


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _attribute(series: InputSeries, keyword: str) -> str:
    value = series.attributes.get(keyword)
    if value is None and series.files:
        value = _header(series.files[0]).get(keyword, "")
    return str(value or "")


def _acquired(series: InputSeries) -> str:
    return _attribute(series, "SeriesDate") + _attribute(series, "SeriesTime").split(".")[0].zfill(
        6
    )


def _image_series(ctx: StepContext) -> list[InputSeries]:
    return [s for s in ctx.study.series if s.modality.upper() in IMAGE_MODALITIES and s.files]


def choose_daily(ctx: StepContext, description: str | None) -> InputSeries:
    """The image of the day among the job's input series."""
    images = _image_series(ctx)
    if not images:
        raise StepFailed("the job's input holds no image series (CT, MR or PT) with images")
    if description:
        pattern = re.compile(description)
        matched = [s for s in images if pattern.search(_attribute(s, "SeriesDescription"))]
        if not matched:
            raise StepFailed(f"no input series has a SeriesDescription matching {description!r}")
        images = matched
    # the newest acquisition is the image of the day
    return max(images, key=_acquired)


def _from_input(
    ctx: StepContext, daily: InputSeries, description: str | None
) -> SeriesChoice | None:
    others = [s for s in _image_series(ctx) if s.series_instance_uid != daily.series_instance_uid]
    if description:
        pattern = re.compile(description)
        others = [s for s in others if pattern.search(_attribute(s, "SeriesDescription"))]
    if not others:
        return None
    chosen = min(others, key=_acquired)
    return SeriesChoice(
        series_instance_uid=chosen.series_instance_uid,
        files=list(chosen.files),
        description=_attribute(chosen, "SeriesDescription"),
        found_by="input",
        attributes=dict(chosen.attributes),
    )


class _StoreLookup:
    """Read-only look-ups of earlier series of the patient in the job store."""

    def __init__(self, ctx: StepContext, patient_id: str):
        if not ctx.store_url:
            raise StepFailed("no job store to look the reference up in (the step has no store_url)")
        from rtauto.store import Store

        self.store = Store(ctx.store_url)
        self.spool = Path(ctx.settings.spool_dir)
        self.patient_id = patient_id

    def close(self) -> None:
        self.store.close()

    def files(self, series_uid: str) -> list[Path]:
        return [self.spool / row.path for row in self.store.instances_of_series(series_uid)]

    def attributes(self, row: Any) -> dict[str, Any]:
        attributes = dict(row.attributes or {})
        if "FrameOfReferenceUID" not in attributes or "SeriesDescription" not in attributes:
            files = self.files(row.series_uid)
            if files:
                header = _header(files[0])
                attributes.setdefault(
                    "FrameOfReferenceUID", str(header.get("FrameOfReferenceUID", ""))
                )
                attributes.setdefault("SeriesDescription", str(header.get("SeriesDescription", "")))
        return attributes

    def choice(self, row: Any, found_by: str) -> SeriesChoice:
        attributes = self.attributes(row)
        return SeriesChoice(
            series_instance_uid=row.series_uid,
            files=self.files(row.series_uid),
            description=str(attributes.get("SeriesDescription", "")),
            found_by=found_by,
            attributes=attributes,
        )

    def cts(self, exclude: str) -> list[Any]:
        return [
            row
            for row in self.store.series_of_patient(self.patient_id, modality="CT")
            if row.series_uid != exclude
        ]

    def latest_ct(self, daily_uid: str, description: str | None) -> SeriesChoice | None:
        for row in self.cts(daily_uid):
            attributes = self.attributes(row)
            if description and not re.search(
                description, str(attributes.get("SeriesDescription", ""))
            ):
                continue
            return self.choice(row, "latest_ct")
        return None

    def same_frame(self, daily_uid: str, frame_uid: str) -> SeriesChoice | None:
        for row in self.cts(daily_uid):
            if self.attributes(row).get("FrameOfReferenceUID") == frame_uid:
                return self.choice(row, "same_frame_of_reference")
        return None

    def planned_ct(self, daily_uid: str) -> SeriesChoice | None:
        cts = self.cts(daily_uid)
        structure_sets: dict[str, pydicom.Dataset] = {}
        for row in self.store.series_of_patient(self.patient_id, modality="RTSTRUCT"):
            for path in self.files(row.series_uid):
                header = _header(path)
                structure_sets[str(header.SOPInstanceUID)] = header
        for plan_row in self.store.series_of_patient(self.patient_id, modality="RTPLAN"):
            for path in self.files(plan_row.series_uid):
                plan = _header(path)
                for ref in plan.get("ReferencedStructureSetSequence", []):
                    structure_set = structure_sets.get(str(ref.ReferencedSOPInstanceUID))
                    if structure_set is None:
                        continue
                    for uid in _referenced_series(structure_set):
                        for row in cts:
                            if row.series_uid == uid:
                                return self.choice(row, "planned_ct")
                # the structure set is not in the store: the plan's Frame of Reference decides
                frame_uid = str(plan.get("FrameOfReferenceUID", ""))
                for row in cts:
                    if frame_uid and self.attributes(row).get("FrameOfReferenceUID") == frame_uid:
                        return self.choice(row, "planned_ct")
        return None


def _referenced_series(structure_set: pydicom.Dataset) -> list[str]:
    return [
        str(series.SeriesInstanceUID)
        for frame in structure_set.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for series in study.get("RTReferencedSeriesSequence", [])
    ]


def resolve_reference(
    ctx: StepContext,
    daily: InputSeries,
    rule: ReferenceRule,
    description: str | None = None,
) -> SeriesChoice:
    """The reference series for ``daily`` by ``rule``; :class:`StepFailed` when none is found."""
    patient_id = ctx.study.patient_id or _attribute(daily, "PatientID")
    if rule in ("auto", "input"):
        found = _from_input(ctx, daily, description)
        if found is not None or rule == "input":
            if found is None:
                raise StepFailed(
                    "the job's input holds no reference image series besides the image of the day"
                    + (f" matching {description!r}" if description else "")
                )
            return found
    lookup = _StoreLookup(ctx, patient_id)
    try:
        attempts: list[tuple[str, Callable[[], SeriesChoice | None]]] = []
        if rule in ("auto", "planned_ct"):
            attempts.append(("planned_ct", lambda: lookup.planned_ct(daily.series_instance_uid)))
        if rule in ("auto", "latest_ct"):
            attempts.append(
                ("latest_ct", lambda: lookup.latest_ct(daily.series_instance_uid, description))
            )
        if rule == "same_frame_of_reference":
            frame_uid = _attribute(daily, "FrameOfReferenceUID")
            attempts.append(
                (
                    "same_frame_of_reference",
                    lambda: lookup.same_frame(daily.series_instance_uid, frame_uid),
                )
            )
        for _, attempt in attempts:
            found = attempt()
            if found is not None and found.files:
                return found
    finally:
        lookup.close()
    tried = ", ".join(name for name, _ in attempts)
    raise StepFailed(
        f"no reference image found for patient {patient_id!r} in the job store (rule {rule}: "
        f"tried {tried}); send the planning CT first or name the reference rule"
    )
