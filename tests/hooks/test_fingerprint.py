"""plugin_fingerprint: changes when installed plugins or their source files change."""

from __future__ import annotations

import os
import sys

from rtauto.hooks import build_plugin_manager
from rtauto.hooks.manager import plugin_fingerprint

PLUGIN = """
from rtauto import StepType, hookimpl

@hookimpl
def rtauto_register_steps(register):
    register(StepType(name="fp.step", run=lambda ctx, params: None))
"""


def touch_later(path, seconds: int = 10) -> None:
    """Move the file's modification time forward, as an editor's save would."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


def test_fingerprint_is_stable_while_nothing_changes(fake_site):
    fake_site.install("fpplugin", "1.0", {"fpplugin": "fp_mod"}, {"fp_mod.py": PLUGIN})
    assert plugin_fingerprint() == plugin_fingerprint()
    assert build_plugin_manager(autoload=False).fingerprint() == plugin_fingerprint()


def test_fingerprint_changes_when_the_entry_point_module_changes(fake_site):
    fake_site.install("fpplugin", "1.0", {"fpplugin": "fp_mod"}, {"fp_mod.py": PLUGIN})
    before = plugin_fingerprint()

    module = fake_site.root / "fp_mod.py"
    module.write_text(module.read_text() + "\n# edited in place\n")
    touch_later(module)

    assert plugin_fingerprint() != before


def test_fingerprint_sees_a_change_of_same_size_by_its_time(fake_site):
    fake_site.install("fpplugin", "1.0", {"fpplugin": "fp_mod"}, {"fp_mod.py": PLUGIN})
    before = plugin_fingerprint()
    touch_later(fake_site.root / "fp_mod.py")
    assert plugin_fingerprint() != before


def test_fingerprint_changes_when_a_file_of_a_package_plugin_changes(fake_site):
    fake_site.install(
        "pkgplugin",
        "1.0",
        {"pkgplugin": "pkg_plugin"},
        {
            "pkg_plugin/__init__.py": "from pkg_plugin.steps import rtauto_register_steps\n",
            "pkg_plugin/steps.py": PLUGIN,
        },
    )
    before = plugin_fingerprint()
    touch_later(fake_site.root / "pkg_plugin" / "steps.py")
    assert plugin_fingerprint() != before


def test_fingerprint_changes_when_a_plugin_is_installed_upgraded_or_removed(fake_site):
    empty = plugin_fingerprint()
    fake_site.install("fpplugin", "1.0", {"fpplugin": "fp_mod"}, {"fp_mod.py": PLUGIN})
    installed = plugin_fingerprint()
    assert installed != empty

    fake_site.uninstall("fpplugin", "1.0")
    fake_site.install("fpplugin", "1.1", {"fpplugin": "fp_mod"}, {})
    upgraded = plugin_fingerprint()
    assert upgraded not in (empty, installed)

    fake_site.uninstall("fpplugin", "1.1")
    assert plugin_fingerprint() == empty


def test_a_plugin_upgraded_in_place_is_imported_afresh(fake_site):
    # forget_plugin_modules drops every installed plugin's modules (the daemon wants that);
    # this test process keeps the first-party plugins' module objects the other tests use
    kept = {n: m for n, m in sys.modules.items() if not n.startswith("up_pkg")}
    try:
        _upgrade_in_place(fake_site)
    finally:
        sys.modules.update(kept)


def _upgrade_in_place(fake_site):
    """What the daemon does when the fingerprint changes: forget the plugin's modules, then
    build the manager again; the upgrade's code, new step types and version are what load."""
    from rtauto.hooks.manager import forget_plugin_modules

    v1 = """
        from rtauto import StepType, hookimpl
        VERSION = 1

        @hookimpl
        def rtauto_register_steps(register):
            register(StepType(name="up.one", run=lambda ctx, params: None))
        """
    fake_site.install(
        "upplugin",
        "1.0",
        {"up": "up_pkg.plugin"},
        {"up_pkg/__init__.py": "", "up_pkg/plugin.py": v1},
    )
    host = build_plugin_manager()
    assert "up.one" in host.steps and host.steps["up.one"].plugin_version == "1.0"

    fake_site.uninstall("upplugin", "1.0")
    v2 = (
        v1.replace("VERSION = 1", "VERSION = 2")
        + """
        @hookimpl
        def rtauto_job_finished(job):
            pass
        """
    )
    v2 = v2.replace(
        'register(StepType(name="up.one", run=lambda ctx, params: None))',
        'register(StepType(name="up.one", run=lambda ctx, params: None))\n'
        '            register(StepType(name="up.two", run=lambda ctx, params: None))',
    )
    fake_site.install("upplugin", "2.0", {"up": "up_pkg.plugin"}, {"up_pkg/plugin.py": v2})
    touch_later(fake_site.root / "up_pkg" / "plugin.py")
    stale = build_plugin_manager()  # without forgetting: the module imported first is reused
    assert "up.two" not in stale.steps

    dropped = forget_plugin_modules()
    assert "up_pkg.plugin" in dropped and "up_pkg" in dropped
    assert not any(name == "rtauto" or name.startswith("rtauto.") for name in dropped)
    fresh = build_plugin_manager()
    assert {"up.one", "up.two"} <= set(fresh.steps)
    assert fresh.steps["up.two"].plugin_version == "2.0"
    assert sys.modules["up_pkg.plugin"].VERSION == 2  # the new code, not the first import
    assert "rtauto_job_finished" in fresh.plugins["up"].hooks  # its new observer is live

    # a broken upgrade is reported when it is installed, not when a job first needs it
    fake_site.uninstall("upplugin", "2.0")
    fake_site.install(
        "upplugin", "3.0", {"up": "up_pkg.plugin"}, {"up_pkg/plugin.py": "def broken(:\n"}
    )
    touch_later(fake_site.root / "up_pkg" / "plugin.py", seconds=20)
    forget_plugin_modules()
    broken = build_plugin_manager()
    assert "up.one" not in broken.steps
    assert "SyntaxError" in broken.failures["up"]
