"""rtauto plugin template: the step ``template.count_instances``.

The step counts the received instances of one modality in the job's input, fails the step when
there are fewer than a minimum, writes a small JSON report as an artifact and returns the counts
as outputs that a workflow's ``if:`` can test (``workflows/count-ct.yaml``)::

    steps:
      - id: count
        uses: template.count_instances
        with: {modality: CT, minimum: 10}
      - id: keep
        uses: route.folder
        needs: [count]
        if: steps.count.outputs.instances >= 10
        with: {path: counted}

Its configuration block (``plugins: {template: {...}}`` in the daemon configuration) is
validated at start-up by ``rtauto_configure``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rtauto import ConfigError, StepContext, StepFailed, StepResult, StepType, hookimpl

__version__ = "0.1.0"

PLUGIN_NAME = "template"  # the entry point's name in pyproject.toml


class TemplateConfig(BaseModel):
    """The plugin's block in the daemon configuration: ``plugins: {template: {...}}``."""

    model_config = ConfigDict(extra="forbid")

    report_name: str = Field(
        "instance-count.json",
        pattern=r"^[A-Za-z0-9_.-]+\.json$",
        description="file name of the JSON report written in the step's working folder",
    )


class CountInstancesParams(BaseModel):
    """The ``with:`` block of a ``template.count_instances`` step."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error at validate time

    modality: str = Field("CT", description="DICOM Modality of the series to count")
    minimum: int = Field(1, ge=0, description="fewer instances than this fails the step")


def read_config(plugin_blocks: Mapping[str, Any]) -> TemplateConfig:
    """The plugin's configuration from ``settings.plugins``; ``ConfigError`` when invalid."""
    try:
        return TemplateConfig.model_validate(plugin_blocks.get(PLUGIN_NAME) or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"plugins.{PLUGIN_NAME}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(problems) from None


def count_instances(ctx: StepContext, params: CountInstancesParams) -> StepResult:
    """Count the instances of ``params.modality`` per series and write a JSON report."""
    config = read_config(ctx.settings.plugins)
    series = ctx.study.by_modality(params.modality)
    per_series = {s.series_instance_uid: len(s.instances) for s in series}
    total = sum(per_series.values())
    if total < params.minimum:
        raise StepFailed(
            f"the input holds {total} {params.modality} instance(s), "
            f"fewer than the {params.minimum} required"
        )
    report = ctx.workdir / config.report_name
    report.write_text(
        json.dumps(
            {
                "study_instance_uid": ctx.study.study_instance_uid,
                "modality": params.modality,
                "instances": total,
                "series": per_series,
                "provenance": ctx.provenance.to_json(),
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    ctx.add_artifact(report, kind="report-json", description="instance count")
    ctx.logger.info("%d %s instance(s) in %d series", total, params.modality, len(per_series))
    return StepResult(
        outputs={"instances": total, "series": len(per_series)},
        summary=f"{total} {params.modality} instance(s) in {len(per_series)} series",
    )


COUNT_INSTANCES = StepType(
    name="template.count_instances",
    run=count_instances,
    params=CountInstancesParams,
    description="Count the received instances of one modality; fail below a minimum.",
    outputs={
        "instances": "number of instances of the modality",
        "series": "number of series of the modality",
    },
)


@hookimpl
def rtauto_configure(settings: Any) -> None:
    read_config(settings.plugins)  # refuse a bad block at start-up, not in the first job


@hookimpl
def rtauto_register_steps(register: Any) -> None:
    register(COUNT_INSTANCES)
