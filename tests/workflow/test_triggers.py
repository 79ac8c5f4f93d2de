"""Trigger matching and completion: series quiet periods, required series, maximum wait."""

from __future__ import annotations

import textwrap

import pytest
from pydicom.multival import MultiValue
from pydicom.valuerep import DSfloat

from rtauto.config import CompletionDefaults
from rtauto.workflow import (
    SeriesFacts,
    load_workflow_text,
    matches_series,
    series_ready,
    study_readiness,
)

DEFAULTS = CompletionDefaults(series_quiet_seconds=10, study_quiet_seconds=30, max_wait_seconds=600)


def workflow(trigger: str, completion: str = ""):
    text = "name: t\ntrigger:\n" + textwrap.indent(textwrap.dedent(trigger).rstrip() + "\n", "  ")
    if completion:
        text += "completion:\n" + textwrap.indent(textwrap.dedent(completion), "  ")
    text += "steps:\n  - {id: a, uses: test.check}\n"
    return load_workflow_text(text).workflow


def series(uid="1.2.3", modality="CT", last=0.0, **kwargs) -> SeriesFacts:
    attributes = kwargs.pop("attributes", {})
    return SeriesFacts(
        series_instance_uid=uid,
        study_instance_uid="1.2.9",
        modality=modality,
        attributes=attributes,
        first_received=kwargs.pop("first", 0.0),
        last_received=last,
        instance_count=kwargs.pop("count", 1),
        **kwargs,
    )


DESIGN = workflow(
    """\
    modality: CT
    where: {SeriesDescription: "(?i)planning", BodyPartExamined: CHEST}
    """
)


@pytest.mark.parametrize(
    ("modality", "attributes", "expected"),
    [
        ("CT", {"SeriesDescription": "Planning CT 2mm", "BodyPartExamined": "CHEST"}, True),
        ("CT", {"SeriesDescription": "PLANNING", "BodyPartExamined": "CHEST "}, True),
        ("ct", {"SeriesDescription": "planning", "BodyPartExamined": "CHEST"}, True),
        ("CT", {"SeriesDescription": "Planning", "BodyPartExamined": "NOTCHEST"}, False),
        ("CT", {"SeriesDescription": "Planning", "BodyPartExamined": "chest"}, False),
        ("CT", {"SeriesDescription": "Diagnostic", "BodyPartExamined": "CHEST"}, False),
        ("CT", {"SeriesDescription": "Planning"}, False),  # absent attribute: no match
        ("MR", {"SeriesDescription": "Planning", "BodyPartExamined": "CHEST"}, False),
    ],
)
def test_design_example_matches_as_a_clinician_expects(modality, attributes, expected):
    assert matches_series(DESIGN.trigger, series(modality=modality, attributes=attributes)) is (
        expected
    )


def test_where_rule_forms():
    trigger = workflow(
        """\
        where:
          SeriesNumber: 2
          SliceThickness: 2.5
          SeriesDescription: {equals: CT 2.5mm}
          ProtocolName: [HEAD, "(?i)^brain"]
          BodyPartExamined: {regex: CHEST}
          ImageType: AXIAL
          StationName: {in: [LINAC1, LINAC2]}
        """
    ).trigger
    good = {
        "SeriesNumber": "2",
        "SliceThickness": DSfloat("2.50"),
        "SeriesDescription": "CT 2.5mm",
        "ProtocolName": "Brain stereo",
        "BodyPartExamined": "NOTCHEST",
        "ImageType": MultiValue(str, ["ORIGINAL", "PRIMARY", "AXIAL"]),
        "StationName": "LINAC2",
    }
    assert matches_series(trigger, series(attributes=good))
    changes = {
        "SeriesNumber": "12",
        "SliceThickness": "not a number",
        "SeriesDescription": "CT 2x5mm",  # {equals:} is literal: '.' is not a wildcard
        "ProtocolName": "HEAD NECK",  # plain item: exact equality
        "BodyPartExamined": "PELVIS",
        "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
        "StationName": "LINAC3",
    }
    for key, value in changes.items():
        assert not matches_series(trigger, series(attributes={**good, key: value})), key
    assert matches_series(trigger, series(attributes={**good, "ProtocolName": "HEAD"}))


def test_a_string_with_regex_characters_is_searched_or_equal():
    trigger = workflow("where: {SeriesDescription: CT 2.5mm}\n").trigger
    assert matches_series(trigger, series(attributes={"SeriesDescription": "CT 2x5mm"}))
    assert matches_series(trigger, series(attributes={"SeriesDescription": "old CT 2.5mm"}))
    literal = workflow("where: {SeriesDescription: T1 (contrast)}\n").trigger
    assert matches_series(literal, series(attributes={"SeriesDescription": "T1 (contrast)"}))
    assert matches_series(literal, series(attributes={"SeriesDescription": "T1 contrast"}))
    forced = workflow("where: {SeriesDescription: {regex: T1 (contrast)}}\n").trigger
    assert not matches_series(forced, series(attributes={"SeriesDescription": "T1 (contrast)"}))


def test_modality_lists_ae_titles_and_source():
    trigger = workflow(
        """\
        modality: [CT, MR]
        calling_ae: [CT_SIM, "MR_SIM"]
        called_ae: RTAUTO
        source: scp
        """
    ).trigger
    ok = {"calling_ae": "CT_SIM", "called_ae": "RTAUTO ", "source": "scp"}
    assert matches_series(trigger, series(modality="MR", **ok))
    assert not matches_series(trigger, series(modality="PT", **ok))
    assert not matches_series(trigger, series(**{**ok, "calling_ae": "PACS"}))
    assert not matches_series(trigger, series(**{**ok, "called_ae": "OTHER"}))
    assert not matches_series(trigger, series(**{**ok, "source": "folder"}))
    folder_only = workflow("modality: CT\nsource: folder\n").trigger
    assert matches_series(folder_only, series(source="folder"))
    assert not matches_series(folder_only, series(source="scp", calling_ae="CT_SIM"))
    ae_only = workflow("calling_ae: CT_SIM\n").trigger
    assert not matches_series(ae_only, series(source="folder"))  # a folder has no AE title


def test_series_quiet_period_from_workflow_or_defaults():
    own = workflow("modality: CT\ncomplete_after: 20s\n")
    default = workflow("modality: CT\n")
    facts = series(last=100.0)
    assert not series_ready(own, facts, 119.9, DEFAULTS)
    assert series_ready(own, facts, 120.0, DEFAULTS)
    assert not series_ready(default, facts, 109.0, DEFAULTS)
    assert series_ready(default, facts, 110.0, DEFAULTS)


CT_PLUS_STRUCT = workflow(
    """\
    modality: CT
    requires:
      - {modality: CT}
      - {modality: RTSTRUCT, where: {StructureSetLabel: "(?i)ptv"}}
    """,
    "series_quiet: 5s\nstudy_quiet: 60s\nmax_wait: 10m\n",
)


def decide(facts, now, first=0.0, last=None, wf=CT_PLUS_STRUCT):
    last = max(s.last_received for s in facts) if last is None else last
    return study_readiness(wf, facts, now, DEFAULTS, first, last)


def test_attribute_keywords_name_what_the_series_facts_must_carry():
    assert DESIGN.trigger.attribute_keywords == {"SeriesDescription", "BodyPartExamined"}
    assert CT_PLUS_STRUCT.trigger.attribute_keywords == {"StructureSetLabel"}


def test_study_waits_for_the_required_structure_set():
    ct = series("1.1", "CT", last=10.0)
    mr = series("1.3", "MR", last=10.0)
    decision = decide([ct, mr], now=20.0)
    assert not decision.ready and not decision.expired
    assert decision.missing == ["RTSTRUCT (StructureSetLabel ~/(?i)ptv/)"]
    assert decision.selected == ["1.1"]
    assert "missing RTSTRUCT" in decision.reason


def test_study_is_ready_when_required_series_are_present_and_quiet_before_study_quiet():
    ct = series("1.1", "CT", last=10.0)
    mr = series("1.3", "MR", last=10.0)
    wrong_label = series("1.4", "RTSTRUCT", last=10.0, attributes={"StructureSetLabel": "OAR"})
    struct = series("1.2", "RTSTRUCT", last=30.0, attributes={"StructureSetLabel": "PTV_plan"})
    receiving = decide([ct, mr, wrong_label, struct], now=32.0)
    assert not receiving.ready
    assert receiving.missing == ["RTSTRUCT (StructureSetLabel ~/(?i)ptv/)"]
    assert "still receiving" in receiving.reason
    ready = decide([ct, mr, wrong_label, struct], now=35.0)
    assert ready.ready and not ready.expired
    assert ready.selected == ["1.1", "1.2"]  # the MR and the other structure set are not input
    assert ready.missing == []


def test_a_selected_series_still_arriving_holds_the_study_back():
    ct = series("1.1", "CT", last=10.0)
    second_ct = series("1.5", "CT", last=33.0)
    struct = series("1.2", "RTSTRUCT", last=10.0, attributes={"StructureSetLabel": "PTV"})
    decision = decide([ct, second_ct, struct], now=35.0)
    assert not decision.ready and not decision.expired
    assert "1 selected series still receiving" in decision.reason
    assert decide([ct, second_ct, struct], now=38.0).ready


def test_study_expires_after_max_wait_with_requirements_unmet():
    ct = series("1.1", "CT", last=10.0)
    assert not decide([ct], now=599.0, first=0.0).expired
    decision = decide([ct], now=600.0, first=0.0)
    assert decision.expired and not decision.ready
    assert decision.missing == ["RTSTRUCT (StructureSetLabel ~/(?i)ptv/)"]
    assert decision.reason.startswith("gave up after 600 s (max_wait 600 s)")


def test_study_without_requires_waits_for_the_study_quiet_period():
    wf = workflow("modality: CT\nscope: study\n")
    assert wf.trigger.effective_scope == "study"
    ct = series("1.1", "CT", last=100.0)
    struct = series("1.2", "RTSTRUCT", last=100.0)
    early = decide([ct, struct], now=125.0, wf=wf)
    assert not early.ready and not early.expired
    late = decide([ct, struct], now=130.0, wf=wf)  # default study quiet: 30 s
    assert late.ready and late.selected == ["1.1"]
    # requirements met, only quiet missing: never given up on
    assert not decide([ct, struct], now=5000.0, last=4990.0, wf=wf).expired


def test_study_with_no_triggering_series_does_not_apply():
    decision = decide([series("1.3", "MR", last=0.0)], now=10_000.0)
    assert not decision.ready and not decision.expired
    assert decision.selected == []
