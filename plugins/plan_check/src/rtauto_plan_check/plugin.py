"""The plan_check plugin's hook implementations (thin: the work is in plain modules)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from rtauto import hookimpl
from rtauto_plan_check import specs
from rtauto_plan_check.checks import BUILTIN_CHECKS
from rtauto_plan_check.step import STEP_TYPE, remember_plugin_manager


@hookimpl
def rtauto_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    pluginmanager.add_hookspecs(specs)
    remember_plugin_manager(pluginmanager)


@hookimpl
def rtauto_register_steps(register: Callable[[Any], None]) -> None:
    register(STEP_TYPE)


@hookimpl
def plan_check_register_checks(register: Callable[[Any], None]) -> None:
    for check in BUILTIN_CHECKS:
        register(check)
