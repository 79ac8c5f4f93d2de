"""The engine tests' fixture: a job store holding a CT series, and a site plugin of steps
that count their runs, fail, sleep or write reports, run by real worker processes, and of a
destination type that is down, up, hangs or crashes as a file says."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from rtauto.config import Settings
from rtauto.engine.engine import Engine
from rtauto.hooks import build_plugin_manager
from rtauto.ingest.assembler import create_job_for
from rtauto.ingest.spool import Spool
from rtauto.store import Store
from rtauto.testing import write_ct_series
from rtauto.workflow import load_workflow_text

STEPS_MODULE = '''
"""Steps for the engine tests. VERSION is rewritten by the upgrade test."""
import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from rtauto import DestinationType, StepFailed, StepResult, StepRetry, StepType, hookimpl

VERSION = 1


class P(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_times: int = 0
    seconds: float = 0.0
    value: str = ""


def _count(ctx, name):
    counter = ctx.job_dir / f"{name}.count"
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    return n


def flaky(ctx, params):
    n = _count(ctx, ctx.step_id)
    if n <= params.fail_times:
        raise StepRetry(f"transient failure {n}", after=0.05)
    return StepResult(outputs={"runs": n})


def bad_data(ctx, params):
    _count(ctx, ctx.step_id)
    raise StepFailed("the series has no slices in the expected orientation")


def sleepy(ctx, params):
    _count(ctx, ctx.step_id)
    time.sleep(params.seconds)
    return {"slept": params.seconds}


def emit(ctx, params):
    _count(ctx, ctx.step_id)
    report = ctx.workdir / "report.json"
    report.write_text(json.dumps({"value": params.value, "version": VERSION}))
    ctx.add_artifact(report, kind="report-json")
    return StepResult(outputs={"value": params.value, "version": VERSION,
                               "instances": len(ctx.study.files)})


def measure(ctx, params):
    import numpy as np

    if params.value == "object":
        return {"mask": object()}
    mean = np.float32(1.5)
    return {"mean_hu": mean, "n": np.int64(3), "ok": np.bool_(True), "shift": np.array([0.5, -1.0]),
            "rois": {"Lung_L", "Cord"}, "where": Path("/data/x"), "pair": (1, 2)}


def numbers(ctx, params):
    return {"series": [ctx.series_number(0), ctx.series_number(1)], "index": ctx.step_index}


def outside(ctx, params):
    stray = ctx.job_dir / "stray.txt"  # not in the step's workdir
    stray.write_text("x")
    ctx.add_artifact(stray, kind="report-txt")


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gate: Path  # says what the destination does now: down (or missing), up, hang or crash


def gate_send(config, files):
    state = config.gate.read_text().strip() if config.gate.exists() else "down"
    if state == "hang":  # a hard-mounted share whose server is gone
        time.sleep(3600)
    if state == "crash":  # a native extension that takes its process down
        os._exit(3)
    if state != "up":
        raise StepRetry("the destination is down")
    with open(config.gate.with_name("received.txt"), "a") as received:
        received.writelines(f"{Path(path).name}\\n" for path in files)


@hookimpl
def rtauto_register_destinations(register):
    register(DestinationType(name="t.gate", config=GateConfig, send=gate_send))


@hookimpl
def rtauto_register_steps(register):
    register(StepType(name="t.outside", params=P, run=outside))
    register(StepType(name="t.numbers", params=P, run=numbers))
    register(StepType(name="t.measure", params=P, run=measure))
    register(StepType(name="t.flaky", params=P, run=flaky))
    register(StepType(name="t.bad", params=P, run=bad_data))
    register(StepType(name="t.sleep", params=P, run=sleepy))
    register(StepType(name="t.emit", params=P, run=emit))
'''


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    module_name = f"rtauto_engine_steps_{uuid.uuid4().hex[:8]}"
    plugin_dir = tmp_path / "site"
    plugin_dir.mkdir()
    (plugin_dir / f"{module_name}.py").write_text(STEPS_MODULE)
    monkeypatch.syspath_prepend(str(plugin_dir))
    settings = Settings(
        home=tmp_path / "home",
        plugin_modules={"t": module_name},
        executor={"workers": 2, "poll_seconds": 0.05},
    )
    settings.ensure_dirs()
    store = Store(settings.database_url, migrate=True)
    series = write_ct_series(tmp_path / "ct", rows=16, cols=16, slices=3)
    spool = Spool(settings)
    for path in series.files:
        store.record_instance(spool.ingest_file(path))
    host = build_plugin_manager(settings)
    assert "t.flaky" in host.steps, host.failures
    engines: list[Engine] = []

    class Env:
        pass

    e = Env()
    e.settings, e.store, e.host, e.series = settings, store, host, series
    e.module_path = plugin_dir / f"{module_name}.py"

    def engine() -> Engine:
        eng = Engine(settings, store, build_plugin_manager(settings))
        engines.append(eng)
        return eng

    def job(text: str):
        loaded = load_workflow_text(textwrap.dedent(text), "test.yaml", host.steps)
        return create_job_for(
            store,
            settings,
            loaded,
            scope="series",
            study_uid=series.study_instance_uid,
            series_uid=series.series_instance_uid,
            input_series=[series.series_instance_uid],
            key_series=[series.series_instance_uid],
            dedupe_key=uuid.uuid4().hex,
        )

    e.engine, e.job = engine, job
    yield e
    for eng in engines:
        eng.close()
    store.close()
    sys.modules.pop(module_name, None)
