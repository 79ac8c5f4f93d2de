"""Tests of ``template.count_instances`` on a synthetic CT series from ``rtauto.testing``.

Copy this file with the template: ``study_inputs()`` and ``step_context()`` build what the
engine gives a step in a worker process, from real DICOM files.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pydicom
import pytest
import rtauto_plugin_template as template
from pydantic import ValidationError

import rtauto
from rtauto import (
    InputInstance,
    InputSeries,
    Provenance,
    StepContext,
    StepFailed,
    StudyInputs,
)
from rtauto.config import Settings
from rtauto.hooks import build_plugin_manager
from rtauto.testing import write_ct_series
from rtauto.workflow import load_workflow

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
STEP_NAME = "template.count_instances"


def study_inputs(files: list[Path]) -> StudyInputs:
    """The job's input as the engine builds it: the files grouped by series, UIDs from the files."""
    by_series: dict[str, list[tuple[pydicom.Dataset, Path]]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, []).append((ds, path))
    series = []
    first = None
    for series_uid, members in by_series.items():
        first = members[0][0]
        series.append(
            InputSeries(
                series_instance_uid=series_uid,
                study_instance_uid=first.StudyInstanceUID,
                modality=first.Modality,
                instances=tuple(
                    InputInstance(ds.SOPInstanceUID, ds.SOPClassUID, series_uid, path)
                    for ds, path in members
                ),
                attributes={"SeriesDescription": first.get("SeriesDescription", "")},
            )
        )
    assert first is not None, "no files"
    return StudyInputs(
        study_instance_uid=first.StudyInstanceUID,
        patient_id=first.PatientID,
        series=tuple(series),
    )


def step_context(tmp_path: Path, study: StudyInputs, settings: Settings) -> StepContext:
    """A StepContext for one attempt of the step, with an empty working folder."""
    workdir = tmp_path / "job" / "count" / "attempt-1"
    workdir.mkdir(parents=True)
    return StepContext(
        job_id="job-1",
        step_id="count",
        step_type=STEP_NAME,
        attempt=1,
        workdir=workdir,
        job_dir=tmp_path / "job",
        study=study,
        previous={},
        provenance=Provenance(
            rtauto_version=rtauto.__version__,
            workflow_name="count-test",
            workflow_hash="0" * 64,
            job_id="job-1",
            step_id="count",
            step_type=STEP_NAME,
            plugin_name="template",
            plugin_version=template.__version__,
        ),
        settings=settings,
        destinations={},
        logger=logging.getLogger("rtauto.step.count"),
    )


@pytest.fixture
def host():
    """The plugin loaded through rtauto's plugin manager, as an installed plugin would be."""
    host = build_plugin_manager(Settings(), autoload=False, extra_plugins={"template": template})
    assert host.failures == {}
    return host


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    return write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=12).files


def run_step(host, tmp_path: Path, files: list[Path], settings: Settings, **with_block):
    """Validate ``with_block`` with the step's params model and run the step, as the engine does."""
    step_type = host.steps[STEP_NAME].step_type
    params = step_type.params.model_validate(with_block)
    ctx = step_context(tmp_path, study_inputs(files), settings)
    return ctx, step_type.run(ctx, params)


def test_the_plugin_registers_its_step(host):
    registered = host.steps[STEP_NAME]
    assert registered.plugin == "template"
    assert registered.plugin_version == template.__version__
    assert registered.step_type.params is template.CountInstancesParams
    assert set(registered.step_type.outputs) == {"instances", "series"}


def test_counts_the_instances_of_a_ct_series(host, tmp_path, ct_files):
    ctx, result = run_step(host, tmp_path, ct_files, Settings(), modality="CT", minimum=10)

    assert result.outputs == {"instances": 12, "series": 1}
    assert result.summary == "12 CT instance(s) in 1 series"
    [artifact] = ctx.artifacts
    assert artifact.kind == "report-json"
    assert artifact.path == ctx.workdir / "instance-count.json"
    report = json.loads(artifact.path.read_text())
    series_uid = pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID
    assert report["series"] == {series_uid: 12}
    assert report["provenance"]["plugin_name"] == "template"
    assert artifact.provenance["step_type"] == STEP_NAME


def test_counts_every_series_of_the_modality(host, tmp_path, ct_files):
    second = write_ct_series(tmp_path / "ct2", rows=32, cols=32, slices=5).files
    _, result = run_step(host, tmp_path, ct_files + second, Settings())
    assert result.outputs == {"instances": 17, "series": 2}


def test_too_few_instances_fail_the_step(host, tmp_path, ct_files):
    with pytest.raises(StepFailed, match="holds 12 CT instance.*fewer than the 13 required"):
        run_step(host, tmp_path, ct_files, Settings(), minimum=13)


def test_a_missing_modality_fails_unless_the_minimum_is_zero(host, tmp_path, ct_files):
    with pytest.raises(StepFailed, match="holds 0 MR instance"):
        run_step(host, tmp_path, ct_files, Settings(), modality="MR")
    _, result = run_step(host, tmp_path / "again", ct_files, Settings(), modality="MR", minimum=0)
    assert result.outputs == {"instances": 0, "series": 0}


def test_params_refuse_unknown_keys(host):
    params = host.steps[STEP_NAME].step_type.params
    with pytest.raises(ValidationError, match="minimun"):
        params.model_validate({"minimun": 3})


def test_the_report_name_comes_from_the_configuration_block(host, tmp_path, ct_files):
    settings = Settings(plugins={"template": {"report_name": "ct-count.json"}})
    ctx, _ = run_step(host, tmp_path, ct_files, settings)
    assert ctx.artifacts[0].path.name == "ct-count.json"


def test_a_bad_configuration_block_disables_the_plugin():
    settings = Settings(plugins={"template": {"report_name": "../../etc/passwd"}})
    host = build_plugin_manager(settings, autoload=False, extra_plugins={"template": template})
    assert STEP_NAME not in host.steps
    assert host.failures["template"].startswith(
        "configuration refused: plugins.template.report_name: String should match pattern"
    )


def test_the_example_workflow_is_valid(host):
    loaded = load_workflow(PLUGIN_ROOT / "workflows" / "count-ct.yaml", host.steps)
    assert [step.uses for step in loaded.workflow.steps] == [STEP_NAME, "route.folder"]


def test_the_entry_point_names_the_plugin_module():
    project = tomllib.loads((PLUGIN_ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["rtauto"] == {"template": "rtauto_plugin_template"}
    assert template.PLUGIN_NAME == "template"


@pytest.mark.integration
def test_the_step_runs_in_a_workflow_with_rtauto_run(tmp_path, ct_files):
    """The whole path: rtauto loads the plugin as a site plugin, validates the workflow, and its
    engine runs the step in a worker process."""
    workflow = PLUGIN_ROOT / "workflows" / "count-ct.yaml"
    config = tmp_path / "rtauto.yaml"
    config.write_text(
        "home: home\n"
        "plugin_modules: {template: rtauto_plugin_template}\n"
        "plugins: {template: {report_name: ct-count.json}}\n"
    )
    counted = tmp_path / "home" / "counted"  # route.folder delivers only to an existing folder
    counted.mkdir(parents=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN_ROOT / "src"), env.get("PYTHONPATH", "")])
    env["RTAUTO_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only this plugin and the built-ins
    command = [sys.executable, "-m", "rtauto.cli", "run", str(workflow), str(ct_files[0].parent)]
    command += ["--out", str(tmp_path / "out"), "--config", str(config), "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "ok"
    step, keep = summary["steps"]
    assert keep["outcome"] == "ok"  # its if: read the step's output
    assert (step["outcome"], step["plugin"], step["plugin_version"]) == (
        "ok",
        "template",
        template.__version__,
    )
    assert step["outputs"] == {"instances": 12, "series": 1}
    [report] = step["artifacts"]
    assert Path(report).name == "ct-count.json"
    assert json.loads(Path(report).read_text())["instances"] == 12
    assert [p.name for p in counted.rglob("*.json")] == ["ct-count.json"]
