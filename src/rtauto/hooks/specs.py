"""rtauto's hook specifications.

Two kinds of hook, with two error rules (chosen per hook and stated in its docstring):

* **provider** hooks hand the plugin a ``register`` callback. Every implementation is called;
  an implementation that raises is reported with its plugin's name and what it registered is
  dropped, the other plugins load as usual.
* **observer** hooks tell plugins that something happened. Every implementation is called,
  in its own ``try``: a failure is logged with the plugin's name and never stops the job or
  the daemon. Their return values are ignored.

Every hook is documented in ``docs/hooks.md``; a test fails when one is not, or has no test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pluggy

PROJECT_NAME = "rtauto"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@hookspec(historic=True)
def rtauto_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Called when a plugin is registered, so it can declare hook specifications of its own.

    Implement it as ``pluginmanager.add_hookspecs(my_specs_module)``; other plugins may then
    implement those hooks (the plan_check plugin declares ``plan_check_register_checks``).

    Historic. Result: ignored. Errors: provider rule.
    """


@hookspec(historic=True)
def rtauto_configure(settings: Any) -> None:
    """Called once after the plugin manager is built, with the daemon's settings.

    ``settings`` is a :class:`rtauto.config.Settings`; a plugin reads its own block from
    ``settings.plugins[<plugin name>]`` and should validate it here, raising
    :class:`rtauto.errors.ConfigError` with a clear message when it is invalid.

    Historic: a plugin registered later is called too. Result: ignored.
    Errors: a ``ConfigError`` is reported with the plugin's name and the plugin is disabled;
    the daemon goes on without it.
    """


# --------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------


@hookspec
def rtauto_register_steps(register: Callable[[Any], None]) -> None:
    """Register step types: call ``register(StepType(...))`` once per type.

    Called when a plugin manager is built: in the daemon (to validate workflows) and in every
    worker process (to run steps). ``register`` raises ``PluginError`` for a duplicate name.

    Result: ignored. Errors: provider rule (the plugin's step types are dropped, reported by
    plugin name; other plugins load).
    """


@hookspec
def rtauto_register_destinations(register: Callable[[Any], None]) -> None:
    """Register destination types: call ``register(DestinationType(...))`` once per type.

    A destination type has a ``name`` (what ``type:`` says in a destination block), a pydantic
    ``config`` model and ``send(destination, artifacts)``. Built-ins: ``dicom``, ``folder``.

    Result: ignored. Errors: provider rule.
    """


@hookspec
def rtauto_register_model_backends(register: Callable[[Any], None]) -> None:
    """Register inference backends for model cards: ``register(name, loader)``.

    ``name`` is what a model card's ``backend:`` names (e.g. ``onnx``); ``loader(card, path)``
    returns an object with ``predict(array)``. Used by the autocontour plugin.

    Result: ignored. Errors: provider rule.
    """


# --------------------------------------------------------------------------------------------
# observers
# --------------------------------------------------------------------------------------------


@hookspec
def rtauto_series_complete(series: Mapping[str, Any]) -> None:
    """Called in the daemon when a series is declared complete (quiet period passed).

    ``series`` holds ``series_instance_uid``, ``study_instance_uid``, ``modality``,
    ``instance_count``, ``source`` and the matched ``attributes``.

    Result: ignored. Errors: observer rule (logged with the plugin's name, swallowed).
    """


@hookspec
def rtauto_job_started(job: Mapping[str, Any]) -> None:
    """Called when a job's first step is about to run.

    ``job`` holds ``id``, ``workflow``, ``workflow_hash``, ``study_instance_uid``,
    ``series_instance_uid`` (None for study jobs) and ``status``.

    Result: ignored. Errors: observer rule.
    """


@hookspec
def rtauto_step_finished(job: Mapping[str, Any], step: Mapping[str, Any]) -> None:
    """Called after a step of ``job`` ends (ok, fail, or skipped) and its state is stored.

    ``step`` holds ``id``, ``uses``, ``status``, ``attempts``, ``outputs``, ``error`` and
    ``artifacts`` (list of paths).

    Result: ignored. Errors: observer rule.
    """


@hookspec
def rtauto_job_finished(job: Mapping[str, Any]) -> None:
    """Called after a job ends (``status`` is ``ok`` or ``fail``) and its state is stored.

    Result: ignored. Errors: observer rule.
    """


PROVIDER_HOOKS = (
    "rtauto_addhooks",
    "rtauto_configure",
    "rtauto_register_steps",
    "rtauto_register_destinations",
    "rtauto_register_model_backends",
)
OBSERVER_HOOKS = (
    "rtauto_series_complete",
    "rtauto_job_started",
    "rtauto_step_finished",
    "rtauto_job_finished",
)
