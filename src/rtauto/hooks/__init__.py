"""rtauto's plugin system: hook specifications, the ``hookimpl`` marker, the plugin manager.

Quick start for a plugin author::

    # my_plugin.py, exposed in pyproject.toml as
    # [project.entry-points.rtauto]
    # my_plugin = "my_plugin"
    from rtauto import hookimpl, StepType

    @hookimpl
    def rtauto_register_steps(register):
        register(StepType(name="my_plugin.hello", run=lambda ctx, params: {"greeting": "hi"}))

Every hook, with when it is called and its error rule, is documented in ``docs/hooks.md``.
"""

import pluggy

hookimpl = pluggy.HookimplMarker("rtauto")

from rtauto.hooks.manager import (  # noqa: E402  (the marker must exist before plugins import)
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    PluginHost,
    PluginInfo,
    RegisteredStep,
    build_plugin_manager,
)

__all__ = [
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "PluginHost",
    "PluginInfo",
    "RegisteredStep",
    "build_plugin_manager",
    "hookimpl",
]
