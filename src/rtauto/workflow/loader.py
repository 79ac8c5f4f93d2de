"""Loading workflow files, with every problem reported as ``file:line:column: message``.

:func:`load_workflow` (a file) and :func:`load_workflow_text` (text) either return a
:class:`LoadedWorkflow` or raise :class:`rtauto.errors.WorkflowError` listing every problem
found: YAML syntax errors and duplicate keys, schema errors, unknown step types (with a
suggestion), bad or missing step params (checked against each step type's params model),
duplicate step ids, unknown ``needs``, cycles, bad regular expressions, bad ``if:`` expressions
and unknown destinations. Lines and columns are 1-based and point at the offending key or value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from rtauto.errors import WorkflowError
from rtauto.workflow.conditions import Condition, parse_condition
from rtauto.workflow.schema import (
    SKIP_GRAPH_CHECKS,
    StepSpec,
    Workflow,
    graph_problems,
    topological_order,
)

if TYPE_CHECKING:
    from rtauto.destinations import DestinationType
    from rtauto.hooks.manager import RegisteredStep

__all__ = [
    "LoadedWorkflow",
    "check_configured_destinations",
    "load_workflow",
    "load_workflow_text",
    "validate_paths",
]

Loc = tuple[str | int, ...]
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
# libyaml parses about ten times faster than pure Python, with the same marks
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_CUSTOM_ERRORS = frozenset({"value_error", "bad_condition", "duration"})


@dataclass(frozen=True)
class LoadedWorkflow:
    """A valid workflow, as the engine runs it.

    ``hash`` is the sha256 (hex) of the file's exact bytes: every job records it. ``params``
    holds each step's validated params model instance (empty when loaded without step types).
    ``order`` lists step ids so that each comes after the steps it needs. ``conditions`` holds
    the parsed ``if:`` of the steps that have one.
    """

    workflow: Workflow
    path: Path | None
    text: str
    hash: str
    params: Mapping[str, BaseModel] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    conditions: Mapping[str, Condition] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.workflow.name


@dataclass(frozen=True, order=True)
class _Problem:
    line: int
    column: int
    message: str

    def format(self, source: str) -> str:
        return f"{source}:{self.line}:{self.column}: {self.message}"


def load_workflow(
    path: Path | str,
    steps: Mapping[str, RegisteredStep] | None = None,
    known_destinations: Iterable[str] | None = None,
    destination_types: Mapping[str, DestinationType] | None = None,
) -> LoadedWorkflow:
    """Load and check one workflow file; raises :class:`WorkflowError`.

    ``steps`` are the registered step types (``PluginHost.steps``); when None, step types and
    params are not checked. ``known_destinations`` are the destination names the daemon
    configuration defines; when None, destination names are not checked.
    ``destination_types`` (``PluginHost.destination_types``): the workflow's own
    ``destinations:`` blocks are checked against their type's configuration.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WorkflowError([f"{path}:1:1: cannot read the workflow file: {exc.strerror}"]) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise WorkflowError([f"{path}:{line}:1: the file is not UTF-8 text"]) from exc
    digest = hashlib.sha256(data).hexdigest()
    return _load(text, str(path), steps, known_destinations, path, digest, destination_types)


def load_workflow_text(
    text: str,
    source: str = "<workflow>",
    steps: Mapping[str, RegisteredStep] | None = None,
    known_destinations: Iterable[str] | None = None,
    destination_types: Mapping[str, DestinationType] | None = None,
) -> LoadedWorkflow:
    """Load and check a workflow from text; ``source`` names it in the problem messages."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return _load(text, source, steps, known_destinations, None, digest, destination_types)


def load_workflow_edited(
    path: Path,
    edit: Callable[[yaml.Node], None],
    steps: Mapping[str, RegisteredStep] | None = None,
    known_destinations: Iterable[str] | None = None,
    destination_types: Mapping[str, DestinationType] | None = None,
) -> LoadedWorkflow:
    """A workflow file changed by ``edit`` (which changes its YAML node tree, see
    :mod:`rtauto.workflow.overrides`), checked like a file: problems name the file's own lines.
    Its text and hash are those of the changed document."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        load_workflow(path)  # raises the same WorkflowError as for the file alone
        raise
    changed = ""

    def edit_and_keep(root: yaml.Node) -> None:
        nonlocal changed
        edit(root)
        changed = yaml.serialize(root, Dumper=_YAML_DUMPER, allow_unicode=True)

    loaded = _load(
        text, str(path), steps, known_destinations, path, "", destination_types, edit_and_keep
    )
    digest = hashlib.sha256(changed.encode("utf-8")).hexdigest()
    return dataclasses.replace(loaded, text=changed, hash=digest)


def validate_paths(
    paths: Iterable[Path | str],
    steps: Mapping[str, RegisteredStep] | None,
    known_destinations: Iterable[str] | None = None,
    destination_types: Mapping[str, DestinationType] | None = None,
) -> list[str]:
    """Every problem of every workflow file (a folder stands for its ``*.yaml``/``*.yml``).

    Also reports two files that declare the same workflow name, and a folder without any
    workflow file. An empty list means all valid.
    """
    problems: list[str] = []
    names: dict[str, Path] = {}
    for given in paths:
        given = Path(given)
        if given.is_dir():
            files = workflow_files(given)
            if not files:
                problems.append(f"{given}: no workflow files (*.yaml, *.yml) in this folder")
        elif given.exists():
            files = [given]
        else:
            problems.append(f"{given}: no such file or folder")
            continue
        for file in files:
            try:
                loaded = load_workflow(file, steps, known_destinations, destination_types)
            except WorkflowError as exc:
                problems.extend(exc.problems)
                continue
            if loaded.name in names and names[loaded.name] != file:
                problems.append(
                    f"{file}:1:1: workflow name {loaded.name!r} is already used by "
                    f"{names[loaded.name]}"
                )
            else:
                names[loaded.name] = file
    return problems


def workflow_files(folder: Path) -> list[Path]:
    """The workflow files of a folder: ``*.yaml`` and ``*.yml``, hidden files left out, sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
    )


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _load(
    text: str,
    source: str,
    steps: Mapping[str, RegisteredStep] | None,
    known_destinations: Iterable[str] | None,
    path: Path | None,
    digest: str,
    destination_types: Mapping[str, DestinationType] | None = None,
    edit: Callable[[yaml.Node], None] | None = None,
) -> LoadedWorkflow:
    problems: list[_Problem] = []
    root, data, syntax, duplicates = _compose(text, edit)
    if syntax is not None:
        raise WorkflowError([syntax.format(source)])
    if root is None or data is None:
        raise WorkflowError([f"{source}:1:1: the workflow file is empty"])
    problems.extend(duplicates)
    if not isinstance(data, dict):
        mark = root.start_mark
        raise WorkflowError(
            [f"{source}:{mark.line + 1}:{mark.column + 1}: a workflow is a mapping (name:, ...)"]
        )
    problems.extend(_numbers_read_as_text(root))

    workflow: Workflow | None = None
    try:
        workflow = Workflow.model_validate(data, context={SKIP_GRAPH_CHECKS: True})
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, root, Workflow, ()))

    # step-level checks also run when another part of the file is invalid, so that one
    # run of `rtauto validate` lists everything
    raw_steps = data.get("steps") if isinstance(data.get("steps"), list) else []
    specs: list[tuple[int, StepSpec]] = []
    for index, raw in enumerate(raw_steps):
        # a step that fails here was already reported by the whole workflow's validation
        with contextlib.suppress(ValidationError):
            specs.append((index, StepSpec.model_validate(raw)))
    order: list[str] = []
    if raw_steps and len(specs) == len(raw_steps):
        step_specs = [spec for _, spec in specs]
        graph = graph_problems(step_specs)
        if not graph:
            order = topological_order(step_specs)
    else:
        graph = graph_problems(_lenient_graph(raw_steps))
    for loc, message in graph:
        problems.append(_at(root, loc, message))

    params: dict[str, BaseModel] = {}
    if steps is not None:
        for index, spec in specs:
            model = _check_step_type(root, index, spec, steps, problems)
            if model is not None:
                params[spec.id] = model
        problems.extend(_check_outputs_read(root, specs, steps))

    if destination_types is not None and workflow is not None:
        for name, block in workflow.destinations.items():
            problems.extend(_check_destination_block(root, name, block, destination_types))

    if known_destinations is not None:
        raw_destinations = data.get("destinations")
        known = set(known_destinations)
        if isinstance(raw_destinations, dict):
            known |= {str(k) for k in raw_destinations}
        for index, spec in specs:
            problems.extend(_check_destinations(root, index, spec, known))

    if problems or workflow is None:
        raise WorkflowError([p.format(source) for p in sorted(set(problems))])
    conditions = {s.id: s.condition for s in workflow.steps if s.condition is not None}
    return LoadedWorkflow(
        workflow=workflow,
        path=path,
        text=text,
        hash=digest,
        params=params,
        order=order,
        conditions=conditions,
    )


@dataclass(frozen=True)
class _RawStep:
    """A step that failed validation, read leniently so the graph checks still run."""

    id: str
    needs: list[str]
    condition: Condition | None


def _lenient_graph(raw_steps: list[Any]) -> list[_RawStep]:
    nodes = []
    for raw in raw_steps:
        if not isinstance(raw, dict):
            raw = {}
        step_id = raw.get("id") if isinstance(raw.get("id"), str) else f"<step {len(nodes) + 1}>"
        needs = raw.get("needs")
        needs = [needs] if isinstance(needs, str) else needs if isinstance(needs, list) else []
        try:
            condition = parse_condition(raw["if"]) if isinstance(raw.get("if"), str) else None
        except ValueError:
            condition = None  # reported by the schema check
        nodes.append(_RawStep(step_id, [n for n in needs if isinstance(n, str)], condition))
    return nodes


def _compose(
    text: str, edit: Callable[[yaml.Node], None] | None = None
) -> tuple[yaml.Node | None, Any, _Problem | None, list[_Problem]]:
    """The node tree and the data of a one-document YAML text, or the syntax problem; and the
    duplicate keys, found before the data are built (building merges ``<<:`` keys into the
    tree, which would read as duplicates). ``edit`` may change the tree before that."""
    loader = _YAML_LOADER(text)
    duplicates: list[_Problem] = []
    try:
        root = loader.get_single_node()
        if root is not None:
            duplicates = _duplicate_keys(root)
            if edit is not None:
                edit(root)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            what = f"{exc.problem} ({exc.context})"
        lines = text.splitlines()
        if mark and mark.line < len(lines) and "\t" in lines[mark.line][: mark.column + 1]:
            what += " (a tab: indent with spaces, YAML does not allow tabs there)"
        return None, None, _Problem(line, column, f"YAML syntax error: {what}"), []
    except yaml.YAMLError as exc:
        return None, None, _Problem(1, 1, f"YAML error: {exc}"), []
    finally:
        loader.dispose()
    return root, data, None, duplicates


def _duplicate_keys(node: yaml.Node) -> list[_Problem]:
    """YAML keeps the last of two equal keys silently; a workflow must not."""
    problems: list[_Problem] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, yaml.MappingNode):
            seen: dict[str, yaml.Node] = {}
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        first = seen[key.value].start_mark.line + 1
                        problems.append(
                            _Problem(
                                key.start_mark.line + 1,
                                key.start_mark.column + 1,
                                f"duplicate key {key.value!r} (first at line {first})",
                            )
                        )
                    else:
                        seen[key.value] = key
                stack.append(value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
    return problems


# --------------------------------------------------------------------------------------------
# locating problems in the node tree
# --------------------------------------------------------------------------------------------


def _walk(root: yaml.Node, loc: Loc) -> tuple[yaml.Node, yaml.Node | None, list[int]]:
    """Follow ``loc`` as far as the document allows; items that name nothing are skipped
    (pydantic adds union member tags). Returns the node reached, the key node that led to it
    (None after a list index) and the positions in ``loc`` that were followed."""
    node, key_node, followed = root, None, []
    for position, item in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            # the last of two equal keys is the one YAML keeps (reported as a duplicate)
            matches = [
                (key, value)
                for key, value in node.value
                if isinstance(key, yaml.ScalarNode) and key.value == str(item)
            ]
            if matches:
                key_node, node = matches[-1]
                followed.append(position)
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(item, int)
            and 0 <= item < len(node.value)
        ):
            node, key_node = node.value[item], None
            followed.append(position)
    return node, key_node, followed


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _dotted(items: Iterable[str | int]) -> str:
    text = ""
    for item in items:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else str(item))
    return text


def _at(root: yaml.Node, loc: Loc, message: str, *, key: bool = False) -> _Problem:
    """A problem at ``loc``: the value there, or its key when ``key`` or not a scalar."""
    node, key_node, _ = _walk(root, loc)
    target = (
        key_node
        if key_node is not None and (key or not isinstance(node, yaml.ScalarNode))
        else node
    )
    line, column = _mark(target)
    return _Problem(line, column, message)


def _unwrap(annotation: Any) -> list[Any]:
    """The alternatives of a type annotation, Annotated and Optional removed."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _allowed_keys(model: type[BaseModel], path: Sequence[str | int]) -> list[str]:
    """The keys the model accepts at ``path`` (for "did you mean" on an unknown key)."""
    candidates: list[Any] = [model]
    for item in path:
        following: list[Any] = []
        for candidate in candidates:
            for annotation in _unwrap(candidate):
                origin = typing.get_origin(annotation)
                args = typing.get_args(annotation)
                if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                    for name, info in annotation.model_fields.items():
                        if item in (name, info.alias):
                            following.append(info.annotation)
                elif origin is list and isinstance(item, int) and args:
                    following.append(args[0])
                elif origin is dict and isinstance(item, str) and len(args) == 2:
                    following.append(args[1])
        candidates = following
    keys: list[str] = []
    for candidate in candidates:
        for annotation in _unwrap(candidate):
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                keys.extend(info.alias or name for name, info in annotation.model_fields.items())
    return keys


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _pydantic_problems(
    exc: ValidationError,
    root: yaml.Node,
    model: type[BaseModel],
    prefix: Loc,
    label: str = "",
    hide: int = 0,
) -> list[_Problem]:
    """Map each pydantic error (locations relative to ``prefix``) to a line and column.

    ``label`` starts each message; ``hide`` leading items of the path are left out of it.
    """
    grouped: dict[tuple[int, int, str, bool, str, int], list[str]] = {}
    for error in exc.errors(include_url=False):
        rel = tuple(error["loc"])
        loc = prefix + rel
        node, key_node, followed = _walk(root, loc)
        kind = error["type"]
        followed_items = [loc[i] for i in followed]
        # pydantic reports one error per member of a union: those are grouped with "or"
        union_branch = any(
            i not in followed and isinstance(loc[i], str) and not loc[i].startswith("[")
            for i in range(len(prefix), len(loc))
        )
        got = ""
        if kind == "missing":
            tail = [
                item
                for item in loc[(followed[-1] + 1 if followed else 0) :]
                if isinstance(item, int) or (_IDENTIFIER.fullmatch(item) and item not in _TYPE_TAGS)
            ]
            path = followed_items + tail[:-1]
            target = key_node if key_node is not None else node
            message = f"missing required key {str(tail[-1])!r}" if tail else "missing value"
            union_branch = False
        elif kind == "extra_forbidden":
            path = followed_items
            target = key_node if key_node is not None else node
            name = str(loc[-1])
            parent_rel = [loc[i] for i in followed if len(prefix) <= i < len(loc) - 1]
            message = f"unknown key {name!r}" + _suggest(name, _allowed_keys(model, parent_rel))
        else:
            path = followed_items
            at_key = loc[-1] == "[key]"
            scalar = isinstance(node, yaml.ScalarNode)
            target = key_node if key_node is not None and (at_key or not scalar) else node
            message = error["msg"].removeprefix("Value error, ")
            value = error.get("input")
            if not at_key and kind not in _CUSTOM_ERRORS:
                shown = repr(value) if isinstance(value, (str, int, float, bool)) else ""
                got = f" (got {shown})" if shown and len(shown) <= 60 else ""
        line, column = _mark(target)
        where = _dotted(path[hide:])
        group_key = (
            line,
            column,
            where,
            union_branch,
            got,
            len(grouped) if not union_branch else -1,
        )
        messages = grouped.setdefault(group_key, [])
        if message not in messages:
            messages.append(message)
    problems = []
    for (line, column, where, _, got, _), messages in grouped.items():
        text = " or ".join(messages) + got
        head = f"{label}{where}: " if where else label
        problems.append(_Problem(line, column, head + text))
    return problems


# --------------------------------------------------------------------------------------------
# step types and destinations
# --------------------------------------------------------------------------------------------


def _check_step_type(
    root: yaml.Node,
    index: int,
    spec: StepSpec,
    steps: Mapping[str, RegisteredStep],
    problems: list[_Problem],
) -> BaseModel | None:
    registered = steps.get(spec.uses)
    if registered is None:
        message = f"step {spec.id!r}: unknown step type {spec.uses!r}"
        failure_of = getattr(steps, "failure_of", None)  # hooks.manager.StepTypes
        failure = failure_of(spec.uses) if failure_of is not None else None
        close = difflib.get_close_matches(spec.uses, list(steps), n=3, cutoff=0.6)
        if failure is not None:
            plugin, summary = failure
            message += f": plugin {plugin!r} failed to load ({summary}); `rtauto plugins` shows why"
        elif close:
            message += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
        elif steps:
            known = sorted(steps)
            message += "; registered step types: " + ", ".join(known[:12])
            message += ", ..." if len(known) > 12 else ""
        else:
            message += "; no step types are registered (is the plugin installed?)"
        problems.append(_at(root, ("steps", index, "uses"), message))
        return None
    params_model = registered.step_type.params
    try:
        return params_model.model_validate(spec.with_)
    except ValidationError as exc:
        label = f"step {spec.id!r} ({spec.uses}): "
        loc = ("steps", index, "with")
        problems.extend(_pydantic_problems(exc, root, params_model, loc, label, hide=2))
        return None


def _check_outputs_read(
    root: yaml.Node, specs: Sequence[tuple[int, StepSpec]], steps: Mapping[str, RegisteredStep]
) -> list[_Problem]:
    """``if:`` reading an output that the step's type does not declare (a typo reads as None,
    which would make ``!=`` always true). Step types that declare no outputs are not checked."""
    types_of = {spec.id: spec.uses for _, spec in specs}
    problems = []
    for index, spec in specs:
        if spec.condition is None:
            continue
        for ref in spec.condition.references:
            registered = steps.get(types_of.get(ref.step_id, ""))
            declared = registered.step_type.outputs if registered is not None else None
            if not declared or ref.output is None or ref.output in declared:
                continue
            message = (
                f"step {spec.id!r}: if: steps.{ref.step_id}.outputs.{ref.output}: step "
                f"{ref.step_id!r} ({registered.step_type.name}) has no output {ref.output!r}"
            )
            close = _suggest(str(ref.output), [str(k) for k in declared])
            message += close or f" (its outputs: {', '.join(sorted(declared))})"
            problems.append(_at(root, ("steps", index, "if"), message))
    return problems


def _check_destination_block(
    root: yaml.Node, name: str, block: Any, types: Mapping[str, DestinationType]
) -> list[_Problem]:
    """A workflow's ``destinations:`` block checked against its type's configuration."""
    loc: Loc = ("destinations", name)
    type_name = block.resolved_type()
    destination_type = types.get(type_name)
    if destination_type is None:
        known = ", ".join(sorted(types)) or "none"
        where = ("type",) if block.type else ()
        return [
            _at(
                root,
                loc + where,
                f"destination {name!r}: unknown type {type_name!r} (installed types: {known})",
            )
        ]
    try:
        destination_type.config.model_validate(block.options())
    except ValidationError as exc:
        label = f"destination {name!r} ({type_name}): "
        return _pydantic_problems(exc, root, destination_type.config, loc, label, hide=2)
    return []


def check_configured_destinations(
    destinations: Mapping[str, Any],
    types: Mapping[str, DestinationType],
    config_path: Path | None = None,
    *,
    skip_unknown_types: bool = False,
) -> list[str]:
    """The daemon configuration's ``destinations:`` checked against their types, as a
    workflow's are: ``file:line:column: message`` lines (empty: all valid). Without
    ``config_path`` (or when it cannot be read) the problems name the destination only.
    ``skip_unknown_types``: a destination of a type no plugin provides is not checked."""
    root: yaml.Node | None = None
    if config_path is not None:
        try:
            root = yaml.compose(Path(config_path).read_text(encoding="utf-8"), Loader=_YAML_LOADER)
        except (OSError, yaml.YAMLError):
            root = None
    source = str(config_path) if config_path is not None else "configuration"
    empty = yaml.compose("{}")  # no file to point into: every problem is at 1:1
    problems: list[str] = []
    for name, block in sorted(destinations.items()):
        if skip_unknown_types and block.resolved_type() not in types:
            continue
        found = _check_destination_block(root if root is not None else empty, name, block, types)
        problems.extend(problem.format(source) for problem in found)
    return problems


_PLAIN_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})


def _numbers_read_as_text(root: yaml.Node) -> list[_Problem]:
    """Unquoted values under ``where:`` that YAML turns into a different number than written
    (``012345`` is octal 5349, ``0x1A`` is 26, ``1_000`` is 1000, ``1:30`` is 90): a DICOM
    value is text, so these must be quoted."""
    problems = []
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, inside = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                below = inside or (isinstance(key, yaml.ScalarNode) and key.value == "where")
                stack.append((value, below))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, inside) for item in node.value)
        elif (
            inside
            and isinstance(node, yaml.ScalarNode)
            and not node.style  # plain (libyaml says '', PyYAML None), not quoted
            and node.tag in _PLAIN_NUMBER_TAGS
        ):
            number = yaml.safe_load(node.value)
            if str(number) != node.value:
                line, column = _mark(node)
                problems.append(
                    _Problem(
                        line,
                        column,
                        f"{node.value} is read by YAML as the number {number}; "
                        f"write '{node.value}' in quotes to match the text",
                    )
                )
    return problems


def _check_destinations(
    root: yaml.Node, index: int, spec: StepSpec, known: set[str]
) -> list[_Problem]:
    problems = []
    references: list[tuple[Loc, Any]] = []
    if "destination" in spec.with_:
        references.append((("steps", index, "with", "destination"), spec.with_["destination"]))
    alternates = spec.with_.get("alternates")
    if isinstance(alternates, list):
        for j, name in enumerate(alternates):
            references.append((("steps", index, "with", "alternates", j), name))
    for loc, name in references:
        if isinstance(name, str) and name not in known:
            message = f"step {spec.id!r}: unknown destination {name!r}" + _suggest(name, known)
            if not known:
                message += " (no destinations are defined)"
            problems.append(_at(root, loc, message))
    return problems
