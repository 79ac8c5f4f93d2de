"""rtauto's hook specifications.

Two kinds of hook, with two error rules (chosen per hook and stated in its docstring):

* **provider** hooks (and the two set-up hooks) are called while the plugin manager is built.
  Every implementation is called, in plugin order (built-ins, then entry points by name, then
  extra plugins); an implementation that raises disables its plugin: the plugin is reported in
  ``PluginHost.failures`` by name, everything it registered is dropped, the other plugins load
  as usual.
* **observer** hooks tell plugins that something happened (``PluginHost.notify``). Every
  implementation is called, in plugin order, in its own ``try``: a failure is logged with the
  plugin's name and never stops the job or the daemon. Their return values are ignored.

rtauto calls provider and observer hooks one implementation at a time, so they cannot be
implemented as wrappers (``wrapper=True`` / ``hookwrapper=True``); a plugin that tries is
disabled, as is one that implements a hook no specification declares.

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

    Implement it as ``pluginmanager.add_hookspecs(my_specs_module)``, where the module's
    specifications are marked with :data:`hookspec` (``pluggy.HookspecMarker("rtauto")``);
    other plugins may then implement those hooks (the plan_check plugin declares
    ``plan_check_register_checks``). The declaring plugin calls its hooks itself through
    ``pluginmanager.hook``. Plugins that implement this hook are registered before the others,
    so an implementation that does not fit a declared specification is blamed on its plugin.

    Historic: called for every plugin as it is registered. Result: ignored.
    Errors: the plugin is disabled (``registration failed: ...``).
    """


@hookspec(historic=True)
def rtauto_configure(settings: Any) -> None:
    """Called once after the plugin manager is built, with the daemon's settings.

    ``settings`` is a :class:`rtauto.config.Settings`; a plugin reads its own block from
    ``settings.plugins[<plugin name>]`` and should validate it here, raising
    :class:`rtauto.errors.ConfigError` with a clear message when it is invalid.

    Called only when the manager is built with settings (the daemon, workers, the CLI), after
    the hook names are checked and before the provider hooks. Historic in pluggy's terms; rtauto
    calls each implementation itself. Result: ignored.
    Errors: any exception disables the plugin; it is reported with the plugin's name and the
    message (a ``ConfigError`` without a traceback, so write an actionable message), and the
    daemon goes on without it.
    """


# --------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------


@hookspec
def rtauto_register_steps(register: Callable[[Any], None]) -> None:
    """Register step types: call ``register(StepType(...))`` once per type.

    Called when a plugin manager is built: in the daemon (to validate workflows) and in every
    worker process (to run steps). ``register`` raises ``PluginError`` for a name another
    plugin (or this one) already registered and for a ``params`` that is not a pydantic model
    class; left uncaught, that disables the registering plugin, and the first registration of
    the name stays.

    Result: ignored. Errors: provider rule (the plugin is disabled, all it registered dropped,
    reported by plugin name; other plugins load).
    """


@hookspec
def rtauto_register_destinations(register: Callable[[Any], None]) -> None:
    """Register destination types: call ``register(DestinationType(...))`` once per type.

    A destination type has a ``name`` (what ``type:`` says in a destination block), a pydantic
    ``config`` model and ``send(config, files)``. Built-ins: ``dicom``, ``folder``.
    ``register`` raises ``PluginError`` for a name already registered.

    Result: ignored. Errors: provider rule.
    """


@hookspec
def rtauto_register_model_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register inference backends for model cards: ``register(name, loader)``.

    ``name`` is what a model card's ``backend:`` names (e.g. ``onnx``); ``loader(card, path)``
    returns an object with ``predict(array)``. Used by the autocontour plugin.
    ``register`` raises ``PluginError`` for a name already registered or a loader that is not
    callable.

    Result: ignored. Errors: provider rule.
    """


@hookspec
def rtauto_add_commands(app: Any) -> None:
    """Add commands to the ``rtauto`` command line (e.g. the autocontour plugin's ``models``).

    ``app`` is the ``typer.Typer`` application: decorate functions with ``@app.command()``
    or add a group with ``app.add_typer(...)``. Called by the command line only, when the
    command asked for is not one of rtauto's own (or for ``--help``).

    Result: ignored. Errors: provider rule (reported on standard error, the plugin's commands
    are missing, rtauto's own commands work).
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
    """Called when a job's first step is about to run, and again when a failed job that was
    resumed (``rtauto resume``, the daemon's retry of dead letters) starts running again.

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

    A failed job that is resumed ends again: a second call, with its new ``status`` (an
    alert raised for its failure can be cleared on ``ok``).

    Result: ignored. Errors: observer rule.
    """


PROVIDER_HOOKS = (
    "rtauto_addhooks",
    "rtauto_configure",
    "rtauto_register_steps",
    "rtauto_register_destinations",
    "rtauto_register_model_backends",
    "rtauto_add_commands",
)
OBSERVER_HOOKS = (
    "rtauto_series_complete",
    "rtauto_job_started",
    "rtauto_step_finished",
    "rtauto_job_finished",
)
