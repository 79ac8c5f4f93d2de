"""The if: mini-language: evaluation, the run rule's helpers, and refusal of unsafe input."""

from __future__ import annotations

import pytest

from rtauto.workflow import ConditionError, decide_step, parse_condition

STEPS = {
    "check": {"status": "ok", "outputs": {"outcome": "warn", "counts": {"fail": 0}}},
    "reg": {"status": "ok", "outputs": {"shift_mm": 3.2, "flagged": False, "axes": [1, 2]}},
    "contour": {"status": "fail", "outputs": {}},
    "send": {"status": "skipped", "outputs": {}},
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps.check.outputs.outcome != 'fail'", True),
        ("steps.check.outputs.outcome == 'pass'", False),
        ("steps.check.status == 'ok' and steps.reg.outputs.shift_mm < 5", True),
        ("steps.check.status == 'ok' and steps.reg.outputs.shift_mm < 3", False),
        ("steps.check.outputs.outcome in ['pass', 'warn']", True),
        ("steps.check.outputs.outcome not in ('pass', 'warn')", False),
        ("not steps.reg.outputs.flagged", True),
        ("steps.check.outputs.counts.fail == 0", True),
        ("steps.check.outputs['counts']['fail'] <= 0", True),
        ("steps.reg.outputs.axes[1] == 2", True),
        ("steps.reg.outputs.axes[5] == None", True),
        ("0 < steps.reg.outputs.shift_mm < 3", False),
        ("0 < steps.reg.outputs.shift_mm < 4", True),
        ("steps.contour.status == 'fail' or steps.send.status == 'ok'", True),
        ("steps.send.status == 'skipped'", True),
        ("steps.reg.outputs.flagged == false", True),
        ("(steps.check.status == 'ok') and not (steps.contour.status == 'ok')", True),
    ],
)
def test_evaluation(text, expected):
    assert parse_condition(text).evaluate(STEPS) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps.check.outputs.missing == None", True),
        ("steps.check.outputs.missing != 'x'", True),
        ("steps.check.outputs.missing < 5", False),
        ("steps.check.outputs.missing >= 5", False),
        ("steps.check.outputs.missing in ['a']", False),
        ("steps.check.outputs.missing not in ['a']", False),
        ("'a' in steps.check.outputs.missing", False),
        ("steps.ghost.status == 'ok'", False),
        ("steps.ghost.outputs.x.y.z > 1", False),
        ("steps.check.outputs.outcome.deeper == None", True),
        ("steps.check.outputs.outcome > 5", False),  # str vs int: false, not an error
        ("steps.check.outputs.__class__ == None", True),  # a key lookup, never getattr
    ],
)
def test_missing_data_never_raises(text, expected):
    assert parse_condition(text).evaluate(STEPS) is expected


def test_success_failure_always_look_at_the_needed_steps():
    failed = parse_condition("failure()")
    assert failed.overrides_success
    assert failed.evaluate(STEPS, needs=["check", "contour"]) is True
    assert failed.evaluate(STEPS, needs=["check", "reg"]) is False
    succeeded = parse_condition("success()")
    assert not succeeded.overrides_success
    assert succeeded.evaluate(STEPS, needs=["check", "reg"]) is True
    assert succeeded.evaluate(STEPS, needs=["check", "send"]) is False
    assert succeeded.evaluate(STEPS) is False  # without needs: every step counts
    always = parse_condition("always()")
    assert always.overrides_success and always.evaluate({}, needs=[]) is True
    mixed = parse_condition("failure() and steps.check.outputs.outcome == 'warn'")
    assert mixed.overrides_success and mixed.step_ids == {"check"}
    assert mixed.evaluate(STEPS, needs=["check", "contour"]) is True


def test_step_ids_include_subscripted_ids():
    condition = parse_condition("steps['my-step'].status == 'ok' or steps.reg.outputs.x")
    assert condition.step_ids == {"my-step", "reg"}
    assert not condition.overrides_success
    assert condition.evaluate({"my-step": {"status": "ok"}}) is True


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("__import__('os').system('true')", 1, "only always(), success() and failure()"),
        ("steps.check.outputs.x and open('/etc/passwd')", 27, "only always()"),
        ("os.system", 1, "attribute access is only allowed on steps"),
        ("steps.check.outputs.outcome.upper()", 1, "only always()"),
        ("(1).__class__", 1, "attribute access is only allowed on steps"),
        ("lambda: 1", 1, "lambda is not allowed"),
        ("[x for x in steps]", 1, "a comprehension is not allowed"),
        ("{s for s in [1]}", 1, "a comprehension is not allowed"),
        ("steps.reg.outputs.shift_mm * 2 > 1", 1, "arithmetic is not allowed"),
        ("steps.my-step.status == 'ok'", 1, "steps['my-step']"),
        ("steps.check.result == 'ok'", 1, "a step has only status and outputs"),
        ("steps.check.status.upper == 'OK'", 1, "status is a string"),
        ("steps.check", 1, "name a step and a field"),
        ("steps", 1, "name a step and a field"),
        ("outcome == 'fail'", 1, "unknown name 'outcome'"),
        ("steps.check.status == 'ok' and x", 32, "unknown name 'x'"),
        ("always(1)", 1, "takes no arguments"),
        ("steps.check.outputs[steps.reg.outputs.k]", 1, "constant string or integer"),
        ("(x := 1)", 2, "':=' is not allowed"),
        ("1 if steps.check.status else 2", 1, "'x if condition else y' is not allowed"),
        ("-steps.reg.outputs.shift_mm > 1", 1, "may only stand before a number"),
        ("f'{steps}' == 'x'", 1, "an f-string is not allowed"),
        ("{'a': 1}", 1, "a mapping {...} is not allowed"),
        ("steps.check.status is None", 1, "'is' is not allowed"),
        ("[*steps.check.outputs.x]", 2, "'*' is not allowed"),
        ("steps.check.status == 'ok' and and", 32, "not a valid expression"),
        ("steps.check.status ==", 22, "ends too early"),
        ("   ", 1, "empty"),
    ],
)
def test_unsafe_or_invalid_expressions_are_refused(text, column, fragment):
    with pytest.raises(ConditionError) as raised:
        parse_condition(text)
    assert fragment in raised.value.message
    assert raised.value.column == column
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    ("needs", "condition", "expected"),
    [
        ([], None, "run"),
        (["check", "reg"], None, "run"),
        (["check", "contour"], None, "skip"),  # a needed step failed
        (["check", "send"], None, "skip"),  # a needed step was skipped
        (["check", "pending"], None, "wait"),
        (["check", "pending"], "always()", "wait"),  # if: never runs before its needs finish
        (["check"], "steps.check.outputs.outcome == 'warn'", "run"),
        (["check"], "steps.check.outputs.outcome == 'pass'", "skip"),
        (["contour"], "steps.contour.status == 'fail'", "skip"),  # no always()/failure()
        (["contour"], "failure()", "run"),
        (["check", "reg"], "failure()", "skip"),
        (["send"], "failure()", "skip"),  # skipped is not failed
        (["contour", "send"], "always()", "run"),
        (["contour"], "always() and steps.contour.outputs.x == None", "run"),
        (["check"], "success()", "run"),
        (["contour"], "success() or steps.contour.status == 'fail'", "skip"),
    ],
)
def test_decide_step_applies_the_run_rule(needs, condition, expected):
    steps = {**STEPS, "pending": {"status": "running"}}
    parsed = parse_condition(condition) if condition else None
    assert decide_step(needs, parsed, steps) == expected
