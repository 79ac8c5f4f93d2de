"""rtauto: an open automation framework for radiotherapy departments.

The public API for plugin authors is what this module exports; everything else is internal.
"""

__version__ = "0.1.0"

from rtauto.destinations import DestinationType  # noqa: E402
from rtauto.errors import (  # noqa: E402
    ConfigError,
    PluginError,
    RtautoError,
    StepFailed,
    StepRetry,
    WorkflowError,
)
from rtauto.hooks import hookimpl  # noqa: E402
from rtauto.steps import (  # noqa: E402
    Artifact,
    InputInstance,
    InputSeries,
    PreviousStep,
    Provenance,
    StepContext,
    StepResult,
    StepType,
    StudyInputs,
)

__all__ = [
    "Artifact",
    "ConfigError",
    "DestinationType",
    "InputInstance",
    "InputSeries",
    "PluginError",
    "PreviousStep",
    "Provenance",
    "RtautoError",
    "StepContext",
    "StepFailed",
    "StepResult",
    "StepRetry",
    "StepType",
    "StudyInputs",
    "WorkflowError",
    "__version__",
    "hookimpl",
]
