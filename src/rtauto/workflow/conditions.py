"""The ``if:`` mini-language of workflow steps.

An ``if:`` is one expression over the outcomes and outputs of earlier steps::

    if: steps.check.outputs.outcome != 'fail'
    if: steps.check.status == 'ok' and steps.reg.outputs.shift_mm < 5
    if: steps.check.outputs.outcome in ['pass', 'warn']
    if: not steps.reg.outputs.flagged
    if: failure()
    if: always()

Grammar (Python syntax, parsed with :mod:`ast`, never evaluated by Python):

* references: ``steps.<id>.status`` (``'ok'``, ``'fail'`` or ``'skipped'``) and
  ``steps.<id>.outputs.<key>`` (deeper ``.key`` or ``[key]`` / ``[index]`` allowed); write
  ``steps['my-step']`` for an id holding ``-``;
* constants: strings, numbers, ``True``/``False``/``None`` (also ``true``/``false``/``null``),
  lists and tuples;
* ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not in`` (chains allowed), ``and``,
  ``or``, ``not``, parentheses;
* calls, without arguments: ``success()`` (every needed step ended ok), ``failure()`` (a needed
  step failed), ``always()`` (true).

Anything else (other names, attribute access not rooted at ``steps``, other calls, lambdas,
comprehensions, arithmetic) is refused when the workflow loads.

Evaluation never raises: a missing step or output reads as ``None``; an ordering comparison or
``in`` / ``not in`` with ``None`` on either side is false (``==`` and ``!=`` compare normally);
comparing values of incompatible types is false.

When a step runs:

* without ``if:``, a step runs when every step it ``needs`` ended ok;
* with ``if:``, it runs when every needed step has finished, and either every needed step ended
  ok or the expression calls ``always()`` or ``failure()`` (:attr:`Condition.overrides_success`),
  and the expression is true;
* otherwise the step is skipped (and so are the steps that need it, by the same rule).

:func:`decide_step` applies this rule to one step: ``"wait"``, ``"run"`` or ``"skip"``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Condition", "ConditionError", "Reference", "decide_step", "parse_condition"]

_FINISHED = frozenset({"ok", "fail", "skipped"})

_FUNCTIONS = frozenset({"always", "failure", "success"})
_NAMED_CONSTANTS = {"true": True, "false": False, "null": None}
_STEP_FIELDS = ("status", "outputs")
_COMPARE_OPS = (
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.In,
    ast.NotIn,
)


class ConditionError(ValueError):
    """An ``if:`` expression is not valid; ``column`` is 1-based within the expression."""

    def __init__(self, message: str, column: int = 1):
        self.message = message
        self.column = column
        super().__init__(f"column {column}: {message}")


@dataclass(frozen=True)
class Reference:
    """A ``steps.<id>.<field>...`` reference in a condition; ``column`` is 1-based."""

    step_id: str
    path: tuple[str | int, ...]  # first item is "status" or "outputs"
    column: int = 1

    @property
    def output(self) -> str | int | None:
        """The output key read (``steps.a.outputs.KEY...``), None for a status."""
        return self.path[1] if self.path[0] == "outputs" and len(self.path) > 1 else None


@dataclass(frozen=True, eq=False)
class Condition:
    """A parsed ``if:`` expression. Build it with :func:`parse_condition`."""

    text: str
    _tree: ast.expr
    step_ids: frozenset[str]
    overrides_success: bool
    references: tuple[Reference, ...] = ()

    def evaluate(
        self,
        steps: Mapping[str, Mapping[str, Any]],
        needs: Iterable[str] | None = None,
    ) -> bool:
        """The expression's value for finished steps.

        ``steps`` maps a step id to ``{"status": "ok"|"fail"|"skipped", "outputs": {...}}``.
        ``needs`` are the ids the step needs (``success()``/``failure()`` look at them); when
        None, every step in ``steps`` counts.
        """
        needed = list(steps) if needs is None else list(needs)
        return bool(_Evaluator(steps, needed).value(self._tree))

    def __repr__(self) -> str:
        return f"Condition({self.text!r})"


def parse_condition(text: str) -> Condition:
    """Parse and check an ``if:`` expression; raises :class:`ConditionError` (a ValueError)."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionError("the condition is empty")
    # YAML folded text may span lines; the expression itself is one line of Python syntax
    source = " ".join(text.split("\n"))
    offset = len(source) - len(source.lstrip())
    expression = source.strip()
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        if not exc.offset or exc.offset > len(expression):
            # Python reports no position when the input ends too early
            raise ConditionError(
                "the expression ends too early", len(expression) + 1 + offset
            ) from None
        message = exc.msg if exc.msg != "invalid syntax" else "not a valid expression"
        if "=" in expression and "==" not in expression and "!=" not in expression:
            message += " (compare with ==, not =)"
        raise ConditionError(message, exc.offset + offset) from None
    checker = _Checker(offset)
    checker.check(tree.body)
    return Condition(
        text=text,
        _tree=tree.body,
        step_ids=frozenset(checker.step_ids),
        overrides_success=bool(checker.calls & {"always", "failure"}),
        references=tuple(checker.references),
    )


def decide_step(
    needs: Sequence[str],
    condition: Condition | None,
    steps: Mapping[str, Mapping[str, Any]],
) -> Literal["wait", "run", "skip"]:
    """Apply the run rule (module doc) to one step.

    ``needs`` are the step's needed ids, ``condition`` its parsed ``if:`` (or None), ``steps``
    the finished steps of the job as :meth:`Condition.evaluate` takes them. ``"wait"`` while a
    needed step has not finished.
    """
    statuses = [
        step.get("status") if isinstance(step := steps.get(n), Mapping) else None for n in needs
    ]
    if any(status not in _FINISHED for status in statuses):
        return "wait"
    all_ok = all(status == "ok" for status in statuses)
    if condition is None:
        return "run" if all_ok else "skip"
    if (all_ok or condition.overrides_success) and condition.evaluate(steps, needs=needs):
        return "run"
    return "skip"


class _Checker:
    """Walks the tree and refuses every node outside the whitelist."""

    def __init__(self, offset: int):
        self.offset = offset
        self.step_ids: set[str] = set()
        self.calls: set[str] = set()
        self.references: list[Reference] = []

    def fail(self, node: ast.AST, message: str) -> ConditionError:
        return ConditionError(message, getattr(node, "col_offset", 0) + 1 + self.offset)

    def check(self, node: ast.expr) -> None:
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                self.check(value)
        elif isinstance(node, ast.UnaryOp):
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                if not _is_number(node.operand):
                    raise self.fail(node, "a sign (- or +) may only stand before a number")
                return
            if not isinstance(node.op, ast.Not):
                raise self.fail(node, "only 'not', and a sign before a number, are allowed")
            self.check(node.operand)
        elif isinstance(node, ast.Compare):
            for op in node.ops:
                if not isinstance(op, _COMPARE_OPS):
                    shown = _OPERATOR_TEXT.get(type(op), type(op).__name__)
                    raise self.fail(node, f"{shown} is not allowed; compare with == or !=")
            self.check(node.left)
            for comparator in node.comparators:
                self.check(comparator)
            self.check_status_values([node.left, *node.comparators])
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (str, int, float, bool, type(None))):
                raise self.fail(node, f"constant {node.value!r} is not allowed")
        elif isinstance(node, (ast.List, ast.Tuple)):
            for element in node.elts:
                if isinstance(element, ast.Starred):
                    raise self.fail(element, "'*' is not allowed")
                self.check(element)
        elif isinstance(node, ast.Name):
            if node.id in _NAMED_CONSTANTS:
                return
            if node.id == "steps":
                raise self.fail(node, "name a step and a field: steps.<id>.status or .outputs")
            raise self.fail(node, f"unknown name {node.id!r}; refer to steps.<id>.status/outputs")
        elif isinstance(node, (ast.Attribute, ast.Subscript)):
            ref = self.reference(node)
            self.step_ids.add(ref.step_id)
            self.references.append(ref)
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
                raise self.fail(node, "only always(), success() and failure() may be called")
            if node.args or node.keywords:
                raise self.fail(node, f"{node.func.id}() takes no arguments")
            self.calls.add(node.func.id)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
            raise self.fail(
                node, "arithmetic is not allowed (for an id with '-' write steps['my-step'])"
            )
        else:
            shown = _NODE_TEXT.get(type(node), "this kind of expression")
            raise self.fail(node, f"{shown} is not allowed in a condition")

    def check_status_values(self, operands: Sequence[ast.expr]) -> None:
        """A ``steps.<id>.status`` compared with a string that no status ever is (``'okay'``,
        ``'FAIL'``) would make the comparison constant: refused."""
        if not any(self.is_status(o) for o in operands):
            return
        for operand in operands:
            literals: list[ast.expr] = (
                list(operand.elts) if isinstance(operand, (ast.List, ast.Tuple)) else [operand]
            )
            for literal in literals:
                if (
                    isinstance(literal, ast.Constant)
                    and isinstance(literal.value, str)
                    and literal.value not in _FINISHED
                ):
                    raise self.fail(
                        literal,
                        f"a step's status is 'ok', 'fail' or 'skipped', never {literal.value!r}",
                    )

    def is_status(self, node: ast.expr) -> bool:
        if not isinstance(node, ast.Attribute) or node.attr != "status":
            return False
        owner = node.value
        return (
            isinstance(owner, (ast.Attribute, ast.Subscript))
            and isinstance(owner.value, ast.Name)
            and owner.value.id == "steps"
        )

    def reference(self, node: ast.expr) -> Reference:
        """Unwind an attribute/subscript chain; it must start at ``steps.<id>.<field>``."""
        chain: list[str | int] = []
        current = node
        while True:
            if isinstance(current, ast.Attribute):
                chain.append(current.attr)
                current = current.value
            elif isinstance(current, ast.Subscript):
                key = current.slice
                if not isinstance(key, ast.Constant) or not isinstance(key.value, (str, int)):
                    raise self.fail(current, "a subscript must be a constant string or integer")
                if isinstance(key.value, bool):
                    raise self.fail(current, "a subscript must be a constant string or integer")
                chain.append(key.value)
                current = current.value
            else:
                break
        if not isinstance(current, ast.Name) or current.id != "steps":
            raise self.fail(node, "attribute access is only allowed on steps.<id>...")
        chain.reverse()
        if len(chain) < 2:
            raise self.fail(node, "name a step and a field: steps.<id>.status or .outputs")
        step_id, field = chain[0], chain[1]
        if not isinstance(step_id, str):
            raise self.fail(node, "a step id must be a string")
        if field not in _STEP_FIELDS:
            raise self.fail(node, f"steps.{step_id}.{field}: a step has only status and outputs")
        if field == "status" and len(chain) > 2:
            raise self.fail(node, f"steps.{step_id}.status is a string, it has no fields")
        return Reference(step_id, tuple(chain[1:]), node.col_offset + 1 + self.offset)


class _Evaluator:
    def __init__(self, steps: Mapping[str, Mapping[str, Any]], needs: Sequence[str]):
        self.steps = steps
        self.needs = needs

    def status(self, step_id: str) -> Any:
        step = self.steps.get(step_id)
        return step.get("status") if isinstance(step, Mapping) else None

    def value(self, node: ast.expr) -> Any:
        if isinstance(node, ast.BoolOp):
            results = (bool(self.value(v)) for v in node.values)
            return all(results) if isinstance(node.op, ast.And) else any(results)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                return -self.value(node.operand)
            if isinstance(node.op, ast.UAdd):
                return self.value(node.operand)
            return not self.value(node.operand)
        if isinstance(node, ast.Compare):
            left = self.value(node.left)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self.value(comparator)
                if not _compare(op, left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.value(e) for e in node.elts]
        if isinstance(node, ast.Name):
            return _NAMED_CONSTANTS[node.id]
        if isinstance(node, ast.Call):
            name = node.func.id  # type: ignore[attr-defined]
            if name == "always":
                return True
            if name == "success":
                return all(self.status(s) == "ok" for s in self.needs)
            return any(self.status(s) == "fail" for s in self.needs)
        return self.lookup(node)

    def lookup(self, node: ast.expr) -> Any:
        chain: list[str | int] = []
        current = node
        while isinstance(current, (ast.Attribute, ast.Subscript)):
            if isinstance(current, ast.Attribute):
                chain.append(current.attr)
            else:
                chain.append(current.slice.value)  # type: ignore[attr-defined]
            current = current.value
        chain.reverse()
        value: Any = self.steps
        for key in chain:
            if isinstance(value, Mapping):
                value = value.get(key)
            elif isinstance(value, (list, tuple)) and isinstance(key, int):
                value = value[key] if -len(value) <= key < len(value) else None
            else:
                return None
            if value is None:
                return None
        return value


def _is_number(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
    )


# how refused syntax is named in messages (for physicists, not Python programmers)
_OPERATOR_TEXT: dict[type, str] = {ast.Is: "'is'", ast.IsNot: "'is not'"}
_NODE_TEXT: dict[type, str] = {
    ast.BinOp: "arithmetic",
    ast.IfExp: "'x if condition else y'",
    ast.JoinedStr: "an f-string",
    ast.Dict: "a mapping {...}",
    ast.Set: "a set {...}",
    ast.Lambda: "lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension",
    ast.NamedExpr: "':='",
    ast.Await: "await",
    ast.Starred: "'*'",
    ast.Slice: "a slice",
}


def _compare(op: ast.cmpop, left: Any, right: Any) -> bool:
    if isinstance(op, ast.Eq):
        return bool(left == right)
    if isinstance(op, ast.NotEq):
        return bool(left != right)
    if left is None or right is None:
        return False
    try:
        if isinstance(op, ast.Lt):
            return bool(left < right)
        if isinstance(op, ast.LtE):
            return bool(left <= right)
        if isinstance(op, ast.Gt):
            return bool(left > right)
        if isinstance(op, ast.GtE):
            return bool(left >= right)
        if isinstance(op, ast.In):
            return bool(left in right)
        return bool(left not in right)
    except TypeError:
        return False
