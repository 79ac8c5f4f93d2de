"""The workflow YAML schema (pydantic models, every one strict) and its JSON Schema export.

A workflow file::

    name: thorax-autocontour
    trigger:
      modality: CT
      where: {SeriesDescription: "(?i)planning", BodyPartExamined: CHEST}
      complete_after: 20s
    steps:
      - id: contour
        uses: autocontour.segment
        with: {model: thorax-oar@2}
      - id: send
        uses: route.dicom
        needs: [contour]
        with: {destination: tps}
    destinations:
      tps: {ae_title: TPS, host: tps.local, port: 104}

Durations are numbers of seconds or strings such as ``500ms``, ``20s``, ``5m``, ``1h``, ``1h30m``.
The ``where:`` rules are described in :class:`WhereRule`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydicom.datadict import tag_for_keyword

from rtauto.config import Destination
from rtauto.workflow.conditions import Condition, ConditionError, parse_condition

if TYPE_CHECKING:
    from rtauto.hooks.manager import RegisteredStep

__all__ = [
    "Completion",
    "RetryPolicy",
    "SeriesSelector",
    "StepSpec",
    "Trigger",
    "WhereRule",
    "Workflow",
    "GraphStep",
    "graph_problems",
    "parse_duration",
    "topological_order",
    "workflow_json_schema",
]

SKIP_GRAPH_CHECKS = "rtauto_skip_graph_checks"  # validation context key the loader sets

_REGEX_METACHARACTERS = frozenset(".^$*+?{}[]\\|()")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*$|^\s*(\d+(\.\d+)?\s*([mM][sS]|[hH]|[mM]|[sS])\s*)+$"
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# durations
# --------------------------------------------------------------------------------------------


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"500ms"``, ``"20s"``, ``"5m"``, ``"1h30m"``."""
    if isinstance(value, bool):
        raise PydanticCustomError("duration", "a duration is a number of seconds or e.g. '20s'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        # spaces may separate a number from its unit ("5 m") or the parts ("1h 30m"), never
        # the digits of a number ("3 0")
        text = re.sub(r"(?<=[\d.])\s+(?=[a-zA-Z])|(?<=[a-zA-Z])\s+(?=\d)", "", value.strip())
        text = text.lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _DURATION_PART.findall(text)
            if not text or "".join(n + u for n, u in parts) != text:
                raise PydanticCustomError(
                    "duration",
                    "invalid duration '{value}': write seconds or e.g. 500ms, 20s, 5m, 1h, 1h30m",
                    {"value": value},
                )
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise PydanticCustomError("duration", "a duration is a number of seconds or e.g. '20s'")
    if not math.isfinite(seconds):
        raise PydanticCustomError("duration", "a duration must be finite")
    if seconds < 0:
        raise PydanticCustomError("duration", "a duration cannot be negative")
    return seconds


_DURATION_JSON = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": _DURATION_PATTERN},
    ],
    "description": "seconds, or a string such as 500ms, 20s, 5m, 1h, 1h30m",
}

Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_JSON)]


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]


# --------------------------------------------------------------------------------------------
# trigger
# --------------------------------------------------------------------------------------------


def _dicom_keyword(key: str) -> str:
    if tag_for_keyword(key) is None:
        raise ValueError(f"{key!r} is not a DICOM attribute keyword (e.g. SeriesDescription)")
    return key


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


_WHERE_VALUE_JSON = {
    "anyOf": [
        {"type": "string"},
        {"type": "number"},
        {"type": "array", "minItems": 1, "items": {"type": ["string", "number"]}},
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["equals"],
            "properties": {"equals": {"type": ["string", "number"]}},
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["regex"],
            "properties": {"regex": {"type": "string"}},
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["in"],
            "properties": {
                "in": {"type": "array", "minItems": 1, "items": {"type": ["string", "number"]}}
            },
        },
    ],
    "description": (
        "A string without regular-expression characters (. ^ $ * + ? { } [ ] \\ | ( )) must equal "
        "the attribute exactly (case-sensitive, surrounding spaces ignored); any other string "
        "matches a value equal to it or in which it is found as a regular expression "
        "(re.search: '(?i)planning' matches 'Planning CT 2mm'; anchor with ^...$ for a "
        "whole-value match). A number equals the value "
        "numerically. A list, or {in: [...]}, matches when any item matches. {equals: X} and "
        "{regex: R} force literal or regular-expression matching. A multi-valued attribute "
        "matches when any of its values does; an absent attribute never matches."
    ),
}


class WhereRule(_Strict):
    """One ``where:`` rule: how a DICOM attribute's value is matched.

    Written forms (each becomes exactly one of ``equals``/``regex``/``any_of``):

    * a string **without** regular-expression characters (``. ^ $ * + ? { } [ ] \\ | ( )``):
      the attribute must equal it exactly, case-sensitive, surrounding spaces ignored
      (``BodyPartExamined: CHEST`` does not match ``NOTCHEST`` nor ``chest``);
    * any other string: equal to the value, or a regular expression found anywhere in it
      (``re.search``: ``"(?i)planning"`` matches ``"Planning CT 2mm"``; ``"T1 (contrast)"``
      matches itself; anchor with ``^...$`` for a whole-value match); it is compiled when the
      workflow loads;
    * a number: numeric equality (``SeriesNumber: 2`` matches ``"2"`` and ``2.0``);
    * a list, or ``{in: [...]}``: any item matches, each item read by these same rules;
    * ``{equals: X}`` forces exact matching (``{equals: "CT 2.5mm"}``),
      ``{regex: R}`` forces a regular expression (``{regex: CHEST}`` matches ``NOTCHEST``).

    A multi-valued attribute (e.g. ``ImageType``) matches when any of its values matches; an
    absent or empty attribute never matches.
    """

    equals: str | float | None = None
    regex: str | None = None
    any_of: list[WhereRule] | None = Field(None, alias="in")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    _pattern: re.Pattern[str] | None = PrivateAttr(None)
    _also_equals: bool = PrivateAttr(False)

    @model_validator(mode="wrap")
    @classmethod
    def _shorthand_string(cls, value: Any, handler: Any) -> Any:
        # a written string with regex characters also matches its literal text: "T1 (contrast)"
        if isinstance(value, str) and not _REGEX_METACHARACTERS.isdisjoint(value):
            rule = handler({"regex": value})
            rule._also_equals = True
            return rule
        return handler(value)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError(
                "where_bool",
                "a boolean is not a DICOM value (an unquoted YES/NO/ON/OFF reads as one in "
                "YAML: quote it)",
            )
        if isinstance(value, (int, float)):
            return {"equals": float(value)}
        if isinstance(value, str):
            if _REGEX_METACHARACTERS.isdisjoint(value):
                return {"equals": value}
            return {"regex": value}
        if isinstance(value, list):
            return {"in": value}
        return value

    @model_validator(mode="after")
    def _one_form(self) -> WhereRule:
        forms = [f for f in (self.equals, self.regex, self.any_of) if f is not None]
        if len(forms) != 1:
            raise ValueError("write exactly one of equals, regex or in")
        if self.any_of is not None and not self.any_of:
            raise ValueError("an empty list matches nothing")
        if isinstance(self.equals, str):
            self.equals = self.equals.strip()
        if self.regex is not None:
            try:
                self._pattern = re.compile(self.regex)
            except re.error as exc:
                raise ValueError(
                    f"bad regular expression '{self.regex}': {exc} "
                    "(write {equals: ...} for an exact value)"
                ) from None
        return self

    def matches(self, value: Any) -> bool:
        """Whether an attribute value (str, number, or a sequence of them) satisfies the rule."""
        if value is None:
            return False
        if _is_sequence(value):
            return any(self._matches_one(v) for v in value)
        return self._matches_one(value)

    def _matches_one(self, value: Any) -> bool:
        if value is None:
            return False
        if self.any_of is not None:
            return any(rule.matches(value) for rule in self.any_of)
        if self._pattern is not None:
            if self._also_equals and str(value).strip() == self.regex:
                return True
            return self._pattern.search(str(value)) is not None
        if isinstance(self.equals, float):
            try:
                return float(value) == self.equals
            except (TypeError, ValueError):
                return False
        return str(value).strip() == self.equals

    def describe(self) -> str:
        if self.any_of is not None:
            return "any of [" + ", ".join(rule.describe() for rule in self.any_of) + "]"
        if self.regex is not None:
            return f"~/{self.regex}/"
        if isinstance(self.equals, float):
            return f"{self.equals:g}"
        return repr(self.equals)


WhereRules = dict[
    Annotated[str, AfterValidator(_dicom_keyword)],
    Annotated[WhereRule, WithJsonSchema(_WHERE_VALUE_JSON)],
]


def _modalities(value: str | list[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    return frozenset(m.strip().upper() for m in items)


def _check_modality(value: Any) -> Any:
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list):
        if not items:
            raise ValueError("list at least one modality")
        for item in items:
            if isinstance(item, str) and not re.fullmatch(r"[A-Za-z0-9_ ]{1,16}", item.strip()):
                raise ValueError(f"{item!r} is not a DICOM Modality value (e.g. CT, RTSTRUCT)")
    return value


ModalityField = Annotated[str | list[str], AfterValidator(_check_modality)]


def _check_ae_titles(value: str | list[str]) -> str | list[str]:
    items = [value] if isinstance(value, str) else value
    if not items:
        raise ValueError("list at least one AE title")
    for item in items:
        if not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]{1,16}", item) or not item.strip():
            raise ValueError(f"{item!r} is not a DICOM AE title (1 to 16 characters, no '\\')")
    return value


AeTitles = Annotated[str | list[str], AfterValidator(_check_ae_titles)]


class SeriesSelector(_Strict):
    """A series a study must hold: a modality and, optionally, ``where:`` rules."""

    modality: ModalityField
    where: WhereRules = Field(default_factory=dict)

    @property
    def modalities(self) -> frozenset[str]:
        return _modalities(self.modality) or frozenset()

    def matches(self, modality: str, attributes: Mapping[str, Any]) -> bool:
        """Whether a series with this modality and these attributes satisfies the selector."""
        if (modality or "").strip().upper() not in self.modalities:
            return False
        return all(rule.matches(attributes.get(key)) for key, rule in self.where.items())

    def describe(self) -> str:
        text = "/".join(sorted(self.modalities))
        if self.where:
            rules = ", ".join(f"{k} {r.describe()}" for k, r in self.where.items())
            text += f" ({rules})"
        return text


class Trigger(_Strict):
    """Which received series (or studies) start the workflow.

    Every condition given must hold: ``modality`` (one or a list, case-insensitive), ``where``
    (see :class:`WhereRule`), ``calling_ae`` / ``called_ae`` (exact AE title, or any of a list;
    surrounding spaces ignored; such a trigger never matches files from a drop folder), and
    ``source`` (``scp``, ``folder`` or ``any``). ``requires`` lists the series a study must hold
    before the workflow runs on it; it makes the workflow study-scoped unless ``scope`` says
    otherwise.
    """

    modality: ModalityField | None = None
    where: WhereRules = Field(default_factory=dict)
    calling_ae: AeTitles | None = None
    called_ae: AeTitles | None = None
    source: Literal["scp", "folder", "any"] = "any"
    scope: Literal["series", "study"] | None = Field(
        None, description="default: study when `requires` is given, else series"
    )
    requires: list[SeriesSelector] = Field(default_factory=list)
    complete_after: Duration | None = Field(
        None, description="the series quiet period (same as completion.series_quiet)"
    )

    @property
    def effective_scope(self) -> Literal["series", "study"]:
        if self.scope is not None:
            return self.scope
        return "study" if self.requires else "series"

    @property
    def modalities(self) -> frozenset[str] | None:
        return _modalities(self.modality)

    @property
    def attribute_keywords(self) -> frozenset[str]:
        """The DICOM keywords the trigger reads (``where`` and ``requires``): what the series
        facts must carry for it to match."""
        keys = set(self.where)
        for selector in self.requires:
            keys |= set(selector.where)
        return frozenset(keys)


# --------------------------------------------------------------------------------------------
# completion and steps
# --------------------------------------------------------------------------------------------


class Completion(_Strict):
    """When the received data is complete; None takes the daemon's default."""

    series_quiet: Duration | None = Field(
        None, description="a series is complete after no instance arrived for this long"
    )
    study_quiet: Duration | None = Field(
        None, description="a study is complete after no instance arrived for this long"
    )
    max_wait: PositiveDuration | None = Field(
        None,
        description="give up on a study whose required series are still missing this long "
        "after its first arrival (since the study was last complete: a new plan in an old "
        "study waits afresh)",
    )


class RetryPolicy(_Strict):
    """How a step that asked for a retry (or timed out, with ``on_timeout``) is run again."""

    max_attempts: int = Field(3, ge=1, le=100, description="attempts in all, the first included")
    backoff: Duration = Field(5.0, description="delay before the second attempt")
    factor: float = Field(2.0, ge=1.0, description="each later delay is this many times longer")
    max_backoff: Duration = Field(300.0, description="no delay is longer than this")
    on_timeout: bool = Field(False, description="retry also after a timeout")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after attempt number ``attempt`` (1-based) before the next one."""
        exponent = max(attempt, 1) - 1
        try:
            delay = self.backoff * self.factor**exponent
        except OverflowError:
            return self.max_backoff
        return min(delay, self.max_backoff)


def _none_to_empty_dict(value: Any) -> Any:
    return {} if value is None else value


def _needs_list(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _check_condition(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        parse_condition(text)
    except ConditionError as exc:
        raise PydanticCustomError(
            "bad_condition",
            "bad condition: {message} (column {column} of the expression)",
            {"message": exc.message, "column": exc.column},
        ) from None
    return text


StepId = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]


class StepSpec(_Strict):
    """One step: a registered step type (``uses``) with its params (``with``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: StepId
    uses: str = Field(
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$",
        description="a registered step type, plugin.verb (see `rtauto plugins`)",
    )
    with_: Annotated[dict[str, Any], BeforeValidator(_none_to_empty_dict)] = Field(
        default_factory=dict, alias="with", description="the step type's params"
    )
    needs: Annotated[list[StepId], BeforeValidator(_needs_list)] = Field(
        default_factory=list,
        description="ids of the steps that must finish before this one (one id or a list)",
    )
    if_: Annotated[str | None, AfterValidator(_check_condition)] = Field(
        None,
        alias="if",
        description=(
            "a condition on earlier steps, e.g. steps.check.outputs.outcome != 'fail'; "
            "always() / failure() let the step run after a failed step"
        ),
    )
    timeout: PositiveDuration = Field(600.0, description="the step is stopped after this long")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)

    @cached_property
    def condition(self) -> Condition | None:
        """The parsed ``if:``, or None."""
        return parse_condition(self.if_) if self.if_ is not None else None


# --------------------------------------------------------------------------------------------
# workflow
# --------------------------------------------------------------------------------------------


class Workflow(_Strict):
    """A workflow file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=128)
    description: str = ""
    trigger: Trigger
    completion: Completion = Field(default_factory=Completion)
    steps: list[StepSpec] = Field(min_length=1)
    destinations: dict[str, Destination] = Field(
        default_factory=dict, description="destinations named by this workflow's routing steps"
    )

    @field_validator("completion")
    @classmethod
    def _one_series_quiet(cls, completion: Completion, info: ValidationInfo) -> Completion:
        trigger = info.data.get("trigger")
        if (
            trigger is not None
            and trigger.complete_after is not None
            and completion.series_quiet is not None
            and trigger.complete_after != completion.series_quiet
        ):
            raise ValueError(
                "trigger.complete_after and completion.series_quiet disagree; set only one"
            )
        return completion

    @model_validator(mode="after")
    def _merge_and_check(self, info: ValidationInfo) -> Workflow:
        if self.trigger.complete_after is not None and self.completion.series_quiet is None:
            self.completion = self.completion.model_copy(
                update={"series_quiet": self.trigger.complete_after}
            )
        if not (info.context or {}).get(SKIP_GRAPH_CHECKS):
            problems = graph_problems(self.steps)
            if problems:
                raise ValueError("; ".join(message for _, message in problems))
        return self

    def step(self, step_id: str) -> StepSpec:
        for spec in self.steps:
            if spec.id == step_id:
                return spec
        raise KeyError(step_id)


def _needs_graph(steps: Sequence[GraphStep]) -> dict[str, list[str]]:
    graph: dict[str, list[str]] = {}
    for spec in steps:
        graph.setdefault(spec.id, [n for n in spec.needs])
    return graph


def _ancestors(graph: Mapping[str, list[str]], step_id: str) -> set[str]:
    seen: set[str] = set()
    stack = list(graph.get(step_id, ()))
    while stack:
        current = stack.pop()
        if current in seen or current not in graph:
            continue
        seen.add(current)
        stack.extend(graph[current])
    return seen


def _cycles(graph: Mapping[str, list[str]], order: list[str]) -> list[list[str]]:
    """Each elementary cycle found by a depth-first walk, once, as [a, b, ..., a]."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def visit(node: str, path: list[str]) -> None:
        colour[node] = grey
        path.append(node)
        for nxt in graph[node]:
            if nxt not in graph:
                continue
            if colour[nxt] == grey:
                cycle = path[path.index(nxt) :] + [nxt]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle)
            elif colour[nxt] == white:
                visit(nxt, path)
        path.pop()
        colour[node] = black

    for node in order:
        if colour[node] == white:
            visit(node, [])
    return found


class GraphStep(Protocol):
    """What the graph checks read of a step (a :class:`StepSpec` has it)."""

    @property
    def id(self) -> str: ...
    @property
    def needs(self) -> list[str]: ...
    @property
    def condition(self) -> Condition | None: ...


def graph_problems(steps: Sequence[GraphStep]) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems of the step graph, each as (location in the document, message).

    Duplicate step ids, unknown ``needs``, cycles (named), ``if:`` expressions that refer to
    unknown steps or to steps that are not ancestors through ``needs``.
    """
    problems: list[tuple[tuple[str | int, ...], str]] = []
    first_index: dict[str, int] = {}
    for i, spec in enumerate(steps):
        if spec.id in first_index:
            problems.append(
                (
                    ("steps", i, "id"),
                    f"duplicate step id {spec.id!r} (also step {first_index[spec.id] + 1})",
                )
            )
        else:
            first_index[spec.id] = i
    graph = _needs_graph(steps)
    for i, spec in enumerate(steps):
        for j, need in enumerate(spec.needs):
            if need not in graph:
                problems.append(
                    (("steps", i, "needs", j), f"step {spec.id!r} needs unknown step {need!r}")
                )
            elif need == spec.id:
                problems.append((("steps", i, "needs", j), f"step {spec.id!r} needs itself"))
    order = [spec.id for spec in steps]
    for cycle in _cycles(graph, list(dict.fromkeys(order))):
        if len(cycle) == 2:
            continue  # a step needing itself, reported above
        first = min(cycle, key=first_index.__getitem__)
        rotated = cycle[cycle.index(first) : -1] + cycle[: cycle.index(first) + 1]
        problems.append(
            (
                ("steps", first_index[first], "needs"),
                "cycle in needs: " + " -> ".join(rotated),
            )
        )
    for i, spec in enumerate(steps):
        condition = spec.condition
        if condition is None:
            continue
        ancestors = _ancestors(graph, spec.id)
        for ref in sorted(condition.step_ids):
            if ref not in graph:
                problems.append(
                    (
                        ("steps", i, "if"),
                        f"condition of step {spec.id!r} names unknown step {ref!r}",
                    )
                )
            elif ref == spec.id:
                problems.append(
                    (("steps", i, "if"), f"condition of step {spec.id!r} refers to itself")
                )
            elif ref not in ancestors:
                problems.append(
                    (
                        ("steps", i, "if"),
                        f"condition of step {spec.id!r} reads step {ref!r}, which it does not "
                        f"need (add {ref!r} to its needs, directly or through another step)",
                    )
                )
    return problems


def topological_order(steps: Sequence[GraphStep]) -> list[str]:
    """Step ids so that every step comes after those it needs; ties keep file order.

    The graph must be free of cycles and unknown needs (see :func:`graph_problems`).
    """
    graph = _needs_graph(steps)
    position = {step_id: i for i, step_id in enumerate(graph)}
    remaining = {step_id: {n for n in needs if n in graph} for step_id, needs in graph.items()}
    order: list[str] = []
    while remaining:
        ready = sorted((s for s, needs in remaining.items() if not needs), key=position.get)
        if not ready:
            raise ValueError("the needs of the steps form a cycle")
        step_id = ready[0]
        order.append(step_id)
        del remaining[step_id]
        for needs in remaining.values():
            needs.discard(step_id)
    return order


# --------------------------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------------------------


def _rewrite_refs(node: Any, prefix: str) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                v.replace("#/$defs/", f"#/$defs/{prefix}")
                if k == "$ref" and isinstance(v, str)
                else _rewrite_refs(v, prefix)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node


def workflow_json_schema(steps: Mapping[str, RegisteredStep] | None = None) -> dict[str, Any]:
    """The JSON Schema of a workflow file, for editors (``rtauto schema``).

    With the registered ``steps``, ``uses`` is limited to their names and each step's ``with``
    is checked against its step type's params schema (``allOf`` of ``if``/``then`` on ``uses``).
    """
    schema = Workflow.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rtauto workflow"
    defs = schema.setdefault("$defs", {})
    step_schema = defs["StepSpec"]
    needs = step_schema["properties"]["needs"]
    step_schema["properties"]["needs"] = {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": needs.get("items", {})},
            {"type": "null"},  # `needs:` left empty, as `with:` may be
        ],
        "description": needs.get("description", ""),
    }
    step_schema["properties"]["with"] = {
        "type": ["object", "null"],
        "description": step_schema["properties"]["with"].get("description", ""),
    }
    if steps:
        names = sorted(steps)
        step_schema["properties"]["uses"] = {
            "enum": names,
            "description": step_schema["properties"]["uses"].get("description", ""),
        }
        branches = []
        for index, name in enumerate(names):
            step_type = steps[name].step_type
            prefix = f"step{index}_"
            params = step_type.params.model_json_schema(mode="validation")
            for def_name, definition in params.pop("$defs", {}).items():
                defs[prefix + def_name] = _rewrite_refs(definition, prefix)
            params = _rewrite_refs(params, prefix)
            if step_type.description:
                params.setdefault("description", step_type.description)
            then: dict[str, Any] = {"properties": {"with": params}}
            if params.get("required"):
                then["required"] = ["with"]
            elif params.get("type") == "object":
                params["type"] = ["object", "null"]  # `with:` left empty, as validate accepts
            branches.append(
                {
                    "if": {"properties": {"uses": {"const": name}}, "required": ["uses"]},
                    "then": then,
                }
            )
        step_schema["allOf"] = branches
    return schema
