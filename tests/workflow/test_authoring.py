"""What a physicist writing a workflow gets wrong, and what rtauto answers: conditions that
read outputs a step does not have, statuses that never occur, negative thresholds, YAML merge
keys, numbers YAML reads differently than written, durations, destination blocks, --set."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from rtauto.errors import WorkflowError
from rtauto.hooks import build_plugin_manager
from rtauto.workflow import (
    apply_overrides,
    load_workflow,
    load_workflow_text,
    load_workflow_with_overrides,
    parse_duration,
    validate_paths,
)
from rtauto.workflow.conditions import ConditionError, parse_condition

CHECK_THEN_SEND = """\
name: gate
trigger: {modality: RTPLAN}
steps:
  - id: check
    uses: test.check
  - id: send
    uses: test.send
    needs: [check]
    if: %s
    with: {destination: tps}
destinations:
  tps: {ae_title: TPS, host: tps.local, port: 104}
"""


def problems(text: str, steps=None, **kwargs) -> list[str]:
    with pytest.raises(WorkflowError) as raised:
        load_workflow_text(textwrap.dedent(text), "wf.yaml", steps, **kwargs)
    return raised.value.problems


def test_a_condition_reading_an_output_the_step_type_lacks_is_refused(step_types):
    found = problems(CHECK_THEN_SEND % "\"steps.check.outputs.outcom != 'fail'\"", step_types)
    assert found == [
        "wf.yaml:9:9: step 'send': if: steps.check.outputs.outcom: step 'check' (test.check) "
        "has no output 'outcom'; did you mean 'outcome'?"
    ]
    # declared outputs (deeper keys too) load
    load_workflow_text(CHECK_THEN_SEND % "steps.check.outputs.findings[0]", "wf.yaml", step_types)
    # a step type that declares no outputs is not second-guessed
    text = CHECK_THEN_SEND.replace("uses: test.check", "uses: test.segment\n    with: {model: m}")
    load_workflow_text(text % "steps.check.outputs.anything == 1", "wf.yaml", step_types)


@pytest.mark.parametrize("literal", ["'okay'", "'FAIL'", "['ok', 'failed']"])
def test_a_status_compared_with_a_value_no_status_has_is_refused(literal):
    operator = "in" if literal.startswith("[") else "=="
    found = problems(CHECK_THEN_SEND % f'"steps.check.status {operator} {literal}"')
    assert len(found) == 1 and found[0].startswith("wf.yaml:9:9: ")
    assert "a step's status is 'ok', 'fail' or 'skipped', never" in found[0]


def test_negative_numbers_compare_and_signs_stand_only_before_numbers():
    condition = parse_condition("steps.reg.outputs.shift_mm < -5 or steps.reg.outputs.n > +2")
    assert condition.evaluate({"reg": {"status": "ok", "outputs": {"shift_mm": -6, "n": 0}}})
    assert not condition.evaluate({"reg": {"status": "ok", "outputs": {"shift_mm": -4, "n": 2}}})
    with pytest.raises(ConditionError, match="a sign .* may only stand before a number"):
        parse_condition("-steps.reg.outputs.shift_mm > 5")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps.a.outputs.x = 3", "not a valid expression (compare with ==, not =)"),
        ("steps.a.outputs.x is None", "'is' is not allowed; compare with == or !="),
        ("1 if steps.a.outputs.x else 2", "'x if condition else y' is not allowed"),
        ("{'a': 1} == steps.a.outputs.x", "a mapping {...} is not allowed"),
    ],
)
def test_condition_messages_speak_of_the_expression_not_of_python(text, message):
    with pytest.raises(ConditionError) as raised:
        parse_condition(text)
    assert message in raised.value.message


def test_yaml_merge_keys_are_not_duplicates_but_repeated_keys_still_are(step_types):
    merged = """\
    name: merged
    trigger: {modality: CT}
    steps:
      - &base
        id: a
        uses: test.send
        timeout: 5m
        with: {destination: tps}
      - <<: *base
        id: b
        timeout: 10m
    destinations:
      tps: {ae_title: TPS, host: tps.local, port: 104}
    """
    loaded = load_workflow_text(textwrap.dedent(merged), "wf.yaml", step_types)
    assert [(s.id, s.timeout) for s in loaded.workflow.steps] == [("a", 300.0), ("b", 600.0)]
    twice = textwrap.dedent(merged).replace("    timeout: 10m\n", "    timeout: 10m\n    id: c\n")
    assert problems(twice, step_types) == ["wf.yaml:12:5: duplicate key 'id' (first at line 10)"]


def test_where_values_that_yaml_reads_as_other_numbers_must_be_quoted():
    text = """\
    name: numbers
    trigger:
      modality: CT
      where: {PatientID: 012345, SeriesNumber: 0x1A, StudyID: 1_000, AccessionNumber: "012"}
    steps:
      - {id: a, uses: test.send, with: {destination: x}}
    """
    assert problems(text) == [
        "wf.yaml:4:22: 012345 is read by YAML as the number 5349; "
        "write '012345' in quotes to match the text",
        "wf.yaml:4:44: 0x1A is read by YAML as the number 26; write '0x1A' in quotes to match "
        "the text",
        "wf.yaml:4:59: 1_000 is read by YAML as the number 1000; write '1_000' in quotes to "
        "match the text",
    ]
    # numbers written as YAML reads them are fine
    load_workflow_text(
        text.replace("012345", "12345").replace("0x1A", "26").replace("1_000", "1000"), "wf.yaml"
    )


def test_spaces_separate_a_duration_s_parts_never_the_digits_of_a_number():
    assert parse_duration("5 m") == 300 and parse_duration("1h 30m") == 5400
    assert parse_duration(" 20 s ") == 20 and parse_duration("10S") == 10
    for bad in ("3 0", "1 0s", "5 min"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)


def test_a_workflow_s_destination_blocks_are_checked_against_their_type():
    host = build_plugin_manager(autoload=False)
    text = """\
    name: dests
    trigger: {modality: CT}
    steps:
      - {id: a, uses: route.send, with: {destination: web}}
    destinations:
      web: {type: dicomweb, uri: "https://pacs/dicom-web"}
      share: {type: folder}
      pacs: {ae_title: PACS, host: pacs.local, port: 104000}
      ftp: {type: ftp, host: files.local}
    """
    found = problems(text, host.steps, destination_types=host.destination_types)
    assert found == [
        "wf.yaml:6:3: destination 'web' (dicomweb): missing required key 'url'",
        "wf.yaml:6:25: destination 'web' (dicomweb): uri: unknown key 'uri'; did you mean 'url'?",
        "wf.yaml:7:3: destination 'share' (folder): missing required key 'path'",
        "wf.yaml:8:50: destination 'pacs' (dicom): port: Input should be less than or equal to "
        "65535 (got 104000)",
        "wf.yaml:9:15: destination 'ftp': unknown type 'ftp' (installed types: dicom, "
        "dicomweb, folder)",
    ]


OVERRIDDEN = """\
name: overridden
trigger: {modality: CT}
steps:
  - id: a
    uses: test.segment
    with:
  - id: b
    uses: test.segment
    with:
      model: m@1
      threshold: 0.5
"""


def test_set_changes_the_file_s_node_tree_and_problems_keep_the_file_s_lines(
    tmp_path: Path, step_types
):
    path = tmp_path / "wf.yaml"
    path.write_text(OVERRIDDEN)
    loaded = load_workflow_with_overrides(
        path,
        ["a.model=m@2", "b.threshold=0.7", "b.window.level=40", "b.window.width=400"],
        step_types,
        set(),
    )
    assert loaded.params["a"].model == "m@2"
    assert loaded.params["b"].threshold == 0.7 and loaded.params["b"].model == "m@1"
    assert loaded.params["b"].window.width == 400
    # what ran: the changed document, which loads alone to the same workflow
    again = load_workflow_text(loaded.text, "changed.yaml", step_types)
    assert again.params["b"].threshold == 0.7 and again.hash == loaded.hash

    with pytest.raises(WorkflowError) as raised:
        load_workflow_with_overrides(path, ["a.model=m", "b.threshold=high"], step_types, set())
    assert raised.value.problems[0].startswith(f"{path}:11:18: step 'b' (test.segment): ")
    assert "threshold" in raised.value.problems[0]
    assert raised.value.problems[-1] == "(with --set a.model=m --set b.threshold=high)"
    with pytest.raises(WorkflowError) as raised:  # a missing param, reported at the step
        load_workflow_with_overrides(path, ["b.threshold=0.1"], step_types, set())
    assert raised.value.problems[0] == (
        f"{path}:6:5: step 'a' (test.segment): with: missing required key 'model'"
    )


@pytest.mark.parametrize(
    ("text", "override", "message"),
    [
        (OVERRIDDEN, "a.model=[x", "the value is not valid YAML"),
        (OVERRIDDEN, "c.model=x", "the workflow has no step 'c' (steps: a, b)"),
        (OVERRIDDEN, "b.model.x=1", "b.model is not a mapping"),
        (OVERRIDDEN, "model=x", "expected STEP.PARAM=VALUE"),
        ("- a\n- b\n", "a.model=x", "a workflow is a mapping"),
        ("", "a.model=x", "the workflow file is empty"),
        ("name: x\nsteps: [\n", "a.model=x", "YAML syntax error"),
        (OVERRIDDEN + "  - id: a\n    id: c\n", "b.model=x", "duplicate key 'id'"),
    ],
)
def test_set_on_a_broken_file_or_with_a_broken_value_is_a_clear_error(
    tmp_path: Path, step_types, text: str, override: str, message: str
):
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    with pytest.raises((WorkflowError, ValueError)) as raised:
        load_workflow_with_overrides(path, [override], step_types, set())
    shown = "\n".join(getattr(raised.value, "problems", [str(raised.value)]))
    assert message in shown


def test_apply_overrides_edits_a_node_tree():
    root = yaml.compose(OVERRIDDEN)
    apply_overrides(root, ["a.structures=[BODY, LUNGS]"])
    data = yaml.safe_load(yaml.serialize(root))
    assert data["steps"][0]["with"] == {"structures": ["BODY", "LUNGS"]}


def test_validate_names_a_folder_without_workflows(tmp_path: Path):
    assert validate_paths([tmp_path], None) == [
        f"{tmp_path}: no workflow files (*.yaml, *.yml) in this folder"
    ]
    (tmp_path / "w.yaml").write_text(OVERRIDDEN.replace("    with:\n  - id: b", "  - id: b"))
    assert validate_paths([tmp_path], None) == []
    assert load_workflow(tmp_path / "w.yaml").name == "overridden"
