"""Hook specifications the plan_check plugin adds to rtauto's plugin manager.

A vendor adds checks by implementing ``plan_check_register_checks`` in any rtauto plugin::

    from rtauto import hookimpl
    from rtauto_plan_check import Check, CheckResult

    def _couch_kick(plan, params):
        ...
        return CheckResult.passed(measured=..., tolerance=...)

    @hookimpl
    def plan_check_register_checks(register):
        register(Check(id="acme.couch_kick", title="...", needs=("plan",),
                       failure_mode="...", run=_couch_kick))

A profile then selects ``acme.couch_kick`` like any built-in check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("rtauto")


@hookspec
def plan_check_register_checks(register: Callable[[Any], None]) -> None:
    """Register plan checks: call ``register(Check(...))`` once per check.

    Called each time the ``plan_check.run`` step builds its check catalogue (in the worker
    process, with the job's plugin manager). ``register`` raises ``PluginError`` when a check
    id is already taken.

    Result: ignored. Errors: provider rule (the failing plugin's checks are left out and the
    report names the plugin; the built-in checks and other plugins' checks still run).
    """
