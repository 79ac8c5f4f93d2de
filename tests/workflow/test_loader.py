"""Loading workflows: every kind of problem, reported at its exact file:line:column."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path

import pytest

from rtauto.errors import WorkflowError
from rtauto.workflow import (
    Workflow,
    load_workflow,
    load_workflow_text,
    parse_duration,
    validate_paths,
    workflow_json_schema,
)

GOOD = """\
name: thorax-autocontour
trigger:
  modality: CT
  where: {SeriesDescription: "(?i)planning", BodyPartExamined: CHEST}
  complete_after: 20s
steps:
  - id: contour
    uses: test.segment
    with: {model: thorax-oar@2, structures: [BODY, Lung_L, Lung_R, Heart, SpinalCord]}
  - id: check
    uses: test.check
    needs: contour
  - id: send
    uses: test.send
    needs: [check]
    if: steps.check.outputs.outcome in ['pass', 'warn']
    with: {destination: tps}
destinations:
  tps: {ae_title: TPS, host: tps.local, port: 104}
"""


def problems_of(text: str, steps=None, known=None) -> list[str]:
    with pytest.raises(WorkflowError) as raised:
        load_workflow_text(textwrap.dedent(text), "wf.yaml", steps, known)
    return raised.value.problems


def test_a_valid_workflow_loads_with_params_order_and_hash(step_types):
    loaded = load_workflow_text(GOOD, "wf.yaml", step_types, known_destinations=set())
    assert loaded.name == "thorax-autocontour"
    assert loaded.order == ["contour", "check", "send"]
    assert loaded.hash == hashlib.sha256(GOOD.encode()).hexdigest()
    assert loaded.params["contour"].model == "thorax-oar@2"
    assert loaded.params["contour"].structures[-1] == "SpinalCord"
    assert loaded.params["send"].destination == "tps"
    assert set(loaded.conditions) == {"send"}
    workflow = loaded.workflow
    assert workflow.completion.series_quiet == 20.0  # trigger.complete_after
    assert workflow.step("check").needs == ["contour"]
    assert workflow.step("send").timeout == 600.0
    assert workflow.trigger.effective_scope == "series"
    assert workflow.destinations["tps"].resolved_type() == "dicom"


def test_load_workflow_hashes_the_exact_file_bytes(tmp_path, step_types):
    path = tmp_path / "thorax.yaml"
    path.write_bytes(GOOD.replace("\n", "\r\n").encode())
    loaded = load_workflow(path, step_types)
    assert loaded.path == path
    assert loaded.hash == hashlib.sha256(path.read_bytes()).hexdigest()
    # a job keeps the text; loading that text again gives the same hash, BOM included
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    loaded = load_workflow(path, step_types)
    assert loaded.hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_workflow_text(loaded.text, str(path), step_types).hash == loaded.hash


def test_yaml_syntax_error_has_its_line():
    problems = problems_of(
        """\
        name: broken
        trigger:
          modality: CT
        steps:
          - id: contour
            uses: test.segment
            with: {model: m, structures: [BODY}
        """
    )
    assert len(problems) == 1
    assert problems[0].startswith("wf.yaml:7:39: YAML syntax error:")


def test_unknown_step_type_suggests_the_close_one(step_types):
    problems = problems_of(
        """\
        name: typo
        trigger: {modality: CT}
        steps:
          - id: contour
            uses: test.segmnt
            with: {model: m}
        """,
        step_types,
    )
    assert problems == [
        "wf.yaml:5:11: step 'contour': unknown step type 'test.segmnt'; "
        "did you mean 'test.segment' or 'test.send'?"
    ]


def test_unknown_step_type_with_nothing_close_lists_the_registered_ones(step_types):
    (problem,) = problems_of(
        "name: x\ntrigger: {modality: CT}\nsteps:\n  - {id: a, uses: vendor.magic}\n",
        step_types,
    )
    assert problem.startswith("wf.yaml:4:19: step 'a': unknown step type 'vendor.magic'")
    assert "test.check, test.segment, test.send" in problem


def test_missing_required_param_points_at_with(step_types):
    problems = problems_of(
        """\
        name: no-model
        trigger: {modality: CT}
        steps:
          - id: contour
            uses: test.segment
            with:
              structures: [BODY]
        """,
        step_types,
    )
    assert problems == [
        "wf.yaml:6:5: step 'contour' (test.segment): with: missing required key 'model'"
    ]


def test_missing_with_block_points_at_the_step(step_types):
    problems = problems_of(
        """\
        name: no-with
        trigger: {modality: CT}
        steps:
          - id: send
            uses: test.send
        """,
        step_types,
    )
    assert problems == [
        "wf.yaml:4:5: step 'send' (test.send): with: missing required key 'destination'"
    ]


def test_wrong_param_type_and_unknown_param(step_types):
    problems = problems_of(
        """\
        name: bad-params
        trigger: {modality: CT}
        steps:
          - id: contour
            uses: test.segment
            with:
              model: m
              threshold: high
              modle: n
        """,
        step_types,
    )
    assert problems == [
        "wf.yaml:8:18: step 'contour' (test.segment): with.threshold: "
        "Input should be a valid number, unable to parse string as a number (got 'high')",
        "wf.yaml:9:7: step 'contour' (test.segment): with.modle: "
        "unknown key 'modle'; did you mean 'model'?",
    ]


def test_nested_param_errors_point_into_the_block(step_types):
    problems = problems_of(
        """\
        name: nested
        trigger: {modality: CT}
        steps:
          - id: contour
            uses: test.segment
            with:
              model: m
              window:
                level: 40
                widht: 400
        """,
        step_types,
    )
    assert problems == [
        "wf.yaml:8:7: step 'contour' (test.segment): with.window: missing required key 'width'",
        "wf.yaml:10:9: step 'contour' (test.segment): with.window.widht: unknown key 'widht'; "
        "did you mean 'width'?",
    ]


def test_unknown_needs_and_duplicate_ids():
    problems = problems_of(
        """\
        name: graph
        trigger: {modality: CT}
        steps:
          - id: a
            uses: test.segment
          - id: b
            uses: test.check
            needs: [a, ghost]
          - id: a
            uses: test.send
        """
    )
    assert problems == [
        "wf.yaml:8:16: step 'b' needs unknown step 'ghost'",
        "wf.yaml:9:9: duplicate step id 'a' (also step 1)",
    ]


def test_a_cycle_is_named_and_located():
    problems = problems_of(
        """\
        name: cycle
        trigger: {modality: CT}
        steps:
          - id: first
            uses: test.check
          - id: a
            uses: test.check
            needs: [first, c]
          - id: b
            uses: test.check
            needs: a
          - id: c
            uses: test.check
            needs: [b]
        """
    )
    assert problems == ["wf.yaml:8:5: cycle in needs: a -> c -> b -> a"]


def test_a_step_needing_itself():
    problems = problems_of(
        "name: x\ntrigger: {modality: CT}\nsteps:\n  - {id: a, uses: t.x, needs: [a]}\n"
    )
    assert problems == ["wf.yaml:4:32: step 'a' needs itself"]


def test_bad_regex_and_unknown_attribute_keyword():
    problems = problems_of(
        """\
        name: regex
        trigger:
          modality: CT
          where:
            SeriesDescription: "(?i)plan(ning"
            SeriesDescriptio: CT
            BodyPartExamined: NO
        steps:
          - {id: a, uses: test.check}
        """
    )
    assert problems == [
        "wf.yaml:5:24: trigger.where.SeriesDescription: bad regular expression "
        "'(?i)plan(ning': missing ), unterminated subpattern at position 8 (write "
        "{equals: ...} for an exact value)",
        "wf.yaml:6:5: trigger.where.SeriesDescriptio: 'SeriesDescriptio' is not a DICOM "
        "attribute keyword (e.g. SeriesDescription)",
        "wf.yaml:7:23: trigger.where.BodyPartExamined: a boolean is not a DICOM value (an "
        "unquoted YES/NO/ON/OFF reads as one in YAML: quote it) (got False)",
    ]


def test_bad_if_expressions():
    problems = problems_of(
        """\
        name: conditions
        trigger: {modality: CT}
        steps:
          - id: check
            uses: test.check
          - id: other
            uses: test.check
          - id: syntax
            uses: test.send
            needs: check
            if: steps.check.outputs.outcome ==
          - id: unknown
            uses: test.send
            needs: check
            if: steps.chek.status == 'ok'
          - id: not-needed
            uses: test.send
            needs: check
            if: steps.other.status == 'ok'
          - id: unsafe
            uses: test.send
            needs: check
            if: __import__('os').system('true')
        """
    )
    assert problems == [
        "wf.yaml:11:9: steps[2].if: bad condition: the expression ends too early "
        "(column 31 of the expression)",
        "wf.yaml:15:9: condition of step 'unknown' names unknown step 'chek'",
        "wf.yaml:19:9: condition of step 'not-needed' reads step 'other', which it does not "
        "need (add 'other' to its needs, directly or through another step)",
        "wf.yaml:23:9: steps[5].if: bad condition: only always(), success() and failure() "
        "may be called (column 1 of the expression)",
    ]


def test_if_may_read_an_ancestor_through_needs():
    loaded = load_workflow_text(
        textwrap.dedent(
            """\
            name: chain
            trigger: {modality: CT}
            steps:
              - {id: a, uses: test.check}
              - {id: b, uses: test.check, needs: a}
              - {id: c, uses: test.send, needs: b, if: "steps.a.status == 'ok' or failure()"}
            """
        )
    )
    assert loaded.conditions["c"].step_ids == {"a"}
    assert loaded.conditions["c"].overrides_success


def test_unknown_destinations_only_when_known_destinations_are_given(step_types):
    text = """\
        name: routing
        trigger: {modality: CT}
        steps:
          - id: send
            uses: test.send
            with:
              destination: tsp
              alternates: [archive, pacs]
        destinations:
          tps: {ae_title: TPS, host: tps.local, port: 104}
        """
    problems = problems_of(text, step_types, known={"archive"})
    assert problems == [
        "wf.yaml:7:20: step 'send': unknown destination 'tsp'; did you mean 'tps'?",
        "wf.yaml:8:29: step 'send': unknown destination 'pacs'",
    ]
    load_workflow_text(textwrap.dedent(text), "wf.yaml", step_types)  # not checked: loads
    load_workflow_text(textwrap.dedent(text), "wf.yaml", step_types, {"archive", "pacs", "tsp"})


def test_schema_errors_duplicate_keys_and_typos_are_all_reported():
    problems = problems_of(
        """\
        name: bad name
        trigger:
          modality: CT
          source: pacs
          complete_after: 20x
        completion: {study_quiet: 1m, max_wait: 0}
        steps:
          - id: a
            uses: test.segment
            timeout: 0
            neds: [b]
            retry: {max_attempts: 0}
          - id: b
            uses: test.check
            needs: [a]
            needs: [c]
        """
    )
    assert problems == [
        "wf.yaml:1:7: name: String should match pattern '^[A-Za-z0-9_.-]+$' (got 'bad name')",
        "wf.yaml:4:11: trigger.source: Input should be 'scp', 'folder' or 'any' (got 'pacs')",
        "wf.yaml:5:19: trigger.complete_after: invalid duration '20x': write seconds or e.g. "
        "500ms, 20s, 5m, 1h, 1h30m",
        "wf.yaml:6:41: completion.max_wait: must be longer than zero",
        "wf.yaml:10:14: steps[0].timeout: must be longer than zero",
        "wf.yaml:11:5: steps[0].neds: unknown key 'neds'; did you mean 'needs'?",
        "wf.yaml:12:27: steps[0].retry.max_attempts: Input should be greater than or equal "
        "to 1 (got 0)",
        "wf.yaml:16:5: duplicate key 'needs' (first at line 15)",
        "wf.yaml:16:13: step 'b' needs unknown step 'c'",
    ]


def test_missing_top_level_keys_and_empty_files():
    assert problems_of("name: x\n") == [
        "wf.yaml:1:1: missing required key 'steps'",
        "wf.yaml:1:1: missing required key 'trigger'",
    ]
    assert problems_of("") == ["wf.yaml:1:1: the workflow file is empty"]
    assert problems_of("- a\n- b\n") == ["wf.yaml:1:1: a workflow is a mapping (name:, ...)"]


def test_complete_after_and_series_quiet_must_agree():
    problems = problems_of(
        """\
        name: twice
        trigger: {modality: CT, complete_after: 20s}
        completion:
          series_quiet: 30s
        steps:
          - {id: a, uses: test.check}
        """
    )
    assert problems == [
        "wf.yaml:3:1: completion: trigger.complete_after and completion.series_quiet "
        "disagree; set only one"
    ]


def test_without_step_types_the_step_checks_are_skipped():
    loaded = load_workflow_text(
        "name: x\ntrigger: {modality: CT}\nsteps:\n  - {id: a, uses: vendor.magic, with: {k: 1}}\n"
    )
    assert loaded.params == {}
    assert loaded.workflow.steps[0].with_ == {"k": 1}


def test_the_model_itself_refuses_a_bad_graph():
    with pytest.raises(ValueError, match="cycle in needs: a -> b -> a"):
        Workflow.model_validate(
            {
                "name": "x",
                "trigger": {"modality": "CT"},
                "steps": [
                    {"id": "a", "uses": "t.x", "needs": "b"},
                    {"id": "b", "uses": "t.x", "needs": "a"},
                ],
            }
        )


def test_durations_and_retry_policy():
    assert parse_duration(20) == 20.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("5m") == 300.0
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration(" 2.5 ") == 2.5
    for bad in ("5 minutes", "-1", "", True, "1d", float("inf"), float("nan"), None):
        with pytest.raises(ValueError):
            parse_duration(bad)
    spec = load_workflow_text(
        "name: x\ntrigger: {modality: CT}\nsteps:\n"
        "  - {id: a, uses: t.x, timeout: 2m, retry: {backoff: 10s, max_backoff: 1m}}\n"
    ).workflow.steps[0]
    assert spec.timeout == 120.0
    assert [spec.retry.delay(n) for n in (1, 2, 3, 4)] == [10.0, 20.0, 40.0, 60.0]
    assert spec.retry.max_attempts == 3 and spec.retry.on_timeout is False


def test_requires_makes_a_study_scoped_trigger():
    loaded = load_workflow_text(
        "name: x\ntrigger:\n  modality: CT\n  requires: [{modality: CT}, {modality: RTSTRUCT}]\n"
        "steps:\n  - {id: a, uses: t.x}\n"
    )
    assert loaded.workflow.trigger.effective_scope == "study"


def test_validate_paths_reports_every_file_and_duplicate_names(tmp_path: Path, step_types):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yml").write_text(GOOD)  # same name as a.yaml
    (tmp_path / "c.yaml").write_text("name: c\ntrigger: {modality: CT}\nsteps: []\n")
    (tmp_path / "notes.txt").write_text("not a workflow")
    problems = validate_paths([tmp_path, tmp_path / "missing.yaml"], step_types)
    assert problems == [
        f"{tmp_path / 'b.yml'}:1:1: workflow name 'thorax-autocontour' is already used by "
        f"{tmp_path / 'a.yaml'}",
        f"{tmp_path / 'c.yaml'}:3:1: steps: List should have at least 1 item after validation, "
        "not 0",
        f"{tmp_path / 'missing.yaml'}: no such file or folder",
    ]
    assert validate_paths([tmp_path / "a.yaml"], step_types) == []


def test_json_schema_carries_each_step_types_params(step_types):
    plain = workflow_json_schema()
    assert plain["required"] == ["name", "trigger", "steps"]
    assert "allOf" not in plain["$defs"]["StepSpec"]
    where = plain["$defs"]["Trigger"]["properties"]["where"]["additionalProperties"]
    assert "re.search" in where["description"]
    schema = workflow_json_schema(step_types)
    step = schema["$defs"]["StepSpec"]
    assert step["properties"]["uses"]["enum"] == ["test.check", "test.segment", "test.send"]
    branches = {b["if"]["properties"]["uses"]["const"]: b["then"] for b in step["allOf"]}
    segment = branches["test.segment"]["properties"]["with"]
    assert segment["required"] == ["model"]
    assert segment["additionalProperties"] is False
    assert set(segment["properties"]) == {"model", "structures", "threshold", "window"}
    refs = re.findall(r'"\$ref": "#/\$defs/([^"]+)"', json.dumps(schema))
    assert "step1_Window" in refs  # a params model's own definitions are carried over
    assert all(ref in schema["$defs"] for ref in refs)
    assert branches["test.segment"]["required"] == ["with"]
    assert branches["test.send"]["properties"]["with"]["required"] == ["destination"]
    assert "required" not in branches["test.check"]  # every param has a default
