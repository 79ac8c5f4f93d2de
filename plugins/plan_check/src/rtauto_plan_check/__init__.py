"""rtauto plan_check: TG-275-derived plan checks, a DVH engine, JSON/HTML reports.

Public API for vendors adding checks (see :mod:`rtauto_plan_check.specs`): :class:`Check`,
:class:`CheckResult`, :class:`PlanSet`; for scripts: :func:`load_plan_set`,
:func:`load_profile`, :func:`collect_checks`, :func:`run_profile`.
"""

__version__ = "0.1.0"

from rtauto_plan_check.data import PlanSet, load_plan_set  # noqa: E402
from rtauto_plan_check.model import Check, CheckResult  # noqa: E402
from rtauto_plan_check.runner import (  # noqa: E402
    collect_checks,
    load_profile,
    run_profile,
)

__all__ = [
    "Check",
    "CheckResult",
    "PlanSet",
    "__version__",
    "collect_checks",
    "load_plan_set",
    "load_profile",
    "run_profile",
]
