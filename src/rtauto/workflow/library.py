"""The workflows folder, hot reloaded: what the daemon matches received data against.

:meth:`WorkflowLibrary.refresh` is cheap enough to call every second: a file whose
``(mtime_ns, size)`` is unchanged is not read, and a file whose content hash is unchanged is not
parsed. A valid edit takes effect for the next job (with its new hash); an invalid edit is
refused, its problems are logged (logger ``rtauto.workflow``) and kept in :attr:`errors`, and the
last good version of that file keeps running. A file that never loaded is absent. A deleted
file's workflow is removed. Two files declaring the same workflow name: the one that held the
name first keeps it (on a first scan, the first in file-name order) and the other is refused
until the name is free again. When the registered step types or the known destinations change,
every file is checked again.

Given a ``keep`` folder (the daemon's ``HOME/workflows.last-good``), the library also keeps
there the last version of each file that was in effect (loaded and holding its name), so that
a file broken while the daemon was stopped still runs that version after the start (with the
file's problems logged). A file deleted (while the folder is there) takes its kept version
with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rtauto.errors import WorkflowError
from rtauto.workflow.loader import LoadedWorkflow, load_workflow_text, workflow_files

if TYPE_CHECKING:
    from rtauto.destinations import DestinationType
    from rtauto.hooks.manager import RegisteredStep

__all__ = ["WorkflowLibrary"]

log = logging.getLogger("rtauto.workflow")


@dataclass
class _Entry:
    """What the library knows about one file."""

    stat: tuple[int, int] | None = None  # (mtime_ns, size) last read
    digest: str | None = None  # sha256 of the bytes last read
    good: LoadedWorkflow | None = None  # last version that loaded
    problems: list[str] = field(default_factory=list)  # of the current content, if refused
    conflict: str | None = None  # why ``good`` is not active (name held by another file)
    since: int = 0  # refresh count when ``good`` first loaded: older files keep a name
    kept: str | None = None  # hash of the version kept for this file (see ``keep``)


class WorkflowLibrary:
    """The loaded workflows of one folder (``*.yaml`` and ``*.yml``), hot reloaded.

    ``steps_provider`` returns the registered step types (``PluginHost.steps``);
    ``known_destinations`` returns the destination names of the daemon configuration (None:
    destination names are not checked).
    """

    def __init__(
        self,
        folder: Path,
        steps_provider: Callable[[], Mapping[str, RegisteredStep]],
        known_destinations: Callable[[], set[str]] | None = None,
        destination_types: Callable[[], Mapping[str, DestinationType]] | None = None,
        keep: Path | None = None,
    ):
        self.folder = Path(folder)
        self.keep = keep
        self._steps_provider = steps_provider
        self._known_destinations = known_destinations
        self._destination_types = destination_types
        self._types: Mapping[str, DestinationType] | None = None
        self._entries: dict[Path, _Entry] = {}
        self._active: dict[str, LoadedWorkflow] = {}
        self._context: tuple[object, ...] | None = None
        self._refreshes = 0
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------
    # reading
    # ----------------------------------------------------------------------------------------

    @property
    def workflows(self) -> list[LoadedWorkflow]:
        """The workflows in effect, by name."""
        with self._lock:
            return [self._active[name] for name in sorted(self._active)]

    @property
    def errors(self) -> dict[Path, list[str]]:
        """Problems of the files whose current content is refused, by file."""
        with self._lock:
            found: dict[Path, list[str]] = {}
            for path, entry in sorted(self._entries.items()):
                lines = list(entry.problems)
                if entry.conflict and not entry.problems:
                    lines.append(entry.conflict)
                if lines:
                    found[path] = lines
            return found

    def get(self, name: str) -> LoadedWorkflow | None:
        """The workflow in effect with this name, or None."""
        with self._lock:
            return self._active.get(name)

    # ----------------------------------------------------------------------------------------
    # reloading
    # ----------------------------------------------------------------------------------------

    def refresh(self) -> list[str]:
        """Rescan the folder; returns one human-readable message per change."""
        with self._lock:
            self._refreshes += 1
            steps = self._steps_provider()
            known = self._known_destinations() if self._known_destinations else None
            self._types = self._destination_types() if self._destination_types else None
            context = (
                tuple(sorted((name, reg.plugin_version) for name, reg in steps.items())),
                None if known is None else tuple(sorted(known)),
                None if self._types is None else tuple(sorted(self._types)),
            )
            recheck = self._context is not None and context != self._context
            self._context = context

            changes: list[str] = []
            try:
                files = workflow_files(self.folder) if self.folder.is_dir() else []
            except OSError as exc:
                log.error("cannot list the workflows folder %s: %s", self.folder, exc)
                return changes
            listed = self.folder.is_dir()  # a folder gone for a moment forgets nothing kept
            for path in [p for p in self._entries if p not in files]:
                entry = self._entries.pop(path)
                if listed:
                    self._forget_kept(path)
                if entry.good is not None and self._active.get(entry.good.name) is entry.good:
                    changes.append(f"{path}: removed workflow {entry.good.name}")
                else:
                    changes.append(f"{path}: removed")
            if self._refreshes == 1 and listed:
                self._forget_kept_except(files)
            loads: list[tuple[Path, str]] = []
            for path in files:
                message = self._refresh_file(path, steps, known, force=recheck)
                if message and self._entries[path].problems:
                    changes.append(message)
                elif message:
                    loads.append((path, message))
            changes.extend(self._assign_names())
            # only a version that took its name is kept: a refused copy never comes back
            for path, entry in self._entries.items():
                good = entry.good
                active = good is not None and self._active.get(good.name) is good
                if active and good is not None and entry.kept != good.hash:
                    self._keep(path, good.text)
                    entry.kept = good.hash
            # a version that loaded but lost the name to another file is reported as refused
            changes.extend(m for p, m in loads if self._entries[p].conflict is None)
            for message in changes:
                log.info("%s", message)
            return changes

    def _refresh_file(
        self,
        path: Path,
        steps: Mapping[str, RegisteredStep],
        known: set[str] | None,
        *,
        force: bool,
    ) -> str | None:
        entry = self._entries.setdefault(path, _Entry())
        try:
            stat = path.stat()
        except OSError:
            return None  # deleted between listing and stat: the next refresh removes it
        key = (stat.st_mtime_ns, stat.st_size)
        if key == entry.stat and not force:
            return None
        try:
            data = path.read_bytes()
        except OSError as exc:
            entry.problems = [f"{path}:1:1: cannot read the workflow file: {exc.strerror}"]
            return None
        entry.stat = key
        digest = hashlib.sha256(data).hexdigest()
        if digest == entry.digest and not force:
            return None
        entry.digest = digest
        try:
            text = data.decode("utf-8")
            loaded = load_workflow_text(text, str(path), steps, known, self._types)
        except UnicodeDecodeError:
            problems = [f"{path}:1:1: the file is not UTF-8 text"]
        except WorkflowError as exc:
            problems = exc.problems
        else:
            loaded = dataclasses.replace(loaded, path=path)
            previous = entry.good
            had_problems, entry.problems = bool(entry.problems), []
            if previous is not None and previous.hash == loaded.hash:
                if had_problems:
                    return f"{path}: problems fixed; workflow {loaded.name} is unchanged"
                return None
            if previous is None or previous.name != loaded.name:
                entry.since = self._refreshes
            entry.good = loaded
            if previous is None:
                return f"{path}: loaded workflow {loaded.name} ({digest[:12]})"
            return (
                f"{path}: reloaded workflow {loaded.name} ({previous.hash[:12]} -> {digest[:12]})"
            )
        if problems == entry.problems:
            return None
        entry.problems = problems
        for line in problems:
            log.error("%s", line)
        if entry.good is None and (kept := self._kept(path, steps, known)) is not None:
            entry.good, entry.since, entry.kept = kept, self._refreshes, kept.hash
            return (
                f"{path}: refused ({len(problems)} problem(s)); workflow {kept.name} runs its "
                f"last good version {kept.hash[:12]}, kept from before the daemon started"
            )
        if entry.good is not None:
            return (
                f"{path}: edit refused ({len(problems)} problem(s)); workflow "
                f"{entry.good.name} keeps running version {entry.good.hash[:12]}"
            )
        return f"{path}: refused ({len(problems)} problem(s))"

    # -- the last good versions, kept across restarts ----------------------------------------
    def _kept_file(self, path: Path) -> Path | None:
        if self.keep is None:
            return None
        key = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:24]
        return self.keep / f"{key}.json"

    def _keep(self, path: Path, text: str) -> None:
        kept = self._kept_file(path)
        if kept is None:
            return
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp = kept.with_suffix(".tmp")
            tmp.write_text(json.dumps({"path": str(path.absolute()), "text": text}))
            os.replace(tmp, kept)
        except OSError as exc:
            log.warning("cannot keep the last good version of %s: %s", path, exc)

    def _forget_kept(self, path: Path) -> None:
        kept = self._kept_file(path)
        if kept is not None:
            kept.unlink(missing_ok=True)

    def _forget_kept_except(self, files: list[Path]) -> None:
        """Drop the kept versions of files deleted while the daemon was stopped."""
        if self.keep is None or not self.keep.is_dir():
            return
        wanted = {self._kept_file(path) for path in files}
        for kept in self.keep.glob("*.json"):
            if kept not in wanted:
                kept.unlink(missing_ok=True)

    def _kept(
        self, path: Path, steps: Mapping[str, RegisteredStep], known: set[str] | None
    ) -> LoadedWorkflow | None:
        """The version of ``path`` that last loaded, if kept and still valid."""
        kept = self._kept_file(path)
        if kept is None or not kept.is_file():
            return None
        try:
            data = json.loads(kept.read_text())
            loaded = load_workflow_text(data["text"], str(path), steps, known, self._types)
        except (OSError, ValueError, KeyError, WorkflowError) as exc:
            log.warning("the kept last good version of %s cannot be used: %s", path, exc)
            return None
        return dataclasses.replace(loaded, path=path)

    def _assign_names(self) -> list[str]:
        """Give each name to the file that held it first; refuse the others."""
        changes: list[str] = []
        active: dict[str, LoadedWorkflow] = {}
        owners: dict[str, Path] = {}
        holders = {loaded.path: name for name, loaded in self._active.items()}
        candidates = [(p, e) for p, e in self._entries.items() if e.good is not None]

        def seniority(item: tuple[Path, _Entry]) -> tuple[int, int, int, str]:
            path, entry = item
            holds = entry.good is not None and holders.get(path) == entry.good.name
            # files first seen together (at start) are told apart by age, so a copy made
            # later never takes the name from the original at a restart
            modified = entry.stat[0] if entry.stat else 0
            return (0 if holds else 1, entry.since, modified, str(path))

        ordered = sorted(candidates, key=seniority)
        for path, entry in ordered:
            loaded = entry.good
            assert loaded is not None
            if loaded.name in owners:
                conflict = (
                    f"{path}:1:1: workflow name {loaded.name!r} is already used by "
                    f"{owners[loaded.name]}; this file is not loaded"
                )
                if entry.conflict != conflict:
                    log.error("%s", conflict)
                    changes.append(conflict)
                entry.conflict = conflict
                continue
            if entry.conflict is not None:
                changes.append(f"{path}: loaded workflow {loaded.name} ({loaded.hash[:12]})")
            entry.conflict = None
            owners[loaded.name] = path
            active[loaded.name] = loaded
        self._active = active
        return changes
