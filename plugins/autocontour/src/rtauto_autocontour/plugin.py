"""The plugin's hook implementations (thin: the work is in ``steps`` and ``backends``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rtauto import hookimpl
from rtauto_autocontour.backends import BUILTIN_BACKENDS
from rtauto_autocontour.compare import COMPARE_STEP
from rtauto_autocontour.steps import SEGMENT_STEP, THRESHOLD_STEP


@hookimpl
def rtauto_register_steps(register: Callable[[Any], None]) -> None:
    register(SEGMENT_STEP)
    register(THRESHOLD_STEP)
    register(COMPARE_STEP)


@hookimpl
def rtauto_register_model_backends(register: Callable[..., None]) -> None:
    for name, loader in BUILTIN_BACKENDS.items():
        register(name, loader)


@hookimpl
def rtauto_add_commands(app: Any) -> None:
    from rtauto_autocontour.cli import models_command

    app.command("models")(models_command)
