"""Hot reload of the workflows folder: valid edits, refused edits, deletions, name clashes."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from rtauto.workflow import WorkflowLibrary

VERSION_1 = """\
name: thorax
trigger: {modality: CT}
steps:
  - id: contour
    uses: test.segment
    with: {model: thorax-oar@1}
"""
VERSION_2 = (
    VERSION_1.replace("thorax-oar@1", "thorax-oar@2")
    + "  - {id: check, uses: test.check, needs: contour}\n"
)
BROKEN = VERSION_2.replace("needs: contour", "needs: contur")


def write(path: Path, text: str) -> None:
    """Write like an editor does; the mtime is moved on so a same-size edit is seen too."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    stamp = max(before + 1_000_000, path.stat().st_mtime_ns)
    os.utime(path, ns=(stamp, stamp))


@pytest.fixture
def library(tmp_path, step_types):
    return WorkflowLibrary(tmp_path, lambda: step_types, known_destinations=lambda: {"tps"})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_valid_edit_is_picked_up_with_a_new_hash(library, tmp_path):
    path = tmp_path / "thorax.yaml"
    write(path, VERSION_1)
    changes = library.refresh()
    assert changes == [f"{path}: loaded workflow thorax ({sha(path)[:12]})"]
    first = library.get("thorax")
    assert first is not None and first.hash == sha(path) and first.path == path
    assert first.params["contour"].model == "thorax-oar@1"
    assert library.refresh() == []  # nothing changed

    write(path, VERSION_2)
    (change,) = library.refresh()
    assert change == f"{path}: reloaded workflow thorax ({first.hash[:12]} -> {sha(path)[:12]})"
    second = library.get("thorax")
    assert second.hash == sha(path) != first.hash
    assert second.order == ["contour", "check"]
    assert library.errors == {}


def test_invalid_edit_is_refused_and_the_last_good_version_keeps_running(library, tmp_path, caplog):
    path = tmp_path / "thorax.yml"
    write(path, VERSION_2)
    library.refresh()
    good = library.get("thorax")

    write(path, BROKEN)
    with caplog.at_level(logging.ERROR, logger="rtauto.workflow"):
        (change,) = library.refresh()
    assert "edit refused (1 problem(s)); workflow thorax keeps running version" in change
    problem = f"{path}:7:42: step 'check' needs unknown step 'contur'"
    assert library.errors == {path: [problem]}
    assert problem in caplog.messages
    assert library.get("thorax") is good
    assert [w.hash for w in library.workflows] == [good.hash]

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="rtauto.workflow"):
        assert library.refresh() == []  # the same refused content is not reported again
    assert caplog.messages == []

    write(path, VERSION_2)  # the edit is undone
    assert library.refresh() == [f"{path}: problems fixed; workflow thorax is unchanged"]
    assert library.errors == {}
    assert library.get("thorax") is good


def test_a_file_that_never_loaded_is_absent_and_a_deleted_file_is_removed(library, tmp_path):
    bad = tmp_path / "bad.yaml"
    write(bad, "name: bad\ntrigger: {modality: CT}\nsteps:\n  - {id: a, uses: test.segmnt}\n")
    good = tmp_path / "good.yaml"
    write(good, VERSION_1)
    (tmp_path / "README.md").write_text("not a workflow")
    changes = library.refresh()
    assert changes[0] == f"{bad}: refused (1 problem(s))"
    assert [w.name for w in library.workflows] == ["thorax"]
    assert library.get("bad") is None
    assert list(library.errors) == [bad]
    assert library.errors[bad][0].startswith(f"{bad}:4:19: step 'a': unknown step type")

    good.unlink()
    bad.unlink()
    assert library.refresh() == [f"{bad}: removed", f"{good}: removed workflow thorax"]
    assert library.workflows == [] and library.errors == {}


def test_two_files_with_one_name_the_later_is_refused_until_the_name_is_free(library, tmp_path):
    first = tmp_path / "a.yaml"
    write(first, VERSION_1)
    library.refresh()
    second = tmp_path / "0-copy.yaml"  # sorts first, but a.yaml held the name first
    write(second, VERSION_2)
    (change,) = library.refresh()
    assert change == (
        f"{second}:1:1: workflow name 'thorax' is already used by {first}; this file is not loaded"
    )
    assert library.get("thorax").path == first
    assert library.errors == {second: [change]}

    write(first, VERSION_1.replace("name: thorax", "name: thorax-old"))
    old_hash = library.get("thorax").hash
    changes = library.refresh()
    assert changes == [
        f"{second}: loaded workflow thorax ({sha(second)[:12]})",
        f"{first}: reloaded workflow thorax-old ({old_hash[:12]} -> {sha(first)[:12]})",
    ]
    assert library.get("thorax").path == second
    assert library.get("thorax-old").path == first
    assert library.errors == {}


def test_at_a_restart_the_older_of_two_files_with_one_name_keeps_it(tmp_path, step_types):
    """A copy made while the daemon ran was refused; after a restart it must not win the name
    just because its file name sorts first."""
    original = tmp_path / "thorax.yaml"
    write(original, VERSION_1)
    copy = tmp_path / "thorax-copy.yaml"  # sorts before thorax.yaml
    write(copy, VERSION_2)
    hour_ago = original.stat().st_mtime_ns - 3600 * 10**9
    os.utime(original, ns=(hour_ago, hour_ago))
    for _ in range(2):  # two restarts: the same choice each time
        fresh = WorkflowLibrary(tmp_path, lambda: step_types, known_destinations=lambda: {"tps"})
        fresh.refresh()
        assert fresh.get("thorax").path == original
        assert list(fresh.errors) == [copy]


def test_a_step_type_that_disappears_refuses_the_file_on_the_next_scan(tmp_path, step_types):
    available = dict(step_types)
    library = WorkflowLibrary(tmp_path, lambda: available)
    path = tmp_path / "thorax.yaml"
    write(path, VERSION_2)
    library.refresh()
    loaded = library.get("thorax")
    del available["test.check"]  # its plugin was uninstalled
    (change,) = library.refresh()
    assert "edit refused" in change
    assert library.errors[path][0].startswith(f"{path}:7:23: step 'check': unknown step type")
    assert library.get("thorax") is loaded


def test_a_missing_folder_is_empty(tmp_path, step_types):
    library = WorkflowLibrary(tmp_path / "nowhere", lambda: step_types)
    assert library.refresh() == []
    assert library.workflows == []


def test_a_file_broken_while_the_daemon_was_stopped_runs_its_last_good_version(
    tmp_path, step_types
):
    folder, keep = tmp_path / "workflows", tmp_path / "home" / "workflows.last-good"
    folder.mkdir()
    path = folder / "thorax.yaml"

    def start() -> WorkflowLibrary:  # a daemon start: a fresh library on the same home
        library = WorkflowLibrary(
            folder, lambda: step_types, known_destinations=lambda: {"tps"}, keep=keep
        )
        library.refresh()
        return library

    write(path, VERSION_2)
    good = start().get("thorax")
    write(path, BROKEN)  # edited while the daemon was stopped
    library = start()
    running = library.get("thorax")
    assert running is not None and running.hash == good.hash and running.path == path
    assert library.errors[path][0].startswith(f"{path}:")  # the edit's problem is shown

    write(path, VERSION_1)  # fixed: the fix runs, and is the version kept from now on
    library.refresh()
    assert library.get("thorax").hash == sha(path)
    write(path, BROKEN)
    assert start().get("thorax").hash == sha_of_text(VERSION_1)

    path.unlink()  # deleted while stopped, then written again broken: nothing comes back
    start()
    write(path, BROKEN)
    assert start().get("thorax") is None


def test_without_a_keep_folder_a_broken_file_at_start_is_refused(tmp_path, step_types):
    path = tmp_path / "thorax.yaml"
    write(path, BROKEN)
    library = WorkflowLibrary(tmp_path, lambda: step_types, known_destinations=lambda: {"tps"})
    library.refresh()
    assert library.get("thorax") is None and path in library.errors


def sha_of_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_only_a_version_in_effect_is_kept_and_a_missing_folder_forgets_nothing(
    tmp_path, step_types
):
    folder, keep = tmp_path / "workflows", tmp_path / "home" / "workflows.last-good"
    folder.mkdir()

    def start() -> WorkflowLibrary:
        library = WorkflowLibrary(
            folder, lambda: step_types, known_destinations=lambda: {"tps"}, keep=keep
        )
        library.refresh()
        return library

    original = folder / "thorax.yaml"
    write(original, VERSION_1)
    library = start()
    copy = folder / "thorax-copy.yaml"  # the same name: refused while the original holds it
    write(copy, VERSION_2)
    library.refresh()
    assert library.get("thorax").path == original
    write(copy, BROKEN)  # then broken; the original gets a valid edit; the daemon restarts
    edited = VERSION_1 + "# reviewed\n"
    write(original, edited)
    library = start()
    assert library.get("thorax").path == original  # the refused copy was never kept
    assert library.get("thorax").hash == sha_of_text(edited)

    copy.unlink()
    write(original, BROKEN)
    folder.rename(tmp_path / "away")  # not there at a start (a share not mounted yet)
    assert start().get("thorax") is None
    (tmp_path / "away").rename(folder)
    assert start().get("thorax").hash == sha_of_text(edited)  # still kept
