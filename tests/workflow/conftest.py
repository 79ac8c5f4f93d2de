"""Step types with params models, registered through the real plugin manager."""

from __future__ import annotations

import types
from collections.abc import Mapping

import pytest
from pydantic import BaseModel, ConfigDict

from rtauto import hookimpl
from rtauto.hooks import RegisteredStep, build_plugin_manager
from rtauto.steps import StepType


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: float
    width: float


class SegmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    structures: list[str] = []
    threshold: float = 0.5
    window: Window | None = None


class CheckParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strict: bool = False


class SendParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    destination: str
    alternates: list[str] = []


def _segment(ctx, params):
    return {"structures": params.structures}


def _check(ctx, params):
    return {"outcome": "pass"}


def _send(ctx, params):
    return None


@hookimpl
def rtauto_register_steps(register):
    register(StepType(name="test.segment", run=_segment, params=SegmentParams))
    register(
        StepType(
            name="test.check",
            run=_check,
            params=CheckParams,
            outputs={"outcome": "pass, warn or fail", "findings": "list of findings"},
        )
    )
    register(StepType(name="test.send", run=_send, params=SendParams))


TEST_STEPS_PLUGIN = types.ModuleType("rtauto_workflow_test_steps")
TEST_STEPS_PLUGIN.rtauto_register_steps = rtauto_register_steps


@pytest.fixture(scope="session")
def step_types() -> Mapping[str, RegisteredStep]:
    """The registered step types of a plugin host holding only the test plugin."""
    host = build_plugin_manager(
        autoload=False, blocked=("route",), extra_plugins={"teststeps": TEST_STEPS_PLUGIN}
    )
    assert host.failures == {}
    assert set(host.steps) == {"test.segment", "test.check", "test.send"}
    return host.steps
