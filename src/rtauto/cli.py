"""The ``rtauto`` command line.

Every command that reads state takes ``--config`` (the daemon configuration file) and
``--home`` (the folder that holds all state); ``RTAUTO_CONFIG`` and ``RTAUTO_HOME`` set them
from the environment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from rtauto import __version__
from rtauto.config import Settings, load_settings
from rtauto.errors import ConfigError, IngestError, RtautoError, WorkflowError

app = typer.Typer(
    name="rtauto",
    help="rtauto: DICOM ingest, YAML workflows and pluggable steps for radiotherapy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="RTAUTO_CONFIG", help="daemon configuration (YAML)"),
]
HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="RTAUTO_HOME", help="folder for all state")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="STEP.PARAM=VALUE (a YAML value) changing the workflow; repeatable"),
]
ModelsOpt = Annotated[
    Path | None, typer.Option("--models", help="model registry folder (models_dir)")
]


def _die(message: str, code: int = 2) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _settings(config: Path | None, home: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, home=str(home) if home else None, **overrides)
    except ConfigError as exc:
        _die(f"rtauto: invalid configuration:\n{exc}")
        raise  # unreachable


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # alembic lists each of its own plugins at every start; its migrations still log
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _host(settings: Settings | None = None, *, report: bool = True) -> Any:
    """The plugin host. The commands say which plugins failed themselves (``report``: one
    warning line each on stderr), so the plugin manager's own log lines are held back."""
    from rtauto.hooks import build_plugin_manager
    from rtauto.hooks.manager import failure_summary

    plugins_log = logging.getLogger("rtauto.plugins")
    muted = logging.NullHandler()
    propagate, plugins_log.propagate = plugins_log.propagate, False
    plugins_log.addHandler(muted)
    try:
        host = build_plugin_manager(settings)
    finally:
        plugins_log.removeHandler(muted)
        plugins_log.propagate = propagate
    if report:
        for name, reason in host.failures.items():
            typer.echo(f"warning: plugin {name} is disabled: {failure_summary(reason)}", err=True)
    return host


def _store(settings: Settings, migrate: bool = True, *, existing: bool = False) -> Any:
    """The job store. ``existing``: for commands that only read or replay what a daemon or a
    run recorded, a SQLite store that does not exist yet is an error (a mistyped --home
    would otherwise answer "no jobs" from a new, empty store)."""
    from rtauto.store import Store

    if existing and settings.store_url is None and not settings.database_path.exists():
        _die(
            f"rtauto: no job store at {settings.database_path} (is --home or --config right?)",
            1,
        )
    return Store(settings.database_url, migrate=migrate)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rtauto {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="show the version")
    ] = False,
) -> None:
    """rtauto command line."""


# --------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------


@app.command()
def serve(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    port: Annotated[int | None, typer.Option(help="storage SCP port (0: any free)")] = None,
    ae_title: Annotated[str | None, typer.Option("--ae-title", help="storage SCP AE")] = None,
    workflows: Annotated[Path | None, typer.Option(help="workflows folder")] = None,
    watch: Annotated[
        list[Path] | None, typer.Option(help="drop folder to watch (repeatable)")
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """Run the daemon: storage SCP, drop folders, workflows, jobs, routing."""
    overrides: dict[str, Any] = {
        "scp.port": port,
        "scp.ae_title": ae_title,
        "workflows_dir": str(workflows) if workflows else None,
        "log_level": log_level,
    }
    if watch:
        overrides["watch"] = [{"path": str(p)} for p in watch]
    settings = _settings(config, home, **overrides)
    _logging(settings.log_level)
    from rtauto.daemon import Daemon

    try:
        Daemon(settings, config_path=config).serve_forever()
    except RtautoError as exc:
        _die(f"rtauto: {exc}", 1)


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


def _collect_files(
    inputs: list[Path], command: str = "run", exclude: Path | None = None
) -> list[Path]:
    """The files given and those under the folders given, symbolic links to folders followed
    (each folder read once). Hidden files and folders (``.rtauto``, ``.attempts``) are left
    out, and so is ``exclude`` (the output folder, when it lies inside an input folder: a
    run never reads its own results back as input)."""
    skip = exclude.resolve() if exclude is not None else None
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found: list[Path] = []
            seen: set[Path] = set()
            for folder, dirs, names in os.walk(item, followlinks=True):
                real = Path(folder).resolve()
                if real in seen or real == skip:
                    dirs[:] = []
                    continue
                seen.add(real)
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [
                    Path(folder, n)
                    for n in names
                    if not n.startswith(".") and Path(folder, n).is_file()
                ]
            files += sorted(found)
        elif item.is_file():
            files.append(item)
        else:
            _die(f"rtauto {command}: {item}: no such file or folder")
    return files


def _print_job(summary: dict[str, Any]) -> None:
    typer.echo(
        f"job {summary['job']}  {summary['workflow']}  {summary['status'].upper()}"
        + (f"  ({summary['error']})" if summary.get("error") else "")
    )
    for resume in summary.get("resumes", []):
        typer.echo(
            f"  resumed {resume['at']} by {resume['by']} ({resume['reason']}): "
            + ", ".join(resume["steps"])
        )
        if resume.get("earlier_error"):
            typer.echo(f"    it had ended FAIL: {resume['earlier_error'].splitlines()[0]}")
    for step in summary["steps"]:
        line = f"  {step['id']:<16} {step['uses']:<28} {step['outcome']}"
        if step.get("outputs", {}).get("outcome"):
            line += f" [{step['outputs']['outcome']}]"
        if step.get("error"):
            line += f"  {step['error'].splitlines()[0]}"
        elif step.get("summary"):
            line += f"  {step['summary']}"
        typer.echo(line)
        for path in step["artifacts"]:
            typer.echo(f"      -> {path}")
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for delivery in summary.get("deliveries", []):
        key = (delivery["step"], delivery["destination"], delivery["status"])
        groups.setdefault(key, []).append(delivery)
    if groups:
        typer.echo("  deliveries:")
    for (step_id, destination, status), items in sorted(groups.items()):
        errors = sorted({d["error"].splitlines()[0] for d in items if d.get("error")})
        why = f"  ({errors[0]})" if errors and status != "delivered" else ""
        typer.echo(f"    {step_id} -> {destination}: {len(items)} {status}{why}")


@app.command()
def run(
    workflow: Annotated[Path, typer.Argument(help="workflow YAML file")],
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files or folders")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the job's outputs")],
    overrides: SetOpt = None,
    models: ModelsOpt = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="run every step but deliver nothing: what each routing step would send is "
            "copied to OUT/dry-run/<destination>/ instead (destinations are still checked)",
        ),
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "WARNING",
) -> None:
    """Run one workflow once on files or folders, with the daemon's engine but no daemon."""
    from rtauto.engine.engine import Engine
    from rtauto.ingest.assembler import create_job_for
    from rtauto.ingest.spool import Spool, SpoolFull
    from rtauto.store.summary import job_summary, name_inputs

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings, host = _without_daemon(
        config,
        home if home else (out / ".rtauto" if not config else None),
        log_level,
        models_dir=models.resolve() if models else None,
    )
    loaded = _load_workflow(workflow, overrides, host, settings)
    settings.ensure_dirs()
    store = _store(settings)
    spool = Spool(settings)
    series: list[str] = []
    instances: dict[str, None] = {}  # the inputs' SOP Instance UIDs, in order, once each
    originals: dict[str, str] = {}  # spool path -> the input file, for error messages
    study_uid = None
    refused = 0
    for path in _collect_files(inputs, exclude=out):
        try:
            record = spool.ingest_file(path, source="run")
        except SpoolFull as full:
            _die(f"rtauto run: {full.reason}; {path} and the inputs after it were not read", 1)
        except IngestError as exc:
            refused += 1
            typer.echo(f"refused {path}: {exc.reason} (quarantined)", err=True)
            continue
        store.record_instance(record)
        instances[record.sop_instance_uid] = None
        originals.setdefault(record.path, str(path))
        study_uid = study_uid or record.study_instance_uid
        if record.series_instance_uid not in series:
            series.append(record.series_instance_uid)
    if not series:
        _die("rtauto run: no DICOM instance could be read from the inputs")
    job = create_job_for(
        store,
        settings,
        loaded,
        scope="study" if len(series) > 1 else "series",
        study_uid=study_uid,
        series_uid=series[0] if len(series) == 1 else None,
        input_series=series,
        key_series=series,
        dedupe_key=f"run:{uuid.uuid4().hex}",
        work_dir=out / "job",
        # only these inputs: an earlier run into the same --out may have left other
        # instances of these series in its spool
        input_instances=list(instances),
    )
    warm = sorted({s.uses for s in loaded.workflow.steps})
    engine = Engine(settings, store, host, warm=warm, dry_run=out / "dry-run" if dry_run else None)
    try:
        engine.run_until_done([job.id])
    finally:
        engine.close()
    summary = job_summary(store, job.id)
    name_inputs(summary, settings.spool_dir, originals)
    summary["refused_inputs"] = refused
    if dry_run:
        summary["dry_run"] = str(out / "dry-run")
    (out / "job.json").write_text(json.dumps(summary, indent=2))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_job(summary)
        typer.echo(f"outputs in {out / 'job'}")
        if dry_run:
            typer.echo(
                f"dry run: nothing was delivered; what would have been is in {out / 'dry-run'}"
            )
    raise typer.Exit(0 if summary["status"] == "ok" else 1)


def _without_daemon(
    config: Path | None,
    home: Path | None,
    log_level: str,
    *,
    workers: int | None = None,
    models_dir: Path | None = None,
    own_store: bool = False,
) -> tuple[Settings, Any]:
    """Settings (no SCP) and the plugin host for ``run`` and ``batch``; warns of plugins
    that failed to load. ``own_store``: the job store is SQLite under ``home`` whatever the
    configuration says (a daemon sharing a configured store would run these jobs too)."""
    from rtauto.uids import set_uid_root

    settings = _settings(config, home)
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        _die(f"--log-level {log_level}: one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    update: dict[str, Any] = {
        "scp": settings.scp.model_copy(update={"enabled": False}),
        "log_level": log_level.upper(),  # the worker processes' console too
    }
    if own_store:
        update["store_url"] = None
    if workers is not None:
        update["executor"] = settings.executor.model_copy(update={"workers": workers})
    if models_dir is not None:
        update["models_dir"] = models_dir
    settings = settings.model_copy(update=update)
    _logging(log_level)
    set_uid_root(settings.uid_root)
    return settings, _host(settings)


def _load_workflow(
    workflow: Path, overrides: list[str] | None, host: Any, settings: Settings
) -> Any:
    """The workflow file with its ``--set`` overrides, checked; exits 2 naming the problems."""
    from rtauto.workflow import load_workflow_with_overrides

    try:
        return load_workflow_with_overrides(
            workflow,
            overrides or [],
            host.steps,
            destinations=set(settings.destinations),
            destination_types=host.destination_types,
        )
    except WorkflowError as exc:
        _die("\n".join(exc.problems))
    except ValueError as exc:
        _die(str(exc))
    raise AssertionError("unreachable")


@app.command()
def batch(
    workflow: Annotated[Path, typer.Argument(help="workflow YAML file")],
    cohort: Annotated[list[Path], typer.Argument(help="folders (or files) holding the cohort")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the cases and report")],
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, max=64, help="cases run at once")] = 2,
    overrides: SetOpt = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="run the cases that failed before again")
    ] = False,
    models: ModelsOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "WARNING",
) -> None:
    """Run a workflow on every study of a cohort (resumable): progress, then a report in
    OUT/runs/<workflow hash>/batch.csv and batch.json. Exits 1 when a case failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from rtauto.batch import run_batch
    from rtauto.ingest.spool import SpoolFull

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings, host = _without_daemon(
        config,
        out / ".rtauto",  # the batch's own state: what resuming reads
        log_level,
        workers=jobs,
        models_dir=models.resolve() if models else None,
        own_store=True,
    )
    loaded = _load_workflow(workflow, overrides, host, settings)
    columns = (
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        "{task.fields[note]}",
    )
    with Progress(*columns, transient=as_json, disable=as_json) as progress:
        reading = progress.add_task("reading files", total=None, note="")
        cases = progress.add_task("cases", total=None, note="", visible=False)

        # not a terminal (a log file, a CI job): bars are not drawn, so say each step in a line
        plain = not as_json and not progress.console.is_terminal
        said = {"finished": -1}

        def on_ingest(done: int, total: int) -> None:
            progress.update(reading, completed=done, total=total)
            if plain and done == total:
                typer.echo(f"read {total} file(s)", err=True)

        def on_progress(finished: int, ok: int, total: int) -> None:
            failed = finished - ok
            note = f"{ok} ok, {failed} failed" if failed else f"{ok} ok"
            progress.update(cases, completed=finished, total=total, visible=True, note=note)
            if plain and finished != said["finished"]:
                said["finished"] = finished
                typer.echo(f"cases: {finished} of {total} finished ({note})", err=True)

        try:
            report = run_batch(
                settings,
                host,
                loaded,
                _collect_files(cohort, "batch", exclude=out),
                out,
                overrides=overrides or [],
                retry_failed=retry_failed,
                on_ingest=on_ingest,
                on_progress=on_progress,
            )
        except SpoolFull as full:
            progress.stop()
            _die(f"rtauto batch: {full.reason}; run it again when there is room (it resumes)", 1)
        except RtautoError as exc:
            progress.stop()
            _die(f"rtauto batch: {exc}", 1)
        except KeyboardInterrupt:
            progress.stop()
            _die(
                "rtauto batch: interrupted; the same command resumes it (finished cases and "
                "steps are kept, unfinished steps run again)",
                130,
            )
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        for row in report.rows:
            step = f"{row['failed_step']}: " if row["failed_step"] else ""
            why = f"  {step}{row['error']}" if row["status"] != "ok" else ""
            note = " (done before)" if row["resumed"] == "done" else ""
            typer.echo(f"  {row['case']:<28} {row['status'].upper():<5}{note}{why}")
        for item in report.refused:
            typer.echo(f"  refused {item['file']}: {item['reason']} (quarantined)")
        typer.echo(
            f"{len(report.rows) - report.failed - report.skipped} of {len(report.rows)} cases ok"
            + (f" ({report.skipped} skipped: not for this workflow)" if report.skipped else "")
            + f" in {report.seconds:.0f} s; report: {report.folder / 'batch.csv'} (and .json)"
        )
    if not report.rows:
        _die("rtauto batch: no DICOM study could be read from the cohort")
    raise typer.Exit(1 if report.failed else 0)


# --------------------------------------------------------------------------------------------
# validate, schema, plugins
# --------------------------------------------------------------------------------------------


@app.command()
def validate(
    files: Annotated[list[Path] | None, typer.Argument(help="workflow files or folders")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Check workflow files, and with --config the configuration's destinations: prints
    file:line:column: message for each problem."""
    from rtauto.workflow import validate_paths
    from rtauto.workflow.loader import check_configured_destinations, workflow_files

    files = files or []
    if not files and config is None:
        _die("rtauto validate: give workflow files or folders, or --config FILE")
    settings = _settings(config, home)
    host = _host(settings)
    problems = check_configured_destinations(
        settings.destinations, host.destination_types, config
    ) + validate_paths(
        files,
        host.steps,
        known_destinations=set(settings.destinations),
        destination_types=host.destination_types,
    )
    for line in problems:
        typer.echo(line)
    if problems:
        raise typer.Exit(1)
    count = sum(len(workflow_files(f)) if f.is_dir() else 1 for f in files)
    checked = [f"{count} workflow file(s)"] if files else []
    if config is not None:
        checked.append(f"the destinations of {config}")
    typer.echo(" and ".join(checked) + " valid")


@app.command()
def schema(
    what: Annotated[str, typer.Argument(help="workflow | config")] = "workflow",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Print the JSON Schema of workflow files (with every installed step's params) or of the
    daemon configuration, for editors."""
    if what == "workflow":
        from rtauto.workflow import workflow_json_schema

        settings = _settings(config, home)
        typer.echo(json.dumps(workflow_json_schema(_host(settings).steps), indent=2))
    elif what == "config":
        typer.echo(json.dumps(Settings.model_json_schema(), indent=2))
    else:
        _die(f"rtauto schema: unknown schema {what!r} (workflow, config)")


@app.command()
def plugins(config: ConfigOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List loaded plugins, their steps and destination types, and plugins that failed (with
    the reasons). Exits 1 when a plugin failed to load."""
    settings = _settings(config, home)
    host = _host(settings, report=False)
    data = {
        "plugins": [
            {
                "name": p.name,
                "version": p.version,
                "module": p.module,
                "distribution": p.distribution,
                "builtin": p.builtin,
                "hooks": list(p.hooks),
            }
            for p in host.plugins.values()
        ],
        "steps": {
            name: {
                "plugin": r.plugin,
                "version": r.plugin_version,
                "description": r.step_type.description,
            }
            for name, r in sorted(host.steps.items())
        },
        "destination_types": sorted(host.destination_types),
        "model_backends": sorted(host.model_backends),
        "failures": host.failures,
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        raise typer.Exit(1 if host.failures else 0)
    for p in data["plugins"]:
        kind = "built-in" if p["builtin"] else p["distribution"]
        typer.echo(f"{p['name']} {p['version']} ({kind})")
    typer.echo("steps:")
    for name, s in data["steps"].items():
        typer.echo(f"  {name:<32} {s['plugin']} {s['version']}  {s['description']}")
    typer.echo("destination types: " + ", ".join(data["destination_types"]))
    if data["model_backends"]:
        typer.echo("model backends: " + ", ".join(data["model_backends"]))
    for name, reason in data["failures"].items():
        typer.echo(f"FAILED {name}: {reason.strip()}", err=True)
    raise typer.Exit(1 if host.failures else 0)


# --------------------------------------------------------------------------------------------
# jobs, replay
# --------------------------------------------------------------------------------------------


@app.command()
def jobs(
    job_id: Annotated[str | None, typer.Argument(help="show one job")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
    status: Annotated[str | None, typer.Option(help="pending, running, ok or fail")] = None,
    limit: Annotated[int, typer.Option(help="most recent N jobs")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List jobs (newest first), or show one job with its steps, artifacts and deliveries."""
    from rtauto.store.summary import job_summary

    settings = _settings(config, home)
    store = _store(settings, existing=True)
    if job_id:
        job = store.get_job(job_id)
        if job is None:
            _die(f"rtauto jobs: no job {job_id}", 1)
        summaries = [job_summary(store, job.id)]
    else:
        rows = store.list_jobs([status] if status else None, limit=limit)
        summaries = [job_summary(store, j.id) for j in rows]
    if as_json:
        typer.echo(json.dumps(summaries[0] if job_id else summaries, indent=2))
        return
    if not summaries:
        typer.echo("no jobs")
    for summary in summaries:
        if job_id:
            _print_job(summary)
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["created_at"]))
            typer.echo(
                f"{summary['job'][:12]}  {when}  {summary['status']:<8} {summary['workflow']}"
            )


@app.command()
def replay(
    job_id: Annotated[str, typer.Argument(help="the job whose deliveries to send again")],
    to: Annotated[str | None, typer.Option("--to", help="another destination name")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Deliver a job's results again (to the same destinations, or to --to)."""
    from rtauto.route.replay import replay_job

    settings, store, host, job = _job_of("replay", job_id, config, home)
    try:
        rows = replay_job(store, settings, host, job.id, destination=to)
    except RtautoError as exc:
        _die(f"rtauto replay: {exc}", 1)
    resumable = _resumable(store, job)
    if not rows:
        if job.status not in ("ok", "fail"):
            _die(f"rtauto replay: job {job.id[:8]} is still {job.status}: nothing to send yet", 1)
        why = f" (it ended {job.status.upper()}: {job.error})" if job.error else ""
        resume = f"`rtauto resume {job.id[:8]}` runs its failed steps again, " if resumable else ""
        _die(
            f"rtauto replay: job {job.id[:8]} delivered nothing that could be sent again{why}; "
            f"{resume}`rtauto rerun {job.id[:8]}` runs its workflow again",
            1,
        )
    failed = 0
    for row in rows:
        failed += row.status != "delivered"
        why = f"  ({row.error})" if row.error else ""
        typer.echo(f"{row.status:<10} {row.destination}  {row.path}{why}")
    if resumable:
        # a replay sends items; only a resume runs the steps that waited for them, and
        # only it ends the job OK
        typer.echo(
            f"job {job.id[:8]} stays FAIL: `rtauto resume {job.id[:8]}` runs its failed steps "
            "again, and the steps skipped because of them (what is delivered is not sent again)"
        )
    raise typer.Exit(1 if failed else 0)


def _made_by(job: Any) -> str:
    """``run`` or ``batch`` for a job of those commands, which no daemon runs; else
    ``daemon`` (the daemon's own jobs and those of rtauto rerun)."""
    made_by = job.dedupe_key.split(":", 1)[0]
    return made_by if made_by in ("run", "batch") else "daemon"


def _resumable(store: Any, job: Any) -> bool:
    """Whether ``rtauto resume`` would take the job: a daemon's job with a failed step."""
    return (
        job.status == "fail"
        and _made_by(job) == "daemon"
        and any(s.status == "fail" for s in store.steps_of(job.id))
    )


def _job_of(
    command: str, job_id: str, config: Path | None, home: Path | None
) -> tuple[Settings, Any, Any, Any]:
    """Settings, store, plugin host and the job (a unique id prefix will do) of a command
    that acts on one job; dies when there is no such job."""
    settings = _settings(config, home)
    store = _store(settings, existing=True)
    host = _host(settings)
    job = store.get_job(job_id)
    if job is None:
        _die(f"rtauto {command}: no job {job_id}", 1)
    return settings, store, host, job


@app.command()
def rerun(
    job_id: Annotated[str, typer.Argument(help="the job to run again")],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Run a job's workflow again, as a new job, on every instance its series hold now.

    For a job that failed (a destination fixed since, a series that was incomplete) or that
    ran on part of a series. The new job runs the same workflow version as the old one and
    is run by the daemon on this home (at its next start, when none runs now).
    """
    from rtauto.ingest.assembler import create_job_for
    from rtauto.workflow import load_workflow_text

    settings, store, host, job = _job_of("rerun", job_id, config, home)
    if job.status not in ("ok", "fail"):
        _die(f"rtauto rerun: job {job.id[:8]} is still {job.status}; wait for it to end", 1)
    made_by = _made_by(job)
    if made_by in ("run", "batch"):
        again = "rtauto run" if made_by == "run" else "rtauto batch (--retry-failed)"
        _die(
            f"rtauto rerun: job {job.id[:8]} was made by rtauto {made_by}, on its input files: "
            f"run {again} again on them",
            1,
        )
    try:
        loaded = load_workflow_text(
            job.workflow_text, job.workflow_path or job.workflow_name, host.steps
        )
    except WorkflowError as exc:
        _die(f"rtauto rerun: the workflow version of job {job.id[:8]} no longer loads: {exc}", 1)
    instances = [i.sop_uid for uid in job.input_series for i in store.instances_of_series(uid)]
    if not instances:
        _die(f"rtauto rerun: the store holds no instance of job {job.id[:8]}'s series", 1)
    if job.workflow_path:  # the new job names the file the old one came from
        loaded = dataclasses.replace(loaded, path=Path(job.workflow_path))
    new = create_job_for(
        store,
        settings,
        loaded,
        scope=job.scope,
        study_uid=job.study_uid,
        series_uid=job.series_uid,
        input_series=list(job.input_series),
        key_series=list(job.input_series),
        dedupe_key=f"rerun:{uuid.uuid4().hex}",
        input_instances=instances,
    )
    assert new is not None  # a fresh key
    store.audit("job.rerun", new.id, f"run again from job {job.id}", earlier_job=job.id)
    before = (
        "what its series held then"
        if job.input_instances is None
        else f"{len(job.input_instances)} instance(s)"
    )
    typer.echo(
        f"job {new.id[:8]}: workflow {job.workflow_name} again, on {len(instances)} "
        f"instance(s) (job {job.id[:8]} ran on {before})"
    )
    if not _daemon_running(settings.home):
        typer.echo("no daemon runs on this home now: the job runs when `rtauto serve` starts")


@app.command()
def resume(
    job_id: Annotated[str, typer.Argument(help="the failed job to resume")],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Run a failed job's failed steps again, and the steps skipped because of them, in the
    same job.

    The steps that ended OK do not run again, and nothing delivered is delivered twice:
    for a job whose destination was down (its items in the dead-letter list), once the
    destination is back. Each failed step's retry policy applies afresh. The daemon on this
    home runs the job (at its next start, when none runs now). A job that a newer job of its
    workflow replaced (rtauto rerun, or its series grew), or whose inputs or folder retention
    removed, is refused with the reason.
    """
    from rtauto.engine.resume import resume_job
    from rtauto.errors import ResumeRefused

    settings, store, host, job = _job_of("resume", job_id, config, home)
    made_by = _made_by(job)
    if job.status == "fail" and made_by in ("run", "batch"):
        # no daemon runs the jobs of rtauto run and batch: a resumed one would wait for ever
        again = (
            f"rtauto run again on its files (`rtauto replay {job.id[:8]}` sends its results)"
            if made_by == "run"
            else "rtauto batch --retry-failed"
        )
        _die(
            f"rtauto resume: job {job.id[:8]} was made by rtauto {made_by}, whose jobs no "
            f"daemon runs: run {again}",
            1,
        )
    try:
        steps = resume_job(store, job.id, host.steps, by="operator", reason="rtauto resume")
    except ResumeRefused as exc:
        _die(f"rtauto resume: {exc}", 1)
    typer.echo(
        f"job {job.id[:8]} resumed: step(s) {', '.join(steps)} run again (the steps that ended "
        "OK do not, and what was delivered is not sent again)"
    )
    if not _daemon_running(settings.home):
        typer.echo("no daemon runs on this home now: the job runs when `rtauto serve` starts")


@app.command()
def purge(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="remove nothing; report what would go")
    ] = False,
    received_days: Annotated[
        float | None, typer.Option(help="override retention.received_days")
    ] = None,
    jobs_days: Annotated[float | None, typer.Option(help="override retention.jobs_days")] = None,
    quarantine_days: Annotated[
        float | None, typer.Option(help="override retention.quarantine_days")
    ] = None,
    audit_days: Annotated[float | None, typer.Option(help="override retention.audit_days")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove what has passed its retention period (the configuration's retention: block).

    Received instances go by patient, once nothing of the patient arrived for received_days
    and no job of theirs is unfinished or has a result not delivered; an ended job's folder
    after jobs_days unless a result is not delivered, and its record once its study holds no
    received instance; quarantined files and audit events by age. Safe while the daemon runs
    (it does the same every retention.interval_minutes).
    """
    from pydantic import ValidationError

    from rtauto.config import RetentionSettings
    from rtauto.retention import PurgeRunning
    from rtauto.retention import purge as run_purge

    settings = _settings(config, home)
    overrides = {
        "received_days": received_days,
        "jobs_days": jobs_days,
        "quarantine_days": quarantine_days,
        "audit_days": audit_days,
    }
    values = settings.retention.model_dump()
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        retention = RetentionSettings(**values)
    except ValidationError as exc:
        _die(f"rtauto purge: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    if not retention.enabled:
        _die(
            "rtauto purge: no retention period is set (retention: in the configuration, or "
            "--received-days, --jobs-days, --quarantine-days, --audit-days): nothing to do",
            1,
        )
    store = _store(settings, existing=True)
    try:
        report = run_purge(settings, store, retention=retention, dry_run=dry_run)
    except PurgeRunning as exc:
        _die(f"rtauto purge: {exc}", 1)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        typer.echo(report.summary())


def _daemon_running(home: Path) -> bool:
    """Whether the daemon named in ``home``'s state file is alive."""
    from rtauto.daemon import read_state

    try:
        os.kill(int((read_state(home) or {})["pid"]), 0)
    except PermissionError:
        return True  # it runs, as another user
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


CORE_COMMANDS = frozenset(
    {
        "serve",
        "run",
        "validate",
        "schema",
        "plugins",
        "jobs",
        "replay",
        "rerun",
        "resume",
        "purge",
    }
)


def add_plugin_commands(target: typer.Typer, host: Any = None) -> list[str]:
    """Let plugins add their commands (``rtauto_add_commands``); returns failure messages."""
    host = host or _host(report=False)  # the command itself reports failed plugins
    failures = []
    for impl in host.pm.hook.rtauto_add_commands.get_hookimpls():
        try:
            impl.function(app=target)
        except Exception as exc:
            failures.append(f"plugin {impl.plugin_name} could not add its commands: {exc}")
    return failures


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if not a.startswith("-")), None)
    # plugins are imported only when their commands may be wanted: core commands stay fast
    if command not in CORE_COMMANDS and "--version" not in args:
        for message in add_plugin_commands(app):
            typer.echo(f"warning: {message}", err=True)
    app(args=args, prog_name="rtauto")


if __name__ == "__main__":
    main()
