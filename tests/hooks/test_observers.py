"""Observer hooks through PluginHost.notify: every observer called, failures isolated and logged."""

from __future__ import annotations

import logging

import pytest

from rtauto import hookimpl
from rtauto.hooks import build_plugin_manager

JOB = {
    "id": "job-1",
    "workflow": "thorax-autocontour",
    "workflow_hash": "3f2a",
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
    "series_instance_uid": None,
    "status": "running",
}
STEP = {
    "id": "contour",
    "uses": "autocontour.segment",
    "status": "ok",
    "attempts": 1,
    "outputs": {"structures": ["BODY"]},
    "error": None,
    "artifacts": [],
}
SERIES = {
    "series_instance_uid": "1.2.826.0.1.3680043.8.498.2",
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
    "modality": "CT",
    "instance_count": 120,
    "source": "scp",
    "attributes": {"SeriesDescription": "Planning CT"},
}

# every observer hook with the arguments the daemon passes
OBSERVER_CALLS = {
    "rtauto_series_complete": {"series": SERIES},
    "rtauto_job_started": {"job": JOB},
    "rtauto_step_finished": {"job": JOB, "step": STEP},
    "rtauto_job_finished": {"job": {**JOB, "status": "ok"}},
}


class Recorder:
    """Records every observer call it receives."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    @hookimpl
    def rtauto_series_complete(self, series):
        self.calls.append(("rtauto_series_complete", {"series": series}))

    @hookimpl
    def rtauto_job_started(self, job):
        self.calls.append(("rtauto_job_started", {"job": job}))

    @hookimpl
    def rtauto_step_finished(self, job, step):
        self.calls.append(("rtauto_step_finished", {"job": job, "step": step}))

    @hookimpl
    def rtauto_job_finished(self, job):
        self.calls.append(("rtauto_job_finished", {"job": job}))


class Exploding:
    """Raises in every observer hook."""

    @hookimpl
    def rtauto_series_complete(self, series):
        raise RuntimeError("dashboard unreachable")

    @hookimpl
    def rtauto_job_started(self, job):
        raise RuntimeError("dashboard unreachable")

    @hookimpl
    def rtauto_step_finished(self, job, step):
        raise RuntimeError("dashboard unreachable")

    @hookimpl
    def rtauto_job_finished(self, job):
        raise RuntimeError("dashboard unreachable")


@pytest.mark.parametrize("hook_name", sorted(OBSERVER_CALLS))
def test_one_observer_raising_does_not_stop_the_others(hook_name, caplog):
    before, after = Recorder(), Recorder()
    host = build_plugin_manager(
        autoload=False,
        extra_plugins={"before": before, "exploding": Exploding(), "after": after},
    )
    kwargs = OBSERVER_CALLS[hook_name]

    with caplog.at_level(logging.ERROR, logger="rtauto.plugins"):
        host.notify(hook_name, **kwargs)

    assert before.calls == [(hook_name, kwargs)]
    assert after.calls == [(hook_name, kwargs)]
    [record] = [r for r in caplog.records if r.name == "rtauto.plugins"]
    assert record.getMessage() == f"plugin exploding failed in {hook_name} (ignored)"
    assert record.exc_info is not None
    assert "dashboard unreachable" in caplog.text


def test_observers_are_called_in_plugin_order():
    order = []

    def observer(name):
        class Observer:
            @hookimpl
            def rtauto_job_started(self, job):
                order.append(name)

        return Observer()

    host = build_plugin_manager(
        autoload=False, extra_plugins={n: observer(n) for n in ("first", "second", "third")}
    )
    host.notify("rtauto_job_started", job=JOB)
    assert order == ["first", "second", "third"]


def test_an_observer_may_take_only_some_arguments():
    seen = []

    class StepsOnly:
        @hookimpl
        def rtauto_step_finished(self, step):
            seen.append(step["id"])

    host = build_plugin_manager(autoload=False, extra_plugins={"steps_only": StepsOnly()})
    host.notify("rtauto_step_finished", job=JOB, step=STEP)
    assert seen == ["contour"]


def test_notify_refuses_a_provider_hook():
    host = build_plugin_manager(autoload=False)
    with pytest.raises(ValueError, match="not an observer hook"):
        host.notify("rtauto_register_steps", register=print)


def test_notify_with_wrong_arguments_is_the_callers_error():
    recorder = Recorder()
    host = build_plugin_manager(autoload=False, extra_plugins={"recorder": recorder})
    with pytest.raises(TypeError, match="rtauto_step_finished takes"):
        host.notify("rtauto_step_finished", job=JOB)
    assert recorder.calls == []
