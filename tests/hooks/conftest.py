"""Fixtures for the plugin-manager tests: real distributions on a temporary ``sys.path`` entry."""

from __future__ import annotations

import importlib
import shutil
import sys
import textwrap
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from rtauto.hooks import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP


class FakeSite:
    """A folder on ``sys.path`` holding installed-looking distributions (``*.dist-info``).

    ``importlib.metadata`` finds their entry points exactly as it finds a pip-installed
    plugin's, so ``build_plugin_manager()`` discovers them through its real code path.
    """

    def __init__(self, root: Path):
        self.root = root

    def install(
        self,
        name: str,
        version: str,
        entry_points: Mapping[str, str],
        files: Mapping[str, str],
    ) -> Path:
        """Write the distribution's metadata and its files (path -> Python source)."""
        dist_info = self.root / f"{name}-{version}.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
        )
        lines = [f"[{ENTRY_POINT_GROUP}]"] + [
            f"{ep} = {value}" for ep, value in entry_points.items()
        ]
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for relative, source in files.items():
            self.write(relative, source)
        importlib.invalidate_caches()
        return dist_info

    def write(self, relative: str, source: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return path

    def uninstall(self, name: str, version: str) -> None:
        shutil.rmtree(self.root / f"{name}-{version}.dist-info")
        importlib.invalidate_caches()


@contextmanager
def fake_site_at(root: Path) -> Iterator[FakeSite]:
    """Put ``root`` first on ``sys.path``; afterwards remove it, the modules imported from it
    and the import system's cached view of it."""
    root.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield FakeSite(root)
    finally:
        while str(root) in sys.path:
            sys.path.remove(str(root))
        for module_name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None) or ""
            if origin.startswith(str(root)):
                del sys.modules[module_name]
        importlib.invalidate_caches()


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    """A temporary site folder for fake plugin distributions, with autoload enabled."""
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    with fake_site_at(tmp_path / "site") as site:
        yield site


@pytest.fixture
def site_factory(monkeypatch: pytest.MonkeyPatch):
    """``fake_site_at`` itself, for tests that check what is left after the site is removed."""
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    return fake_site_at
