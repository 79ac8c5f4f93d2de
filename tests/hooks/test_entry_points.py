"""Plugin discovery through the ``rtauto`` entry-point group, with real distributions."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

import pytest

from rtauto.config import Settings
from rtauto.hooks import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, build_plugin_manager
from rtauto.hooks import manager as manager_module
from rtauto.steps import NoParams

HELLO_PLUGIN = """
from rtauto import StepType, hookimpl

def hello(ctx, params):
    return {"greeting": "hello from the fake plugin"}

@hookimpl
def rtauto_register_steps(register):
    register(StepType(name="fake.hello", run=hello, outputs={"greeting": "a greeting"}))
"""


def entry_point_names() -> set[str]:
    return {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def test_entry_point_plugin_is_discovered_and_registers_its_steps(fake_site):
    fake_site.install(
        "fakeplugin", "1.0", {"fakeplugin": "fakeplugin_mod"}, {"fakeplugin_mod.py": HELLO_PLUGIN}
    )
    assert "fakeplugin" in entry_point_names()

    host = build_plugin_manager()

    info = host.plugins["fakeplugin"]
    assert (info.module, info.version, info.distribution, info.builtin) == (
        "fakeplugin_mod",
        "1.0",
        "fakeplugin",
        False,
    )
    assert info.hooks == ("rtauto_register_steps",)
    registered = host.steps["fake.hello"]
    assert (registered.plugin, registered.plugin_version) == ("fakeplugin", "1.0")
    assert registered.step_type.params is NoParams
    assert registered.step_type.run(None, NoParams()) == {"greeting": "hello from the fake plugin"}
    assert "fakeplugin" not in host.failures


def test_the_fake_site_leaves_nothing_behind(site_factory, tmp_path):
    with site_factory(tmp_path / "site") as site:
        site.install(
            "fakeplugin",
            "1.0",
            {"fakeplugin": "fakeplugin_mod"},
            {"fakeplugin_mod.py": HELLO_PLUGIN},
        )
        assert "fakeplugin" in build_plugin_manager().plugins
        assert "fakeplugin_mod" in sys.modules

    assert str(tmp_path / "site") not in sys.path
    assert "fakeplugin_mod" not in sys.modules
    assert importlib.util.find_spec("fakeplugin_mod") is None
    assert "fakeplugin" not in entry_point_names()
    assert "fakeplugin" not in build_plugin_manager().plugins


def test_entry_point_may_name_an_object_inside_a_module(fake_site):
    fake_site.install(
        "objplugin",
        "2.3",
        {"objplugin": "objplugin_mod:plugin"},
        {
            "objplugin_mod.py": """
            from rtauto import StepType, hookimpl

            class ObjectPlugin:
                @hookimpl
                def rtauto_register_steps(self, register):
                    register(StepType(name="obj.step", run=lambda ctx, params: None))

            plugin = ObjectPlugin()
            """
        },
    )
    host = build_plugin_manager()
    assert host.plugins["objplugin"].module == "objplugin_mod.ObjectPlugin"
    assert host.steps["obj.step"].plugin_version == "2.3"


def test_builtins_go_through_the_same_path_as_entry_points(fake_site, monkeypatch):
    fake_site.write(
        "builtin_steps_mod.py",
        """
        from rtauto import StepType, hookimpl

        @hookimpl
        def rtauto_register_steps(register):
            register(StepType(name="shared.step", run=lambda ctx, params: {"by": "builtin"}))
        """,
    )
    fake_site.write("builtin_broken_mod.py", "raise ImportError('a built-in that cannot load')\n")
    monkeypatch.setattr(
        manager_module,
        "BUILTIN_PLUGINS",
        (("core_steps", "builtin_steps_mod"), ("core_broken", "builtin_broken_mod")),
    )
    fake_site.install(
        "vendor",
        "0.5",
        {"vendor": "vendor_mod"},
        {
            "vendor_mod.py": """
            from rtauto import StepType, hookimpl

            @hookimpl
            def rtauto_register_steps(register):
                register(StepType(name="shared.step", run=lambda ctx, params: {"by": "vendor"}))
            """
        },
    )

    host = build_plugin_manager()

    assert host.plugins["core_steps"].builtin is True
    assert host.plugins["core_steps"].distribution == "rtauto"
    # built-ins come first in plugin order, so the built-in keeps its step name
    assert list(host.plugins).index("core_steps") == 0
    assert host.steps["shared.step"].plugin == "core_steps"
    assert "already registered by plugin core_steps" in host.failures["vendor"]
    # a broken built-in is reported like a broken entry point, with its traceback
    assert "a built-in that cannot load" in host.failures["core_broken"]
    assert "builtin_broken_mod.py" in host.failures["core_broken"]

    blocked = build_plugin_manager(blocked=["core_steps"])
    assert "core_steps" not in blocked.plugins
    assert blocked.steps["shared.step"].plugin == "vendor"


def test_the_route_builtin_is_loaded_without_autoload():
    host = build_plugin_manager(autoload=False)
    assert host.plugins["route"].builtin is True
    assert host.plugins["route"].module == "rtauto.route.plugin"
    assert "route" not in build_plugin_manager(autoload=False, blocked=["route"]).plugins


BROKEN_PLUGINS = {
    "runtime": (
        "def _connect():\n    raise RuntimeError('licence server unreachable')\n\n_connect()\n"
    ),
    "missing_dependency": "import rtauto_no_such_dependency_xyz\n",
    "syntax": "def broken(:\n    pass\n",
    "system_exit": "import sys\nsys.exit('plugin called sys.exit at import')\n",
}


@pytest.mark.parametrize("kind", sorted(BROKEN_PLUGINS))
def test_plugin_that_fails_to_import_is_reported_and_others_load(fake_site, kind):
    fake_site.install(
        "mixed",
        "3.0",
        {"broken": "broken_mod", "good": "good_mod"},
        {"broken_mod.py": BROKEN_PLUGINS[kind], "good_mod.py": HELLO_PLUGIN},
    )

    host = build_plugin_manager()

    assert "broken" not in host.plugins
    reason = host.failures["broken"]
    assert reason.startswith("import failed")
    assert "Traceback (most recent call last)" in reason
    assert str(fake_site.root / "broken_mod.py") in reason  # the original traceback
    assert "good" in host.plugins
    assert host.steps["fake.hello"].plugin == "good"


def test_original_traceback_shows_the_failing_line(fake_site):
    fake_site.install(
        "broken", "1.0", {"broken": "broken_mod"}, {"broken_mod.py": BROKEN_PLUGINS["runtime"]}
    )
    reason = build_plugin_manager().failures["broken"]
    assert "raise RuntimeError('licence server unreachable')" in reason
    assert "in _connect" in reason
    assert reason.rstrip().endswith("RuntimeError: licence server unreachable")


def test_autoload_can_be_disabled_by_environment(fake_site, monkeypatch):
    fake_site.install(
        "fakeplugin", "1.0", {"fakeplugin": "fakeplugin_mod"}, {"fakeplugin_mod.py": HELLO_PLUGIN}
    )
    fake_site.write("extra_mod.py", HELLO_PLUGIN.replace("fake.hello", "extra.hello"))
    assert "fakeplugin" in build_plugin_manager().plugins

    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    host = build_plugin_manager(extra_plugins={"extra": "extra_mod"})

    assert "fakeplugin" not in host.plugins
    assert "fake.hello" not in host.steps
    assert "route" in host.plugins  # built-ins do not depend on autoload
    assert host.steps["extra.hello"].plugin == "extra"  # explicit plugins still load


def test_autoload_argument_false_skips_entry_points(fake_site):
    fake_site.install(
        "fakeplugin", "1.0", {"fakeplugin": "fakeplugin_mod"}, {"fakeplugin_mod.py": HELLO_PLUGIN}
    )
    assert "fakeplugin" not in build_plugin_manager(autoload=False).plugins


@pytest.mark.parametrize("how", ["settings", "argument"])
def test_blocked_plugin_is_never_imported(fake_site, how):
    fake_site.install(
        "mixed",
        "1.0",
        {"blockme": "blockme_mod", "good": "good_mod"},
        {
            "blockme_mod.py": "raise RuntimeError('a blocked plugin must not be imported')\n",
            "good_mod.py": HELLO_PLUGIN,
        },
    )
    if how == "settings":
        host = build_plugin_manager(Settings(disabled_plugins=["blockme"]))
    else:
        host = build_plugin_manager(blocked=["blockme"])

    assert "blockme" not in host.plugins
    assert "blockme" not in host.failures
    assert "blockme_mod" not in sys.modules
    assert "good" in host.plugins


def test_an_entry_point_cannot_take_a_builtin_name(fake_site):
    fake_site.install(
        "impostor", "1.0", {"route": "impostor_mod"}, {"impostor_mod.py": HELLO_PLUGIN}
    )
    host = build_plugin_manager()
    assert host.plugins["route"].module == "rtauto.route.plugin"
    assert "impostor_mod" in host.failures["route (duplicate)"]
    assert "fake.hello" not in host.steps


def test_plugin_version_and_distribution_are_recorded(fake_site):
    fake_site.install(
        "rtauto-vendor-thing",
        "4.2.1",
        {"thing": "thing_mod"},
        {"thing_mod.py": HELLO_PLUGIN.replace("fake.hello", "thing.hello")},
    )
    host = build_plugin_manager()
    assert host.plugins["thing"].distribution == "rtauto-vendor-thing"
    assert host.steps["thing.hello"].plugin_version == "4.2.1"


def test_extra_plugin_version_comes_from_the_module(tmp_path, monkeypatch):
    module_path = tmp_path / "versioned_mod.py"
    module_path.write_text("__version__ = '7.1'\n" + HELLO_PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        host = build_plugin_manager(autoload=False, extra_plugins={"versioned": "versioned_mod"})
        assert host.plugins["versioned"].version == "7.1"
        assert host.steps["fake.hello"].plugin_version == "7.1"
    finally:
        sys.modules.pop("versioned_mod", None)


def test_site_plugins_from_the_configuration_load_through_the_same_path(fake_site, monkeypatch):
    fake_site.write("site_checks_mod.py", HELLO_PLUGIN.replace("fake.hello", "site.hello"))
    fake_site.write("site_broken_mod.py", "raise RuntimeError('site plugin broken')\n")
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")  # site plugins are named, not discovered
    settings = Settings(
        plugin_modules={"site_checks": "site_checks_mod", "site_broken": "site_broken_mod"}
    )

    host = build_plugin_manager(settings)

    info = host.plugins["site_checks"]
    assert (info.builtin, info.distribution, info.module) == (False, None, "site_checks_mod")
    assert host.steps["site.hello"].plugin == "site_checks"
    assert "site plugin broken" in host.failures["site_broken"]
    assert "Traceback" in host.failures["site_broken"]
    blocked = Settings(plugin_modules=settings.plugin_modules, disabled_plugins=["site_checks"])
    assert "site_checks" not in build_plugin_manager(blocked).plugins
