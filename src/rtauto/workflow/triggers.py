"""Matching received series against workflow triggers, and deciding when data is complete.

Series-scoped workflows (the default) run once per matching series, when that series has been
quiet (no new instance) for the series quiet period.

Study-scoped workflows (``scope: study``, or any workflow with ``requires``) run once per study.
:func:`study_readiness` decides, for one study and one workflow:

* the study **applies** when at least one of its series matches the trigger (modality, where,
  AE titles, source: :func:`matches_series`);
* each ``requires`` selector is **met** by a series of the study with that modality and
  ``where`` rules (whoever sent it: a structure set often comes from the planning system while
  the CT comes from the scanner) whose own series quiet period has passed;
* the study is **ready** when it applies, every selector is met, every selected series has
  passed its series quiet period (no job starts on a series still arriving), and either the
  study quiet period has passed or the workflow lists required series (all present, so there is
  nothing left to wait for);
* it has **expired** when it applies, a ``requires`` selector is still unmet, and ``max_wait``
  has passed since the study's first instance: the caller gives up on it and records why
  (``reason``/``missing``). A study whose requirements are met is never given up on; it runs
  once its selected series (and, without ``requires``, the study) are quiet.

The **selected** series, the job's input, are every series of the study that matches the
trigger or a ``requires`` selector, in the order given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rtauto.config import CompletionDefaults
from rtauto.workflow.schema import Trigger, Workflow

__all__ = [
    "SeriesFacts",
    "StudyDecision",
    "matches_series",
    "series_quiet_seconds",
    "series_ready",
    "study_readiness",
]


@dataclass(frozen=True)
class SeriesFacts:
    """What the assembler knows about one received series.

    ``attributes`` maps DICOM keywords to values of the series' instances (e.g.
    ``SeriesDescription``, ``BodyPartExamined``); ``source`` is ``"scp"`` or ``"folder"``;
    ``calling_ae``/``called_ae`` are None for files from a drop folder; times are
    ``time.time()`` seconds.
    """

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    attributes: Mapping[str, Any] = field(default_factory=dict)
    calling_ae: str | None = None
    called_ae: str | None = None
    source: str = "scp"
    first_received: float = 0.0
    last_received: float = 0.0
    instance_count: int = 0


@dataclass
class StudyDecision:
    """The outcome of :func:`study_readiness`."""

    ready: bool
    expired: bool
    selected: list[str]  # SeriesInstanceUIDs of the job's input
    missing: list[str]  # requires selectors not yet met, human-readable
    reason: str


def _ae_matches(wanted: str | list[str] | None, actual: str | None) -> bool:
    if wanted is None:
        return True
    if actual is None:
        return False
    titles = [wanted] if isinstance(wanted, str) else wanted
    return actual.strip() in {t.strip() for t in titles}


def matches_series(trigger: Trigger, facts: SeriesFacts) -> bool:
    """Whether a series satisfies every condition of the trigger (``requires`` aside)."""
    if trigger.source != "any" and facts.source != trigger.source:
        return False
    modalities = trigger.modalities
    if modalities is not None and (facts.modality or "").strip().upper() not in modalities:
        return False
    if not _ae_matches(trigger.calling_ae, facts.calling_ae):
        return False
    if not _ae_matches(trigger.called_ae, facts.called_ae):
        return False
    return all(rule.matches(facts.attributes.get(key)) for key, rule in trigger.where.items())


def series_quiet_seconds(workflow: Workflow, defaults: CompletionDefaults) -> float:
    """The workflow's series quiet period, or the daemon's default."""
    quiet = workflow.completion.series_quiet
    return defaults.series_quiet_seconds if quiet is None else quiet


def series_ready(
    workflow: Workflow, facts: SeriesFacts, now: float, defaults: CompletionDefaults
) -> bool:
    """Whether no instance of the series arrived for the workflow's series quiet period."""
    return now - facts.last_received >= series_quiet_seconds(workflow, defaults)


def study_readiness(
    workflow: Workflow,
    series: Sequence[SeriesFacts],
    now: float,
    defaults: CompletionDefaults,
    study_first_received: float,
    study_last_received: float,
) -> StudyDecision:
    """Whether a study-scoped workflow may run on the study now (rules in the module doc)."""
    trigger = workflow.trigger
    completion = workflow.completion
    study_quiet = (
        defaults.study_quiet_seconds if completion.study_quiet is None else completion.study_quiet
    )
    max_wait = defaults.max_wait_seconds if completion.max_wait is None else completion.max_wait

    def quiet(facts: SeriesFacts) -> bool:
        return series_ready(workflow, facts, now, defaults)

    triggering = {s.series_instance_uid for s in series if matches_series(trigger, s)}
    selected = [
        s.series_instance_uid
        for s in series
        if s.series_instance_uid in triggering
        or any(r.matches(s.modality, s.attributes) for r in trigger.requires)
    ]
    if not triggering:
        return StudyDecision(
            ready=False,
            expired=False,
            selected=[],
            missing=[],
            reason="no series of the study matches the trigger",
        )

    missing: list[str] = []
    arriving: list[str] = []
    for selector in trigger.requires:
        candidates = [s for s in series if selector.matches(s.modality, s.attributes)]
        if not candidates:
            missing.append(selector.describe())
        elif not any(quiet(s) for s in candidates):
            arriving.append(selector.describe())
    unsettled = [
        s.series_instance_uid for s in series if s.series_instance_uid in selected and not quiet(s)
    ]
    study_quiet_passed = now - study_last_received >= study_quiet
    waited = now - study_first_received

    if missing or arriving or unsettled:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if arriving:
            parts.append("still receiving " + ", ".join(arriving))
        if unsettled and not arriving:
            parts.append(f"{len(unsettled)} selected series still receiving")
        # a series still arriving after its requirements are met is waited for, not given up on
        expired = bool(missing or arriving) and waited >= max_wait
        reason = "; ".join(parts)
        if expired:
            reason = f"gave up after {waited:.0f} s (max_wait {max_wait:g} s): {reason}"
        return StudyDecision(False, expired, selected, missing + arriving, reason)

    if trigger.requires:
        return StudyDecision(True, False, selected, [], "all required series are present")
    if study_quiet_passed:
        return StudyDecision(True, False, selected, [], f"study quiet for {study_quiet:g} s")
    reason = f"waiting for the study to be quiet for {study_quiet:g} s"
    return StudyDecision(False, False, selected, [], reason)
