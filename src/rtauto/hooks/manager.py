"""Building the plugin manager: built-ins and entry-point plugins through one path."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
from pydantic import BaseModel

from rtauto import __version__
from rtauto.destinations import DestinationType
from rtauto.errors import ConfigError, PluginError
from rtauto.hooks import specs
from rtauto.steps import StepType

log = logging.getLogger("rtauto.plugins")

ENTRY_POINT_GROUP = "rtauto"
DISABLE_AUTOLOAD_ENV = "RTAUTO_DISABLE_PLUGIN_AUTOLOAD"

# Core plugins shipped inside the rtauto package; registered through the same path as
# entry points, and blockable by name like any other plugin.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (("route", "rtauto.route.plugin"),)

# rtauto calls these itself, one implementation at a time, so wrappers cannot apply to them.
_DIRECTLY_CALLED_HOOKS = frozenset(specs.PROVIDER_HOOKS) | frozenset(specs.OBSERVER_HOOKS)


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
    """A step type with the plugin that registered it (recorded in each artifact's provenance)."""

    step_type: StepType
    plugin: str
    plugin_version: str


def failure_summary(reason: str) -> str:
    """The first line of a plugin failure's reason: what failed and the exception (with the
    file and line of a syntax error); the traceback follows it in ``host.failures``."""
    lines = reason.strip().splitlines()
    return lines[0] if lines else reason


class StepTypes(dict[str, RegisteredStep]):
    """The registered step types by name, and (``failed``) the plugins that could not load
    with their reasons: a workflow naming a step type of one is told why it is missing."""

    def __init__(self, *args: Any, failed: Mapping[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.failed: Mapping[str, str] = failed if failed is not None else {}

    def failure_of(self, step_type: str) -> tuple[str, str] | None:
        """The plugin named by ``step_type``'s prefix and the first line of its reason
        (:func:`failure_summary`), when it failed to load."""
        plugin = step_type.partition(".")[0]
        reason = self.failed.get(plugin)
        return (plugin, failure_summary(reason)) if reason else None


@dataclass
class PluginHost:
    """The plugin manager and what its plugins registered.

    ``plugins`` lists the loaded plugins in plugin order (built-ins, then entry points by name,
    then extra plugins); ``failures`` maps the name of every plugin that was disabled to the
    reason, with the original traceback where there is one.
    """

    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    steps: StepTypes = field(default_factory=StepTypes)
    destination_types: dict[str, DestinationType] = field(default_factory=dict)
    model_backends: dict[str, Callable[..., Any]] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an observer hook: every implementation, in plugin order, in its own ``try``.

        A failing implementation is logged with its plugin's name and the traceback; the others
        are still called and nothing propagates. Raises ``ValueError`` for a hook that is not an
        observer and ``TypeError`` when ``kwargs`` do not match the hook's arguments (a bug of
        the caller, not of a plugin).
        """
        if hook_name not in specs.OBSERVER_HOOKS:
            raise ValueError(f"{hook_name} is not an observer hook")
        caller = getattr(self.pm.hook, hook_name)
        expected = set(caller.spec.argnames)
        if set(kwargs) != expected:
            raise TypeError(
                f"{hook_name} takes {sorted(expected)}, it was called with {sorted(kwargs)}"
            )
        for impl in _in_plugin_order(self, caller.get_hookimpls()):
            try:
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception:
                log.exception("plugin %s failed in %s (ignored)", impl.plugin_name, hook_name)

    def fingerprint(self) -> str:
        """Changes when a plugin is installed, removed or upgraded (used to recycle workers)."""
        return plugin_fingerprint()


def _in_plugin_order(host: PluginHost, impls: Iterable[Any]) -> list[Any]:
    order = {name: index for index, name in enumerate(host.plugins)}
    return sorted(impls, key=lambda impl: order.get(impl.plugin_name, len(order)))


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _source_stamp(module_name: str) -> str:
    """Names, sizes and modification times of a module's source files (a package's: all)."""
    try:
        # find_spec imports the parent packages of a dotted name, which may raise anything
        spec = importlib.util.find_spec(module_name)
    except Exception:
        return "unimportable"
    if spec is None:
        return "missing"
    files: list[Path] = []
    if spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            files.extend(sorted(Path(location).rglob("*.py")))
    elif spec.origin and os.path.isfile(spec.origin):
        files.append(Path(spec.origin))
    digest = hashlib.sha256()
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def plugin_fingerprint(site_modules: Iterable[str] = ()) -> str:
    """A digest of the installed ``rtauto`` entry points: names, targets, distribution versions,
    and the size and modification time of each plugin module's source files; plus the source
    files of the site plugins named in ``site_modules`` (``settings.plugin_modules`` values).

    It changes when a plugin is installed, removed or upgraded, and when a plugin's source
    file is edited in place (editable installs), so long-lived worker processes can be recycled.
    """
    parts = []
    for ep in _entry_points():
        version = ep.dist.version if ep.dist is not None else "?"
        parts.append(f"{ep.name}={ep.value}@{version}:{_source_stamp(ep.module)}")
    for target in sorted(site_modules):
        module = target.partition(":")[0]
        parts.append(f"site:{target}:{_source_stamp(module)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def forget_plugin_modules(site_modules: Iterable[str] = ()) -> list[str]:
    """Drop the imported modules of the installed plugins (the package of each ``rtauto``
    entry point, and of each site module in ``site_modules``) from ``sys.modules``, so that
    the next :func:`build_plugin_manager` imports the code now on disk: an upgrade's new step
    types, and a broken upgrade's import error, instead of the first version imported.

    rtauto's own modules and the libraries plugins import (NumPy, PyTorch, ...) stay loaded.
    Returns the names dropped.
    """
    packages = {ep.module.partition(".")[0] for ep in _entry_points()}
    packages |= {target.partition(":")[0].partition(".")[0] for target in site_modules}
    packages -= {"rtauto", *sys.stdlib_module_names}
    dropped = [name for name in list(sys.modules) if name.partition(".")[0] in packages]
    for name in dropped:
        del sys.modules[name]
    importlib.invalidate_caches()
    return dropped


@dataclass
class _Candidate:
    """A plugin to load: where it comes from and how ``rtauto plugins`` describes it."""

    name: str
    load: Callable[[], object]
    version: str
    distribution: str | None
    builtin: bool
    source: str
    plugin: object = None


def _import_target(target: str | object) -> Callable[[], object]:
    """A loader for ``"module"``, ``"module:attribute"`` or an already imported object."""
    if not isinstance(target, str):
        return lambda: target

    def load() -> object:
        module_name, _, attribute = target.partition(":")
        found: object = importlib.import_module(module_name)
        for part in filter(None, attribute.split(".")):
            found = getattr(found, part)
        return found

    return load


def _describe(plugin: object) -> str:
    """The plugin's module (or class, or instance's class) name."""
    name = getattr(plugin, "__name__", None)
    return str(name) if name else f"{type(plugin).__module__}.{type(plugin).__qualname__}"


def _disable(host: PluginHost, name: str, reason: str) -> None:
    """Take a plugin out: unregistered, forgotten, reported in ``host.failures``."""
    if host.pm.get_plugin(name) is not None:
        host.pm.unregister(name=name)
    host.plugins.pop(name, None)
    host.failures[name] = reason
    log.error("plugin %s is disabled: %s", name, reason)


def _load(host: PluginHost, candidate: _Candidate) -> bool:
    """Import one plugin; a failure is recorded by name with its traceback, never raised."""
    try:
        candidate.plugin = candidate.load()
    except BaseException as exc:  # a plugin's import may raise anything, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        host.failures[candidate.name] = f"import failed: {exc!r}\n{traceback.format_exc().rstrip()}"
        log.error("plugin %s could not be imported and is disabled: %r", candidate.name, exc)
        return False
    if candidate.plugin is None:
        host.failures[candidate.name] = "the entry point resolves to None"
        log.error("plugin %s is disabled: its entry point resolves to None", candidate.name)
        return False
    return True


def _register(host: PluginHost, candidate: _Candidate) -> None:
    """Register one imported plugin; a failure is recorded by name and does not propagate."""
    try:
        host.pm.register(candidate.plugin, name=candidate.name)
    except Exception as exc:
        # a raising rtauto_addhooks leaves the plugin half registered in pluggy
        _disable(host, candidate.name, f"registration failed: {exc}")
        return
    version = candidate.version
    if candidate.distribution is None:
        version = str(getattr(candidate.plugin, "__version__", version))
    host.plugins[candidate.name] = PluginInfo(
        name=candidate.name,
        module=_describe(candidate.plugin),
        version=version,
        distribution=candidate.distribution,
        builtin=candidate.builtin,
        hooks=tuple(sorted(c.name for c in host.pm.get_hookcallers(candidate.plugin) or [])),
    )


def _hook_problems(host: PluginHost, name: str) -> list[str]:
    """What is wrong with a registered plugin's hook implementations (empty when nothing)."""
    plugin = host.pm.get_plugin(name)
    problems = []
    for caller in host.pm.get_hookcallers(plugin) or []:
        impls = [impl for impl in caller.get_hookimpls() if impl.plugin is plugin]
        if caller.spec is None and not all(impl.optionalhook for impl in impls):
            problems.append(f"{caller.name} matches no hook specification")
        elif caller.name in _DIRECTLY_CALLED_HOOKS and any(
            impl.wrapper or impl.hookwrapper for impl in impls
        ):
            problems.append(f"{caller.name} cannot be implemented as a wrapper")
    # a function named like a hook but not marked would be silently ignored by pluggy
    for attribute in dir(plugin):
        if not attribute.startswith(specs.PROJECT_NAME + "_"):
            continue
        if host.pm.parse_hookimpl_opts(plugin, attribute) is not None:
            continue
        value = inspect.getattr_static(plugin, attribute, None)
        if not (callable(value) or isinstance(value, staticmethod | classmethod)):
            continue
        if getattr(host.pm.hook, attribute, None) is None:
            problems.append(f"{attribute} matches no hook specification")
        else:
            problems.append(f"{attribute} is not marked with @rtauto.hookimpl")
    return problems


def _traceback_unless_expected(exc: Exception) -> str:
    """The traceback of an unexpected error; nothing for the errors plugins raise on purpose."""
    if isinstance(exc, ConfigError | PluginError):
        return ""
    return "\n" + traceback.format_exc().rstrip()


def _configure(host: PluginHost, settings: Any) -> None:
    """Call ``rtauto_configure`` of each plugin; a plugin that raises is disabled."""
    for impl in _in_plugin_order(host, host.pm.hook.rtauto_configure.get_hookimpls()):
        try:
            impl.function(**{"settings": settings} if impl.argnames else {})
        except Exception as exc:
            reason = f"configuration refused: {exc}{_traceback_unless_expected(exc)}"
            _disable(host, impl.plugin_name, reason)


_STEPS = "rtauto_register_steps"
_DESTINATIONS = "rtauto_register_destinations"
_BACKENDS = "rtauto_register_model_backends"
_WHAT = {_STEPS: "step", _DESTINATIONS: "destination type", _BACKENDS: "model backend"}

# what the provider hooks registered: key -> (plugin name, registered object)
_Owners = dict[str, tuple[str, Any]]


_STEP_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+")


def _make_register(
    hook_name: str,
    plugin: str,
    committed: _Owners,
    staged: _Owners,
    plugins: frozenset[str] = frozenset(),
) -> Callable[..., None]:
    """The ``register`` callback one plugin gets in one provider hook (``plugins``: the names
    of all loaded plugins, whose step name prefixes are theirs)."""
    what = _WHAT[hook_name]

    def claim(key: str, value: Any) -> None:
        for table in (committed, staged):
            if key in table:
                raise PluginError(
                    f"plugin {plugin} registers {what} {key!r}, already registered by "
                    f"plugin {table[key][0]}"
                )
        staged[key] = (plugin, value)

    def register_step(step_type: StepType) -> None:
        if not isinstance(step_type, StepType):
            raise PluginError(f"plugin {plugin} registered {step_type!r}, not a StepType")
        params = step_type.params
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise PluginError(
                f"step {step_type.name!r} of plugin {plugin}: params must be a pydantic model "
                f"class, not {params!r}"
            )
        name = step_type.name
        if not isinstance(name, str) or not _STEP_NAME.fullmatch(name):
            raise PluginError(
                f"plugin {plugin} registers step {name!r}: a step name is PLUGIN.VERB (letters, "
                "digits, _ and -, parts joined by dots), or no workflow could name it"
            )
        prefix = name.partition(".")[0]
        if prefix != plugin and prefix in plugins:
            raise PluginError(
                f"plugin {plugin} registers step {name!r} under plugin {prefix}'s name: a "
                f"step name starts with its own plugin's name ({plugin}.)"
            )
        claim(name, step_type)

    def register_destination(destination_type: DestinationType) -> None:
        if not isinstance(destination_type, DestinationType):
            raise PluginError(
                f"plugin {plugin} registered {destination_type!r}, not a DestinationType"
            )
        claim(destination_type.name, destination_type)

    def register_backend(name: str, loader: Callable[..., Any]) -> None:
        if not callable(loader):
            raise PluginError(
                f"plugin {plugin}: the loader of model backend {name!r} is not callable"
            )
        claim(name, loader)

    return {
        _STEPS: register_step,
        _DESTINATIONS: register_destination,
        _BACKENDS: register_backend,
    }[hook_name]


def _version_of(host: PluginHost, plugin: str) -> str:
    info = host.plugins.get(plugin)
    return info.version if info is not None else "?"


def _collect(host: PluginHost) -> None:
    """Call the provider hooks, in plugin order.

    What one implementation registers counts only if it returns; a plugin that raises in any
    provider hook is disabled and everything it registered, in every provider hook, is dropped.
    """
    owners: dict[str, _Owners] = {hook_name: {} for hook_name in _WHAT}
    failed: dict[str, str] = {}
    for hook_name, committed in owners.items():
        caller = getattr(host.pm.hook, hook_name)
        for impl in _in_plugin_order(host, caller.get_hookimpls()):
            if impl.plugin_name in failed:
                continue
            staged: _Owners = {}
            register = _make_register(
                hook_name, impl.plugin_name, committed, staged, frozenset(host.plugins)
            )
            try:
                impl.function(**{"register": register} if impl.argnames else {})
            except Exception as exc:
                failed[impl.plugin_name] = (
                    f"{hook_name} failed: {exc}{_traceback_unless_expected(exc)}"
                )
                continue
            committed.update(staged)

    def kept(hook_name: str) -> _Owners:
        return {key: entry for key, entry in owners[hook_name].items() if entry[0] not in failed}

    host.steps = StepTypes(
        {
            name: RegisteredStep(step_type, plugin, _version_of(host, plugin))
            for name, (plugin, step_type) in kept(_STEPS).items()
        },
        failed=host.failures,
    )
    host.destination_types = {name: dest for name, (_, dest) in kept(_DESTINATIONS).items()}
    host.model_backends = {name: loader for name, (_, loader) in kept(_BACKENDS).items()}
    for name, reason in failed.items():
        _disable(host, name, reason)


def build_plugin_manager(
    settings: Any = None,
    *,
    autoload: bool = True,
    blocked: Iterable[str] = (),
    extra_plugins: Mapping[str, ModuleType | str | object] | None = None,
) -> PluginHost:
    """Build the one plugin manager of a process.

    Plugins, in plugin order: the built-ins, then the entry points of the ``rtauto`` group
    sorted by name (unless ``autoload`` is false or the environment variable
    ``RTAUTO_DISABLE_PLUGIN_AUTOLOAD`` is set to a non-empty value), then the site plugins of
    ``settings.plugin_modules`` (name -> importable module, not packaged), then ``extra_plugins``
    (name -> module, ``"module[:attribute]"`` or object; used by tests). All go through the
    same path: import, register, check the hook names, configure, call the provider hooks.
    Plugins named in ``blocked`` or ``settings.disabled_plugins`` are skipped.

    A plugin that fails to import, implements a hook no specification declares, refuses its
    configuration (``rtauto_configure`` raises) or raises in a provider hook is disabled and
    reported in ``host.failures`` by name; the others load. ``rtauto_configure`` is called only
    when ``settings`` is given. Never raises because of a plugin.
    """
    pm = pluggy.PluginManager(specs.PROJECT_NAME)
    pm.add_hookspecs(specs)
    # each plugin registered from here on may add hook specifications of its own
    pm.hook.rtauto_addhooks.call_historic(kwargs={"pluginmanager": pm})
    host = PluginHost(pm=pm)
    blocked_names = set(blocked)
    if settings is not None:
        blocked_names |= set(getattr(settings, "disabled_plugins", ()) or ())

    candidates: list[_Candidate] = [
        _Candidate(name, _import_target(path), __version__, "rtauto", True, source=path)
        for name, path in BUILTIN_PLUGINS
    ]
    if autoload and not os.environ.get(DISABLE_AUTOLOAD_ENV):
        for ep in _entry_points():
            dist = ep.dist
            candidates.append(
                _Candidate(
                    ep.name,
                    ep.load,
                    dist.version if dist is not None else "?",
                    dist.name if dist is not None else None,
                    builtin=False,
                    source=ep.value,
                )
            )
    site_modules = dict(getattr(settings, "plugin_modules", None) or {})
    for name, target in {**site_modules, **(extra_plugins or {})}.items():
        source = target if isinstance(target, str) else _describe(target)
        candidates.append(_Candidate(name, _import_target(target), "0", None, False, source))

    seen: dict[str, _Candidate] = {}
    loaded: list[_Candidate] = []
    for candidate in candidates:
        if candidate.name in blocked_names:
            log.info("plugin %s is blocked by the configuration", candidate.name)
            continue
        first = seen.setdefault(candidate.name, candidate)
        if first is not candidate:
            if first.source != candidate.source:  # the same plugin declared twice is harmless
                host.failures[f"{candidate.name} (duplicate)"] = (
                    f"{candidate.source} is not loaded: plugin {candidate.name} is {first.source}"
                )
                log.error("two plugins are named %s; only the first is loaded", candidate.name)
            continue
        if _load(host, candidate):
            loaded.append(candidate)

    # plugins that declare hook specs first, so a bad implementation of such a spec is blamed
    # on its implementer, not on the declaring plugin
    declaring = [c for c in loaded if hasattr(c.plugin, "rtauto_addhooks")]
    for candidate in declaring + [c for c in loaded if c.name not in {d.name for d in declaring}]:
        _register(host, candidate)
    order = [c.name for c in loaded]
    host.plugins = {name: host.plugins[name] for name in order if name in host.plugins}

    for name in list(host.plugins):
        problems = _hook_problems(host, name)
        if problems:
            _disable(host, name, "; ".join(problems))
    if settings is not None:
        _configure(host, settings)
    _collect(host)
    return host
