"""Step params changed from the command line: ``--set STEP.PARAM=VALUE``.

``rtauto run`` and ``rtauto batch`` take them to try a parameter (a model version, a threshold)
without editing the workflow file. The overrides change the file's YAML node tree, so the
changed workflow is checked like the file itself: syntax errors and duplicate keys are the
file's, and every problem names the file's own line (a changed value, the line of the value
it replaced, or of the step's ``with:`` or ``id:`` when it is new). The content hash, which
every job records, is that of the changed document, so a job says exactly what ran.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from rtauto.errors import WorkflowError
from rtauto.workflow.loader import LoadedWorkflow, load_workflow, load_workflow_edited

__all__ = ["apply_overrides", "load_workflow_with_overrides", "parse_overrides"]

_MAP = "tag:yaml.org,2002:map"
_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, list[str], yaml.Node]]:
    """Each ``STEP.PARAM[.KEY...]=VALUE`` as (the text, its path, the value as a YAML node).

    Raises ValueError naming the override that is malformed or whose value is not YAML.
    """
    parsed = []
    for override in overrides:
        target, sep, value = override.partition("=")
        path = target.strip().split(".")
        if not sep or len(path) < 2 or not all(path):
            raise ValueError(f"--set {override!r}: expected STEP.PARAM=VALUE")
        try:
            node = yaml.compose(value, Loader=_Loader) if value.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(
                f"--set {override!r}: the value is not valid YAML ({problem}); "
                "quote it, e.g. --set 'step.param=\"text\"'"
            ) from None
        if node is None:
            node = yaml.ScalarNode(_NULL, "null")
        parsed.append((override, path, node))
    return parsed


def _relocate(node: yaml.Node, mark: Any) -> yaml.Node:
    """A copy of ``node`` whose every part claims to stand at ``mark`` (a line of the file)."""
    node = copy.deepcopy(node)
    stack = [node]
    while stack:
        current = stack.pop()
        current.start_mark = current.end_mark = mark
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.extend((key, value))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
    return node


def _entry(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for entry in reversed(mapping.value):
        if isinstance(entry[0], yaml.ScalarNode) and entry[0].value == key:
            return entry
    return None


def _set(mapping: yaml.MappingNode, key: str, value: yaml.Node, mark: Any) -> None:
    for index, (key_node, _) in enumerate(mapping.value):
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            mapping.value[index] = (key_node, value)
            return
    mapping.value.append((yaml.ScalarNode(_STR, key, mark, mark), value))


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def apply_overrides(root: yaml.Node, overrides: Sequence[str]) -> None:
    """Apply ``overrides`` to the ``with:`` blocks of a workflow's node tree (in place).

    Raises ValueError naming the override that does not fit: malformed, an unknown step id,
    a ``with:`` or key on the way that is not a mapping.
    """
    parsed = parse_overrides(overrides)
    steps_entry = _entry(root, "steps") if isinstance(root, yaml.MappingNode) else None
    steps_node = steps_entry[1] if steps_entry else None
    if not isinstance(steps_node, yaml.SequenceNode):
        return  # not a workflow: the file's own problems are reported when it is checked
    steps: dict[str, yaml.MappingNode] = {}
    for step in steps_node.value:
        if isinstance(step, yaml.MappingNode):
            found = _entry(step, "id")
            if found and isinstance(found[1], yaml.ScalarNode):
                steps.setdefault(found[1].value, step)
    for override, path, value in parsed:
        step = steps.get(path[0])
        if step is None:
            raise ValueError(
                f"--set {override!r}: the workflow has no step {path[0]!r} "
                f"(steps: {', '.join(steps) or 'none'})"
            )
        with_entry = _entry(step, "with")
        id_entry = _entry(step, "id")
        mark = (with_entry or id_entry or (step, step))[0].start_mark
        if with_entry is None or _is_null(with_entry[1]):
            params = yaml.MappingNode(_MAP, [], mark, mark)
            _set(step, "with", params, mark)
        elif isinstance(with_entry[1], yaml.MappingNode):
            params = with_entry[1]
        else:
            raise ValueError(f"--set {override!r}: the with: of step {path[0]!r} is not a mapping")
        for depth, key in enumerate(path[1:-1], start=1):
            found = _entry(params, key)
            if found is None or _is_null(found[1]):
                child = yaml.MappingNode(_MAP, [], mark, mark)
                _set(params, key, child, mark)
            elif isinstance(found[1], yaml.MappingNode):
                child = found[1]
            else:
                shown = ".".join(path[: depth + 1])
                raise ValueError(f"--set {override!r}: {shown} is not a mapping")
            params = child
        found = _entry(params, path[-1])
        at = found[1].start_mark if found else mark
        _set(params, path[-1], _relocate(value, at), at)


def load_workflow_with_overrides(
    path: Path,
    overrides: Sequence[str],
    steps: Any,
    destinations: Iterable[str],
    destination_types: Mapping[str, Any] | None = None,
) -> LoadedWorkflow:
    """The workflow file with ``overrides`` applied, validated (WorkflowError, ValueError)."""
    if not overrides:
        return load_workflow(path, steps, destinations, destination_types)
    parse_overrides(overrides)  # a malformed override is named before the file is read

    def edit(root: yaml.Node) -> None:
        apply_overrides(root, overrides)

    try:
        return load_workflow_edited(path, edit, steps, destinations, destination_types)
    except WorkflowError as exc:
        raise WorkflowError([*exc.problems, f"(with --set {' --set '.join(overrides)})"]) from exc
