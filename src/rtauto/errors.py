"""rtauto's exceptions.

::

    RtautoError
    ├── ConfigError            daemon configuration file or flags are invalid
    ├── PluginError            a plugin could not be loaded or registered something invalid
    ├── WorkflowError          a workflow file is invalid (carries file:line:column messages)
    ├── IngestError            an incoming file was refused (and quarantined)
    ├── StoreError             the job store cannot be opened or migrated
    ├── ResumeRefused          a job cannot be resumed (it did not fail, or was superseded)
    └── StepError              raised by a step to end itself
        ├── StepFailed         bad data: the step ends FAIL, no retry
        └── StepRetry          transient: the step is retried with backoff
"""

from __future__ import annotations


class RtautoError(Exception):
    """Base class of every error rtauto raises on purpose."""


class ConfigError(RtautoError):
    """The daemon configuration is invalid."""


class PluginError(RtautoError):
    """A plugin could not be loaded, or registered something invalid."""


class WorkflowError(RtautoError):
    """A workflow file is invalid. ``problems`` holds ``file:line:column: message`` strings."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class IngestError(RtautoError):
    """An incoming file was refused; ``reason`` is what the quarantine reason file says."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class StoreError(RtautoError):
    """The job store cannot be opened or migrated."""


class ResumeRefused(RtautoError):
    """A job cannot be resumed; the message says why (it is still running, ended OK, was
    superseded, or its workflow version no longer loads)."""


class StepError(RtautoError):
    """Raised by a step to end itself with a reason the job record shows."""


class StepFailed(StepError):
    """Bad data or a permanent condition: the step ends FAIL and is not retried."""


class StepRetry(StepError):
    """A transient condition: the engine runs the step again after a backoff.

    ``after`` (seconds) overrides the policy's next delay when given.
    """

    def __init__(self, message: str, after: float | None = None):
        self.after = after
        super().__init__(message)
