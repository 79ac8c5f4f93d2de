"""Workflows: the YAML schema, loading with line-numbered errors, triggers, hot reload.

The public API of this package; the modules behind it are ``schema`` (pydantic models and
JSON Schema), ``loader`` (``file:line:column`` problems), ``conditions`` (the ``if:``
mini-language), ``triggers`` (matching series and study completion) and ``library`` (the hot
reloaded workflows folder).
"""

from rtauto.workflow.conditions import Condition, ConditionError, decide_step, parse_condition
from rtauto.workflow.library import WorkflowLibrary
from rtauto.workflow.loader import (
    LoadedWorkflow,
    load_workflow,
    load_workflow_text,
    validate_paths,
    workflow_files,
)
from rtauto.workflow.overrides import apply_overrides, load_workflow_with_overrides
from rtauto.workflow.schema import (
    Completion,
    RetryPolicy,
    SeriesSelector,
    StepSpec,
    Trigger,
    WhereRule,
    Workflow,
    parse_duration,
    workflow_json_schema,
)
from rtauto.workflow.triggers import (
    SeriesFacts,
    StudyDecision,
    matches_series,
    series_quiet_seconds,
    series_ready,
    study_readiness,
)

__all__ = [
    "Completion",
    "Condition",
    "ConditionError",
    "LoadedWorkflow",
    "RetryPolicy",
    "SeriesFacts",
    "SeriesSelector",
    "StepSpec",
    "StudyDecision",
    "Trigger",
    "WhereRule",
    "Workflow",
    "WorkflowLibrary",
    "apply_overrides",
    "decide_step",
    "load_workflow",
    "load_workflow_text",
    "load_workflow_with_overrides",
    "matches_series",
    "parse_condition",
    "parse_duration",
    "series_quiet_seconds",
    "series_ready",
    "study_readiness",
    "validate_paths",
    "workflow_files",
    "workflow_json_schema",
]
