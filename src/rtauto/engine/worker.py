"""The worker process: runs one step at a time, with the plugins as installed when it started.

The daemon talks to a worker over a pipe: it sends a task (a JSON-able dict), the worker
answers with the step's result. A fresh worker builds its own plugin manager, so a plugin or
model upgraded on disk is used by the next worker; the pool recycles workers when the
installed plugins change. A task of kind ``dead_letters`` sends one job's dead letters again
(the daemon's background retry, :mod:`rtauto.route.dead_letters`) instead of running a step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Mapping
from datetime import date, datetime
from enum import Enum
from multiprocessing.connection import Connection
from pathlib import Path, PurePath
from typing import Any

from rtauto.errors import StepFailed, StepRetry

log = logging.getLogger("rtauto.worker")


def _study_from_json(data: Mapping[str, Any]) -> Any:
    from rtauto.steps import InputInstance, InputSeries, StudyInputs

    return StudyInputs(
        study_instance_uid=data["study_instance_uid"],
        patient_id=data["patient_id"],
        series=tuple(
            InputSeries(
                series_instance_uid=s["series_instance_uid"],
                study_instance_uid=s["study_instance_uid"],
                modality=s["modality"],
                attributes=s.get("attributes") or {},
                instances=tuple(
                    InputInstance(
                        sop_instance_uid=i["sop_instance_uid"],
                        sop_class_uid=i["sop_class_uid"],
                        series_instance_uid=s["series_instance_uid"],
                        path=Path(i["path"]),
                    )
                    for i in s["instances"]
                ),
            )
            for s in data["series"]
        ),
    )


def _previous_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    from rtauto.steps import Artifact, PreviousStep

    return {
        sid: PreviousStep(
            step_id=sid,
            status=p["status"],
            outputs=p.get("outputs") or {},
            artifacts=tuple(Artifact.from_json(a) for a in p.get("artifacts", [])),
        )
        for sid, p in data.items()
    }


class StepLogHandler(logging.FileHandler):
    """Writes a step's log records into its working folder (step.log)."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


def run_task(host: Any, task: Mapping[str, Any]) -> dict[str, Any]:
    """Run one step task in this process and return its result (never raises)."""
    from pydantic import ValidationError

    from rtauto.config import Destination, Settings
    from rtauto.steps import Provenance, StepContext, StepResult
    from rtauto.uids import set_uid_root

    uses = task["uses"]
    registered = host.steps.get(uses)
    base = {"plugin": "", "plugin_version": "", "outputs": {}, "artifacts": [], "summary": ""}
    if registered is None:
        failure = host.steps.failure_of(uses)
        why = f": plugin failed to load: {failure[1]}" if failure else ""
        return {**base, "status": "fail", "error": f"step type {uses!r} is not available{why}"}
    base["plugin"], base["plugin_version"] = registered.plugin, registered.plugin_version
    step_type = registered.step_type

    workdir = Path(task["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    handler = StepLogHandler(workdir / "step.log")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        try:
            params = step_type.params.model_validate(task["params"])
        except ValidationError as exc:
            return {**base, "status": "fail", "error": f"invalid params for {uses}: {exc}"}
        settings = Settings.model_validate(task["settings"])
        set_uid_root(settings.uid_root)
        provenance = Provenance(
            rtauto_version=task["rtauto_version"],
            workflow_name=task["workflow_name"],
            workflow_hash=task["workflow_hash"],
            job_id=task["job_id"],
            step_id=task["step_id"],
            step_type=uses,
            plugin_name=registered.plugin,
            plugin_version=registered.plugin_version,
        )
        ctx = StepContext(
            job_id=task["job_id"],
            step_id=task["step_id"],
            step_type=uses,
            attempt=task["attempt"],
            workdir=workdir,
            job_dir=Path(task["job_dir"]),
            study=_study_from_json(task["study"]),
            previous=_previous_from_json(task["previous"]),
            provenance=provenance,
            settings=settings,
            destinations={
                name: Destination.model_validate(d) for name, d in task["destinations"].items()
            },
            logger=logging.getLogger(f"rtauto.step.{task['step_id']}"),
            store_url=task.get("store_url"),
            max_attempts=task.get("max_attempts", 1),
            destination_types=host.destination_types,
            dry_run=Path(task["dry_run"]) if task.get("dry_run") else None,
            step_index=task.get("step_index", 0),
        )
        try:
            returned = step_type.run(ctx, params)
        except StepRetry as exc:
            return {**base, "status": "retry", "error": str(exc), "retry_after": exc.after}
        except StepFailed as exc:
            return {**base, "status": "fail", "error": str(exc)}
        except (Exception, SystemExit) as exc:  # sys.exit() in a step fails the step alone
            ctx.logger.error("step raised:\n%s", traceback.format_exc())
            return {
                **base,
                "status": "fail",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        if returned is None:
            result = StepResult()
        elif isinstance(returned, StepResult):
            result = returned
        elif isinstance(returned, Mapping):
            result = StepResult(outputs=dict(returned))
        else:
            return {
                **base,
                "status": "fail",
                "error": f"step {uses} returned {type(returned).__name__}, not a StepResult",
            }
        try:
            outputs = plain_outputs(result.outputs)
        except TypeError as exc:
            return {**base, "status": "fail", "error": f"step {uses}: {exc}"}
        artifacts = []
        for artifact in [*ctx.artifacts, *[a for a in result.artifacts if a not in ctx.artifacts]]:
            data = artifact.to_json()
            data["sha256"] = artifact.sha256()
            artifacts.append(data)
        return {
            **base,
            "status": "ok",
            "outputs": outputs,
            "summary": result.summary,
            "artifacts": artifacts,
            "error": None,
        }
    finally:
        root.removeHandler(handler)
        handler.close()


def send_dead_letters_task(host: Any, settings: Any, task: Mapping[str, Any]) -> dict[str, Any]:
    """Send the dead letters of job ``task["job_id"]`` again, with the store at
    ``task["store_url"]`` (:func:`rtauto.route.replay.send_dead_letters`); the result holds
    what happened to each item as plain data. Here, a destination's ``send`` that hangs is
    killed with its worker past the retry's time limit, and one that crashes takes no daemon
    down."""
    from rtauto.route.replay import send_dead_letters
    from rtauto.store import Store

    store = Store(task["store_url"])
    try:
        results = send_dead_letters(store, settings, host, task["job_id"])
    finally:
        store.close()
    return {"status": "ok", "error": None, "results": [r.to_json() for r in results]}


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "dtype") and hasattr(value, "tolist"):
        return _plain(value.tolist(), where)  # NumPy scalars and arrays, tensors
    if isinstance(value, Enum):
        return _plain(value.value, where)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping):
        plain = {}
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"output {where!r} has a key of type {type(key).__name__}")
            plain[str(key)] = _plain(item, f"{where}.{key}")
        return plain
    if isinstance(value, set | frozenset):
        items = [_plain(item, where) for item in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"output {where!r} is of type {type(value).__name__}, which a workflow cannot read: "
        "return numbers, strings, booleans, None, or lists and mappings of them"
    )


def plain_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """A step's outputs as the store keeps them and ``if:`` reads them: NumPy scalars and
    arrays become numbers and lists, tuples and sets lists, paths strings, dates ISO text.
    Raises TypeError, naming the output, for anything else."""
    return {str(key): _plain(value, str(key)) for key, value in outputs.items()}


def _exit_with_parent(parent_pid: int) -> None:
    """Ask the kernel to kill this worker when the daemon dies (Linux), so none is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def worker_main(conn: Connection, settings_json: dict[str, Any], warm: list[str] | None) -> None:
    """Entry point of a worker process."""
    _exit_with_parent(settings_json.get("_parent_pid", os.getppid()))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    from rtauto.config import Settings
    from rtauto.hooks import build_plugin_manager

    settings_json = {k: v for k, v in settings_json.items() if not k.startswith("_")}
    settings = Settings.model_validate(settings_json)
    # the console (the daemon's log, or rtauto run's stderr) shows log_level and above; each
    # step's step.log keeps its INFO lines whatever that level is
    logging.basicConfig(
        level=min(logging.INFO, logging.getLevelName(settings.log_level)),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for console in logging.getLogger().handlers:
        console.setLevel(settings.log_level)
    host = build_plugin_manager(settings)
    warmed = []
    for name, registered in host.steps.items():
        if registered.step_type.warmup is None or (warm is not None and name not in warm):
            continue
        try:
            registered.step_type.warmup()
            warmed.append(name)
        except Exception:
            log.exception("warm-up of step %s failed (the step will load on first use)", name)
    conn.send({"ready": True, "pid": os.getpid(), "warmed": warmed})
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            if task.get("kind") == "dead_letters":
                result = send_dead_letters_task(host, settings, task)
            else:
                result = run_task(host, task)
        except BaseException as exc:  # keep the worker answering whatever a plugin does
            result = {
                "status": "fail",
                "error": f"worker error: {exc!r}",
                "outputs": {},
                "artifacts": [],
                "summary": "",
                "plugin": "",
                "plugin_version": "",
            }
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return
