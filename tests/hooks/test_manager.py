"""build_plugin_manager: hook-name checks, provider and configure isolation, plugin specs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import BaseModel, ConfigDict

from rtauto import ConfigError, DestinationType, StepType, hookimpl
from rtauto.config import Settings
from rtauto.hooks import build_plugin_manager
from rtauto.hooks.specs import hookspec


def ok_step(ctx, params):
    return {"ok": True}


def steps_plugin(*names: str) -> object:
    """A plugin object that registers a step type per name."""

    class Steps:
        @hookimpl
        def rtauto_register_steps(self, register):
            for name in names:
                register(StepType(name=name, run=ok_step))

    return Steps()


def build(**plugins: object):
    return build_plugin_manager(autoload=False, extra_plugins=plugins)


def test_a_step_named_after_its_own_plugin_or_an_unknown_prefix_registers():
    host = build(mine=steps_plugin("mine.count", "vendorx.check"))
    assert {"mine.count", "vendorx.check"} <= set(host.steps) and not host.failures


# --------------------------------------------------------------------------------------------
# hook names
# --------------------------------------------------------------------------------------------


def test_a_typo_in_a_hook_name_disables_the_plugin():
    class Typo:
        @hookimpl
        def rtauto_register_step(self, register):  # "step", not "steps"
            register(StepType(name="typo.step", run=ok_step))

        @hookimpl
        def rtauto_register_destinations(self, register):
            register(DestinationType(name="typo-dest", config=BaseModel, send=print))

    host = build(typo=Typo(), good=steps_plugin("good.step"))

    assert "typo" not in host.plugins
    assert host.failures["typo"] == "rtauto_register_step matches no hook specification"
    assert "typo-dest" not in host.destination_types  # its valid hooks are not called either
    assert host.pm.get_plugin("typo") is None
    assert "good.step" in host.steps


def test_an_unmarked_hook_function_is_an_error_not_silence():
    class Unmarked:
        def rtauto_register_steps(self, register):
            register(StepType(name="unmarked.step", run=ok_step))

    host = build(unmarked=Unmarked())
    assert host.failures["unmarked"] == (
        "rtauto_register_steps is not marked with @rtauto.hookimpl"
    )


def test_unmarked_functions_with_other_names_are_ignored():
    class Helpers:
        rtauto_minimum_version = "0.1"  # not callable: not a hook

        def count_series(self, study):
            return len(study.series)

        @hookimpl
        def rtauto_register_steps(self, register):
            register(StepType(name="helpers.step", run=ok_step))

    host = build(helpers=Helpers())
    assert host.failures == {}
    assert host.plugins["helpers"].hooks == ("rtauto_register_steps",)


def test_an_optional_hook_without_a_spec_is_accepted():
    class Optional:
        @hookimpl(optionalhook=True)
        def othertool_before_send(self, files):
            return files

    host = build(optional=Optional())
    assert "optional" in host.plugins
    assert host.failures == {}


def test_a_hook_implementation_with_unknown_arguments_is_reported():
    class BadArguments:
        @hookimpl
        def rtauto_register_steps(self, register, registry):
            raise AssertionError("never called")

    host = build(bad=BadArguments(), good=steps_plugin("good.step"))
    assert host.failures["bad"].startswith("registration failed")
    assert "registry" in host.failures["bad"]
    assert "good.step" in host.steps


def test_observer_and_provider_hooks_cannot_be_wrappers():
    class Wrapper:
        @hookimpl(wrapper=True)
        def rtauto_job_finished(self, job):
            return (yield)

    host = build(wrapper=Wrapper())
    assert "rtauto_job_finished cannot be implemented as a wrapper" in host.failures["wrapper"]


# --------------------------------------------------------------------------------------------
# provider hooks: rtauto_register_steps, rtauto_register_destinations,
# rtauto_register_model_backends
# --------------------------------------------------------------------------------------------


class RecordParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = "BODY"


def test_steps_destinations_and_backends_are_collected():
    class DestinationConfig(BaseModel):
        path: str

    def send(config, files):
        return None

    def load_backend(card, path):
        return SimpleNamespace(predict=lambda array: array)

    class Provider:
        @hookimpl
        def rtauto_register_steps(self, register):
            register(
                StepType(
                    name="vendor.record",
                    run=ok_step,
                    params=RecordParams,
                    outputs={"ok": "always true"},
                )
            )

        @hookimpl
        def rtauto_register_destinations(self, register):
            register(DestinationType(name="vendor-archive", config=DestinationConfig, send=send))

        @hookimpl
        def rtauto_register_model_backends(self, register):
            register("vendor-runtime", load_backend)

    host = build(vendor=Provider())

    assert host.failures == {}
    assert host.steps["vendor.record"].step_type.params is RecordParams
    assert host.steps["vendor.record"].plugin == "vendor"
    assert host.destination_types["vendor-archive"].send is send
    assert host.model_backends["vendor-runtime"] is load_backend
    assert host.plugins["vendor"].hooks == (
        "rtauto_register_destinations",
        "rtauto_register_model_backends",
        "rtauto_register_steps",
    )


def test_a_duplicate_step_name_rejects_the_second_plugin():
    host = build(first=steps_plugin("dup.step"), second=steps_plugin("own.step", "dup.step"))

    assert host.steps["dup.step"].plugin == "first"
    assert host.failures["second"] == (
        "rtauto_register_steps failed: plugin second registers step 'dup.step', already "
        "registered by plugin first"
    )
    assert "own.step" not in host.steps  # the rejected plugin's other steps are dropped too
    assert "second" not in host.plugins


def test_a_plugin_registering_the_same_step_twice_is_rejected():
    host = build(twice=steps_plugin("twice.step", "twice.step"))
    assert "'twice.step', already registered by plugin twice" in host.failures["twice"]
    assert "twice.step" not in host.steps


def test_duplicate_destination_types_and_backends_are_rejected():
    class Destinations:
        def __init__(self, backend: str):
            self.backend = backend

        @hookimpl
        def rtauto_register_destinations(self, register):
            register(DestinationType(name="archive", config=BaseModel, send=print))

        @hookimpl
        def rtauto_register_model_backends(self, register):
            register(self.backend, print)

    host = build(one=Destinations("onnx"), two=Destinations("torchscript"))
    assert "destination type 'archive', already registered by plugin one" in host.failures["two"]
    assert "torchscript" not in host.model_backends
    assert host.model_backends == {"onnx": print}


@pytest.mark.parametrize(
    ("registered", "message"),
    [
        ("not a step type", "not a StepType"),
        (StepType(name="bad.params", run=ok_step, params=dict), "must be a pydantic model"),
        (StepType(name="Bad Name!", run=ok_step), "a step name is PLUGIN.VERB"),
        (StepType(name="nodot", run=ok_step), "a step name is PLUGIN.VERB"),
        (StepType(name="route.folder2", run=ok_step), "under plugin route's name"),
    ],
)
def test_register_refuses_what_is_not_a_valid_step_type(registered, message):
    class Bad:
        @hookimpl
        def rtauto_register_steps(self, register):
            register(registered)

    assert message in build(bad=Bad()).failures["bad"]


def test_a_provider_hook_that_raises_drops_everything_its_plugin_registered():
    events = []

    class Flaky:
        @hookimpl
        def rtauto_register_steps(self, register):
            register(StepType(name="flaky.first", run=ok_step))

        @hookimpl
        def rtauto_register_destinations(self, register):
            register(DestinationType(name="flaky-dest", config=BaseModel, send=print))
            raise OSError("vendor SDK not found in /opt/vendor")

        @hookimpl
        def rtauto_job_finished(self, job):
            events.append(job)

    host = build(flaky=Flaky(), good=steps_plugin("good.step"))

    reason = host.failures["flaky"]
    assert reason.startswith("rtauto_register_destinations failed: vendor SDK not found")
    assert "Traceback" in reason and "OSError" in reason
    assert "flaky.first" not in host.steps
    assert "flaky-dest" not in host.destination_types
    assert "flaky" not in host.plugins
    assert "good.step" in host.steps
    host.notify("rtauto_job_finished", job={"id": "j1"})
    assert events == []  # a disabled plugin hears nothing


def test_a_provider_hook_may_take_no_arguments():
    calls = []

    class NoArguments:
        @hookimpl
        def rtauto_register_model_backends(self):
            calls.append("called")

    host = build(noargs=NoArguments())
    assert calls == ["called"]
    assert "noargs" in host.plugins


# --------------------------------------------------------------------------------------------
# rtauto_configure
# --------------------------------------------------------------------------------------------


class ThresholdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold_hu: float = -300


class Picky:
    """Validates its configuration block at start-up, as a vendor plugin should."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def rtauto_configure(self, settings):
        block = settings.plugins.get("picky", {})
        try:
            self.seen.append(ThresholdConfig.model_validate(block))
        except ValueError as exc:
            raise ConfigError(f"plugins.picky: {exc.errors()[0]['msg']}") from None

    @hookimpl
    def rtauto_register_steps(self, register):
        register(StepType(name="picky.threshold", run=ok_step))


def test_rtauto_configure_reads_its_block():
    picky = Picky()
    host = build_plugin_manager(
        Settings(plugins={"picky": {"threshold_hu": -500}}),
        autoload=False,
        extra_plugins={"picky": picky},
    )
    assert picky.seen == [ThresholdConfig(threshold_hu=-500)]
    assert "picky.threshold" in host.steps


def test_rtauto_configure_rejecting_its_config_disables_the_plugin():
    settings = Settings(plugins={"picky": {"threshold_hu": "very low"}})
    host = build_plugin_manager(
        settings, autoload=False, extra_plugins={"picky": Picky(), "good": steps_plugin("g.s")}
    )
    assert host.failures["picky"] == (
        "configuration refused: plugins.picky: Input should be a valid number, "
        "unable to parse string as a number"
    )  # a ConfigError is shown without a traceback
    assert "picky" not in host.plugins
    assert "picky.threshold" not in host.steps
    assert "g.s" in host.steps


def test_an_unexpected_error_in_rtauto_configure_keeps_its_traceback():
    class Crashes:
        @hookimpl
        def rtauto_configure(self, settings):
            return settings.plugins["crashes"]["missing"]

    host = build_plugin_manager(Settings(), autoload=False, extra_plugins={"crashes": Crashes()})
    assert host.failures["crashes"].startswith("configuration refused: 'crashes'")
    assert "KeyError" in host.failures["crashes"]


def test_rtauto_configure_is_not_called_without_settings():
    picky = Picky()
    host = build(picky=picky)
    assert picky.seen == []
    assert "picky" in host.plugins


# --------------------------------------------------------------------------------------------
# rtauto_addhooks: plugins declaring hook specifications of their own
# --------------------------------------------------------------------------------------------


class VendorSpecs:
    """Hook specifications a plugin declares for its own extension point."""

    @hookspec
    def vendorcheck_register_checks(self, register):
        """Register plan checks: ``register(name, function)``."""


class Declaring:
    @hookimpl
    def rtauto_addhooks(self, pluginmanager):
        pluginmanager.add_hookspecs(VendorSpecs)


class ImplementsChecks:
    @hookimpl
    def vendorcheck_register_checks(self, register):
        register("max_dose", lambda plan: True)


def test_a_plugin_declares_a_hook_another_plugin_implements():
    # "a_impl" comes before "z_declaring" in plugin order: the spec arrives after its impl
    host = build(a_impl=ImplementsChecks(), z_declaring=Declaring())

    assert host.failures == {}
    checks = {}
    host.hook.vendorcheck_register_checks(register=checks.__setitem__)
    assert list(checks) == ["max_dose"]
    assert host.plugins["a_impl"].hooks == ("vendorcheck_register_checks",)
    assert list(host.plugins) == ["route", "a_impl", "z_declaring"]  # plugin order kept


def test_an_implementation_that_misfits_a_plugin_spec_is_blamed_on_its_plugin():
    class WrongArguments:
        @hookimpl
        def vendorcheck_register_checks(self, register, extra):
            raise AssertionError("never called")

    host = build(a_wrong=WrongArguments(), z_declaring=Declaring())
    assert "z_declaring" in host.plugins
    assert host.failures["a_wrong"].startswith("registration failed")


def test_a_typo_in_a_plugin_declared_hook_is_rejected():
    class Typo:
        @hookimpl
        def vendorcheck_register_chekcs(self, register):
            raise AssertionError("never called")

    host = build(declaring=Declaring(), typo=Typo())
    assert host.failures["typo"] == "vendorcheck_register_chekcs matches no hook specification"


def test_a_raising_rtauto_addhooks_disables_its_plugin():
    class Broken:
        @hookimpl
        def rtauto_addhooks(self, pluginmanager):
            raise RuntimeError("spec module missing")

        @hookimpl
        def rtauto_register_steps(self, register):
            register(StepType(name="broken.step", run=ok_step))

    host = build(broken=Broken())
    assert host.failures["broken"] == "registration failed: spec module missing"
    assert host.pm.get_plugin("broken") is None
    assert "broken.step" not in host.steps


def test_a_step_of_a_plugin_that_failed_to_load_is_explained():
    from rtauto.engine.worker import run_task
    from rtauto.errors import WorkflowError
    from rtauto.workflow import load_workflow_text

    host = build(brk="rtauto_module_that_does_not_exist")
    assert "brk" in host.failures
    text = "name: b\ntrigger: {modality: CT}\nsteps:\n  - id: x\n    uses: brk.check\n"
    with pytest.raises(WorkflowError) as refused:
        load_workflow_text(text, "b.yaml", host.steps)
    [problem] = refused.value.problems
    assert problem.startswith("b.yaml:5:11: step 'x': unknown step type 'brk.check': plugin 'brk'")
    assert "failed to load (import failed: ModuleNotFoundError(" in problem
    assert "Traceback" not in problem  # the first line only; `rtauto plugins` shows the rest
    # a job that reaches a worker where the plugin is broken fails its step with the reason
    result = run_task(host, {"uses": "brk.check"})
    assert result["status"] == "fail"
    assert result["error"].startswith(
        "step type 'brk.check' is not available: plugin failed to load: import failed: "
        "ModuleNotFoundError("
    )
