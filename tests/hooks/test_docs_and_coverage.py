"""The hook specifications, docs/hooks.md and the tests cannot drift apart.

* every hook in ``rtauto.hooks.specs`` has a heading ``NAME(arguments)`` in docs/hooks.md with
  the spec's arguments, its When / Arguments / Result / Errors, and an example implementation;
* every documented hook exists;
* every hook's example is a working plugin (loaded here, observers called with sample data);
* every hook name appears in some test file other than this one.
"""

from __future__ import annotations

import logging
import re
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from rtauto.config import Settings
from rtauto.hooks import build_plugin_manager, specs

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HOOKS_DOC = PROJECT_ROOT / "docs" / "hooks.md"
TESTS_DIR = PROJECT_ROOT / "tests"

HOOKS = sorted(
    name
    for name in dir(specs)
    if getattr(getattr(specs, name), specs.PROJECT_NAME + "_spec", None) is not None
)
HEADING = re.compile(r"^(#{2,6}) +`?(rtauto_\w+)\(([^)]*)\)`? *$", re.MULTILINE)


def spec_arguments(hook_name: str) -> list[str]:
    pm = build_plugin_manager(autoload=False, blocked=["route"]).pm
    return list(getattr(pm.hook, hook_name).spec.argnames)


def documented_sections() -> dict[str, tuple[str, str]]:
    """Hook name -> (arguments in the heading, the section's text up to the next heading)."""
    text = HOOKS_DOC.read_text(encoding="utf-8")
    sections = {}
    for match in HEADING.finditer(text):
        level = len(match.group(1))
        following = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(text, match.end())
        body = text[match.end() : following.start() if following else len(text)]
        sections[match.group(2)] = (match.group(3), body)
    return sections


SECTIONS = documented_sections()


def example_of(hook_name: str) -> str:
    _, body = SECTIONS[hook_name]
    blocks = re.findall(r"```python\n(.*?)```", body, re.DOTALL)
    assert blocks, f"docs/hooks.md: {hook_name} has no python example"
    return textwrap.dedent(blocks[0])


def test_the_hook_lists_are_complete():
    assert sorted(specs.PROVIDER_HOOKS + specs.OBSERVER_HOOKS) == HOOKS


@pytest.mark.parametrize("hook_name", HOOKS)
def test_hook_is_documented(hook_name):
    assert hook_name in SECTIONS, f"docs/hooks.md has no heading for {hook_name}"
    arguments, body = SECTIONS[hook_name]
    documented = [a.strip() for a in arguments.split(",") if a.strip()]
    assert documented == spec_arguments(hook_name), f"docs/hooks.md: {hook_name} arguments"
    for part in ("**When:**", "**Arguments:**", "**Result:**", "**Errors:**", "**Example:**"):
        assert part in body, f"docs/hooks.md: {hook_name} lacks {part}"
    assert f"def {hook_name}(" in example_of(hook_name)


def test_every_documented_hook_exists():
    assert sorted(SECTIONS) == HOOKS


SAMPLE_JOB = {
    "id": "job-1",
    "workflow": "demo",
    "workflow_hash": "0123456789abcdef",
    "study_instance_uid": "1.2.3",
    "series_instance_uid": "1.2.3.4",
    "status": "ok",
}
SAMPLE_OBSERVER_CALLS = {
    "rtauto_series_complete": {
        "series": {
            "series_instance_uid": "1.2.3.4",
            "study_instance_uid": "1.2.3",
            "modality": "CT",
            "instance_count": 100,
            "source": "scp",
            "attributes": {},
        }
    },
    "rtauto_job_started": {"job": SAMPLE_JOB},
    "rtauto_step_finished": {
        "job": SAMPLE_JOB,
        "step": {
            "id": "send",
            "uses": "route.dicom",
            "status": "fail",
            "attempts": 3,
            "outputs": {},
            "error": "association rejected",
            "artifacts": [],
        },
    },
    "rtauto_job_finished": {"job": SAMPLE_JOB},
}


@pytest.mark.parametrize("hook_name", HOOKS)
def test_hook_example_is_a_working_plugin(hook_name, caplog):
    module = ModuleType(f"docs_example_{hook_name}")
    exec(compile(example_of(hook_name), f"docs/hooks.md ({hook_name})", "exec"), module.__dict__)

    host = build_plugin_manager(Settings(), autoload=False, extra_plugins={"example": module})

    assert host.failures == {}
    assert hook_name in host.plugins["example"].hooks
    if hook_name in SAMPLE_OBSERVER_CALLS:
        with caplog.at_level(logging.ERROR, logger="rtauto.plugins"):
            host.notify(hook_name, **SAMPLE_OBSERVER_CALLS[hook_name])
        assert not [r for r in caplog.records if r.name == "rtauto.plugins"]
    registered = {
        "rtauto_register_steps": [s for s in host.steps.values() if s.plugin == "example"],
        "rtauto_register_destinations": set(host.destination_types) - {"dicom", "folder"},
        "rtauto_register_model_backends": host.model_backends,
    }
    if hook_name in registered:
        assert registered[hook_name], f"the {hook_name} example registers nothing"


@pytest.mark.parametrize("hook_name", HOOKS)
def test_hook_has_a_test(hook_name):
    this_file = Path(__file__).resolve()
    pattern = re.compile(rf"\b{hook_name}\b")
    users = [
        path.relative_to(PROJECT_ROOT)
        for path in sorted(TESTS_DIR.rglob("*.py"))
        if path.resolve() != this_file and pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert users, f"no test under tests/ calls or implements {hook_name}"
