"""A site plugin used by the daemon tests: steps that sleep, raise, hang or write a file."""

from __future__ import annotations

import json
import time

from pydantic import BaseModel, ConfigDict

from rtauto import StepContext, StepResult, StepType, hookimpl


class SleepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = 1.0


def sleep_then_report(ctx: StepContext, params: SleepParams) -> StepResult:
    """Sleeps, then writes a JSON report listing the input instances (an artifact)."""
    started = time.time()
    time.sleep(params.seconds)
    report = ctx.workdir / "instances.json"
    report.write_text(
        json.dumps(
            {
                "job": ctx.job_id,
                "attempt": ctx.attempt,
                "started": started,
                "instances": sorted(
                    i.sop_instance_uid for s in ctx.study.series for i in s.instances
                ),
            }
        )
    )
    ctx.add_artifact(report, kind="report-json")
    return StepResult(outputs={"instances": len(ctx.study.files)}, summary="slept")


def raise_error(ctx: StepContext, params: SleepParams) -> StepResult:
    raise ValueError("this step always raises (site plugin test)")


def hang(ctx: StepContext, params: SleepParams) -> StepResult:
    while True:
        time.sleep(1)


@hookimpl
def rtauto_register_steps(register):
    register(StepType(name="site.sleep", params=SleepParams, run=sleep_then_report))
    register(StepType(name="site.raise", params=SleepParams, run=raise_error))
    register(StepType(name="site.hang", params=SleepParams, run=hang))
