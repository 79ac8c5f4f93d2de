"""What a check is (data) and what it returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Check", "CheckResult", "NEEDS", "SEVERITIES", "STATUSES"]

# The data a check may need, beyond the plan itself.
NEEDS = ("plan", "structures", "dose", "ct")
SEVERITIES = ("fail", "warn")
# A report row's status. "error": the check itself raised (counted as fail: nothing verified).
STATUSES = ("pass", "warn", "fail", "not_applicable", "error")

Verdict = Literal["pass", "violated", "not_applicable"]


@dataclass(frozen=True)
class CheckResult:
    """What a check's ``run`` returns; the runner turns ``violated`` into its severity."""

    verdict: Verdict
    measured: Any = None
    tolerance: Any = None
    message: str = ""
    details: Any = None

    @classmethod
    def passed(cls, message: str = "", measured: Any = None, tolerance: Any = None, **kw: Any):
        return cls("pass", measured, tolerance, message, kw.get("details"))

    @classmethod
    def violated(
        cls, message: str, measured: Any = None, tolerance: Any = None, **kw: Any
    ) -> CheckResult:
        return cls("violated", measured, tolerance, message, kw.get("details"))

    @classmethod
    def not_applicable(cls, reason: str) -> CheckResult:
        return cls("not_applicable", message=reason)


@dataclass(frozen=True)
class Check:
    """A plan check, declared as data.

    ``id``: what profiles name (vendors prefix theirs, e.g. ``acme.couch_kick``).
    ``needs``: the objects it reads, from :data:`NEEDS`; missing ones make it "not applicable".
    ``radiation``: the radiation types it applies to (empty: all), e.g. ``("PHOTON",)``.
    ``severity``: what a violation yields (``fail`` or ``warn``); a profile may change it.
    ``params``: parameters with their defaults; a profile or workflow overrides them.
    ``failure_mode``: the AAPM TG-275 failure mode the check guards against.
    ``run(plan_set, params)``: returns a :class:`CheckResult`.
    """

    id: str
    title: str
    run: Callable[[Any, Mapping[str, Any]], CheckResult]
    needs: tuple[str, ...] = ("plan",)
    failure_mode: str = ""
    severity: str = "fail"
    params: Mapping[str, Any] = field(default_factory=dict)
    radiation: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"check {self.id}: unknown needs {sorted(unknown)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"check {self.id}: severity must be one of {SEVERITIES}")
