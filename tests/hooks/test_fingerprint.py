"""plugin_fingerprint: changes when installed plugins or their source files change."""

from __future__ import annotations

import os

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
