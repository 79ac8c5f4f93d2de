"""Building the plugin manager: built-ins and entry-point plugins through one path."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from rtauto import __version__
from rtauto.destinations import DestinationType
from rtauto.errors import PluginError
from rtauto.hooks import specs
from rtauto.steps import StepType

log = logging.getLogger("rtauto.plugins")

ENTRY_POINT_GROUP = "rtauto"
DISABLE_AUTOLOAD_ENV = "RTAUTO_DISABLE_PLUGIN_AUTOLOAD"

# Core plugins shipped inside the rtauto package; registered through the same path as
# entry points, and blockable by name like any other plugin.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (("route", "rtauto.route.plugin"),)


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin, as ``rtauto plugins`` shows it."""

    name: str
    module: str
    version: str
    distribution: str | None
    builtin: bool
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class RegisteredStep:
    step_type: StepType
    plugin: str
    plugin_version: str


@dataclass
class PluginHost:
    """The plugin manager and what its plugins registered."""

    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # plugin name -> reason (traceback)
    steps: dict[str, RegisteredStep] = field(default_factory=dict)
    destination_types: dict[str, DestinationType] = field(default_factory=dict)
    model_backends: dict[str, Callable[..., Any]] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an observer hook: every implementation in its own try, failures logged."""
        if hook_name not in specs.OBSERVER_HOOKS:
            raise ValueError(f"{hook_name} is not an observer hook")
        caller = getattr(self.pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            try:
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception:
                log.exception("plugin %s failed in %s (ignored)", impl.plugin_name, hook_name)

    def fingerprint(self) -> str:
        """Changes when a plugin is installed, removed or upgraded (used to recycle workers)."""
        return plugin_fingerprint()


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def plugin_fingerprint() -> str:
    """Names, versions and file times of the installed rtauto plugins' distributions."""
    parts = []
    for ep in _entry_points():
        dist = ep.dist
        version = dist.version if dist is not None else "?"
        stamp = ""
        try:
            spec = importlib.util.find_spec(ep.module)  # type: ignore[attr-defined]
            if spec is not None and spec.origin and os.path.exists(spec.origin):
                stamp = str(os.stat(spec.origin).st_mtime_ns)
        except (ImportError, ValueError):
            stamp = "unimportable"
        parts.append(f"{ep.name}={ep.value}@{version}:{stamp}")
    return "|".join(parts)


def _register_module(
    host: PluginHost,
    name: str,
    target: str | ModuleType,
    *,
    version: str,
    distribution: str | None,
    builtin: bool,
) -> None:
    """Import and register one plugin; a failure is recorded by name and does not propagate."""
    try:
        module = importlib.import_module(target) if isinstance(target, str) else target
    except BaseException as exc:  # a plugin's import may raise anything, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        host.failures[name] = f"import of {target} failed:\n{traceback.format_exc()}"
        log.error("plugin %s could not be imported and is disabled: %s", name, exc)
        return
    try:
        host.pm.register(module, name=name)
    except Exception as exc:
        host.failures[name] = f"registration failed: {exc}"
        log.error("plugin %s could not be registered and is disabled: %s", name, exc)
        return
    host.plugins[name] = PluginInfo(
        name=name,
        module=module.__name__,
        version=version,
        distribution=distribution,
        builtin=builtin,
        hooks=tuple(sorted(impl.name for impl in host.pm.get_hookcallers(module) or [])),
    )


def _reject_unknown_hooks(host: PluginHost) -> None:
    """Unregister plugins that implement a hook no spec declares (a typo is an error)."""
    for name in list(host.plugins):
        plugin = host.pm.get_plugin(name)
        unknown = []
        for attr in dir(plugin):
            if not attr.startswith("rtauto_"):
                continue
            hook_caller = getattr(host.pm.hook, attr, None)
            if hook_caller is None or hook_caller.spec is None:
                unknown.append(attr)
        if unknown:
            host.pm.unregister(plugin)
            del host.plugins[name]
            host.failures[name] = "implements hooks that match no specification: " + ", ".join(
                sorted(unknown)
            )
            log.error("plugin %s is disabled: %s", name, host.failures[name])


def _call_provider(host: PluginHost, hook_name: str, make_register: Callable[[str], Any]) -> None:
    caller = getattr(host.pm.hook, hook_name)
    for impl in caller.get_hookimpls():
        register = make_register(impl.plugin_name)
        try:
            impl.function(register)
        except Exception as exc:
            host.failures.setdefault(impl.plugin_name, f"{hook_name} failed: {exc}")
            log.error("plugin %s failed in %s: %s", impl.plugin_name, hook_name, exc)


def _collect(host: PluginHost) -> None:
    def step_register(plugin: str) -> Callable[[StepType], None]:
        version = host.plugins[plugin].version if plugin in host.plugins else "?"

        def register(step_type: StepType) -> None:
            if not isinstance(step_type, StepType):
                raise PluginError(f"plugin {plugin} registered {step_type!r}, not a StepType")
            if step_type.name in host.steps:
                owner = host.steps[step_type.name].plugin
                raise PluginError(
                    f"plugin {plugin} registers step {step_type.name!r}, already "
                    f"registered by plugin {owner}"
                )
            host.steps[step_type.name] = RegisteredStep(step_type, plugin, version)

        return register

    def destination_register(plugin: str) -> Callable[[DestinationType], None]:
        def register(destination_type: DestinationType) -> None:
            if destination_type.name in host.destination_types:
                raise PluginError(
                    f"plugin {plugin} registers destination type {destination_type.name!r} twice"
                )
            host.destination_types[destination_type.name] = destination_type

        return register

    def backend_register(plugin: str) -> Callable[[str, Callable[..., Any]], None]:
        def register(name: str, loader: Callable[..., Any]) -> None:
            if name in host.model_backends:
                raise PluginError(f"plugin {plugin} registers model backend {name!r} twice")
            host.model_backends[name] = loader

        return register

    _call_provider(host, "rtauto_register_steps", step_register)
    _call_provider(host, "rtauto_register_destinations", destination_register)
    _call_provider(host, "rtauto_register_model_backends", backend_register)


def build_plugin_manager(
    settings: Any = None,
    *,
    autoload: bool = True,
    blocked: Iterable[str] = (),
    extra_plugins: Mapping[str, ModuleType | str] | None = None,
) -> PluginHost:
    """Build the one plugin manager of a process.

    Built-ins, then entry points of the ``rtauto`` group (unless ``autoload`` is false or the
    environment sets ``RTAUTO_DISABLE_PLUGIN_AUTOLOAD``), then ``extra_plugins`` (tests), all
    through the same registration path. Plugins named in ``blocked`` (or in
    ``settings.disabled_plugins``) are skipped. A plugin that fails to import, implements an
    unknown hook or fails in a provider hook is reported in ``host.failures`` by name; the
    others load.
    """
    pm = pluggy.PluginManager(specs.PROJECT_NAME)
    pm.add_hookspecs(specs)
    # each plugin registered from here on may add hook specifications of its own
    pm.hook.rtauto_addhooks.call_historic(kwargs={"pluginmanager": pm})
    host = PluginHost(pm=pm)
    blocked_names = set(blocked)
    if settings is not None:
        blocked_names |= set(getattr(settings, "disabled_plugins", ()) or ())

    for name, module_path in BUILTIN_PLUGINS:
        if name not in blocked_names:
            _register_module(
                host, name, module_path, version=__version__, distribution="rtauto", builtin=True
            )

    if autoload and not os.environ.get(DISABLE_AUTOLOAD_ENV):
        for ep in _entry_points():
            if ep.name in blocked_names or ep.name in host.plugins:
                continue
            dist = ep.dist
            _register_module(
                host,
                ep.name,
                ep.value.split(":")[0],
                version=dist.version if dist is not None else "?",
                distribution=dist.metadata["Name"] if dist is not None else None,
                builtin=False,
            )

    for name, target in (extra_plugins or {}).items():
        if name not in blocked_names:
            _register_module(host, name, target, version="0", distribution=None, builtin=False)

    _reject_unknown_hooks(host)
    if settings is not None:
        for impl in pm.hook.rtauto_configure.get_hookimpls():
            try:
                impl.function(settings=settings)
            except Exception as exc:
                host.failures[impl.plugin_name] = f"configuration refused: {exc}"
                log.error("plugin %s refused its configuration: %s", impl.plugin_name, exc)
                pm.unregister(name=impl.plugin_name)
                host.plugins.pop(impl.plugin_name, None)
    _collect(host)
    return host
