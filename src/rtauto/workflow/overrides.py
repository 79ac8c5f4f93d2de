"""Step params changed from the command line: ``--set STEP.PARAM=VALUE``.

``rtauto run`` and ``rtauto batch`` take them to try a parameter (a model version, a threshold)
without editing the workflow file. The changed workflow is validated like a file, and its
content hash, which every job records, is that of the changed text, so a job says exactly
what ran.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from rtauto.errors import WorkflowError
from rtauto.workflow.loader import LoadedWorkflow, load_workflow, load_workflow_text

__all__ = ["apply_overrides", "load_workflow_with_overrides"]


def apply_overrides(text: str, overrides: Sequence[str]) -> str:
    """The workflow text with ``STEP.PARAM[.KEY...]=VALUE`` applied to steps' ``with``.

    Raises ValueError naming the override that does not fit (no ``=``, unknown step id).
    """
    if not overrides:
        return text
    data = yaml.safe_load(text)
    steps = {s.get("id"): s for s in (data.get("steps") or []) if isinstance(s, dict)}
    for override in overrides:
        target, sep, value = override.partition("=")
        path = target.strip().split(".")
        if not sep or len(path) < 2 or not all(path):
            raise ValueError(f"--set {override!r}: expected STEP.PARAM=VALUE")
        step = steps.get(path[0])
        if step is None:
            raise ValueError(
                f"--set {override!r}: the workflow has no step {path[0]!r} "
                f"(steps: {', '.join(str(s) for s in steps)})"
            )
        params = step.setdefault("with", {})
        for key in path[1:-1]:
            params = params.setdefault(key, {})
            if not isinstance(params, dict):
                raise ValueError(f"--set {override!r}: {key} is not a mapping")
        params[path[-1]] = yaml.safe_load(value)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def load_workflow_with_overrides(
    path: Path, overrides: Sequence[str], steps: Any, destinations: Iterable[str]
) -> LoadedWorkflow:
    """The workflow file with ``overrides`` applied, validated (WorkflowError, ValueError)."""
    if not overrides:
        return load_workflow(path, steps, known_destinations=destinations)
    text = apply_overrides(path.read_text(encoding="utf-8"), overrides)
    try:
        return load_workflow_text(
            text, f"{path} (with --set)", steps, known_destinations=destinations
        )
    except WorkflowError as exc:
        raise WorkflowError([*exc.problems, f"the overrides were: {' '.join(overrides)}"]) from exc
