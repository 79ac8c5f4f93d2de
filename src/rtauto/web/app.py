"""The daemon's dashboard, REST API and Prometheus metrics (FastAPI), read from the job store.

Endpoints: ``/`` (dashboard page), ``/api/status``, ``/api/jobs``, ``/api/jobs/{id}``,
``/api/workflows``, ``/metrics`` (Prometheus text format). Everything is read-only.
"""

from __future__ import annotations

import html
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, PlainTextResponse
from sqlalchemy import func, select

from rtauto import __version__
from rtauto.store import Store
from rtauto.store.models import AuditEvent, Delivery, Instance, Job, StepRun


def _status(store: Store, settings: Any, extra: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    with store.session() as s:
        jobs = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        deliveries = dict(
            s.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all()
        )
        instances = s.scalar(select(func.count()).select_from(Instance)) or 0
        last_purge = s.execute(
            select(AuditEvent.ts, AuditEvent.message)
            .where(AuditEvent.kind == "retention.purged")
            .order_by(AuditEvent.id.desc())
            .limit(1)
        ).first()
    policy = settings.dead_letters
    retried = (
        len(
            store.delivery_failed_jobs(
                ended_after=time.time() - policy.retry_for_hours * 3600, with_dead_letters=True
            )
        )
        if policy.enabled
        else 0
    )
    quarantined = (
        # each refused file is kept as <uuid>.bin beside its <uuid>.json reason
        sum(1 for _ in settings.quarantine_dir.glob("*.bin"))
        if settings.quarantine_dir.exists()
        else 0
    )
    try:
        # free: what an unprivileged writer may still use (f_bavail), as the spool measures it
        disk = shutil.disk_usage(settings.home)
        free, total = disk.free, disk.total
    except OSError:
        free = total = 0
    reserve = int(settings.min_free_mb * 1e6)
    return {
        "version": __version__,
        "instances": instances,
        "jobs": jobs,
        "deliveries": deliveries,
        "quarantined": quarantined,
        # the spool, jobs and store share the home: below min_free_mb the SCP refuses
        # instances (0xA700) and drop-folder files wait, so jobs and the store keep room
        "home_free_bytes": free,
        "home_total_bytes": total,
        "min_free_bytes": reserve,
        "ingest_paused": bool(reserve and free < reserve),
        "dead_letters": {
            "retry_enabled": policy.enabled,
            "retry_every_minutes": policy.retry_every_minutes,
            "retry_for_hours": policy.retry_for_hours,
            # failed jobs whose results wait in the dead-letter list for the daemon's retry
            "jobs_retried": retried,
        },
        "retention": {
            "enabled": settings.retention.enabled,
            # the last pass that removed something (UTC), and what it removed
            "last_removed": None
            if last_purge is None
            else {"at": last_purge.ts.isoformat() + "Z", "summary": last_purge.message},
        },
        **extra(),
    }


def _metrics(store: Store, settings: Any, extra: Callable[[], dict[str, Any]]) -> str:
    """Prometheus exposition text, computed from the store at scrape time."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterator[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}")

    status = _status(store, settings, extra)
    with store.session() as s:
        steps = s.execute(
            select(StepRun.uses, StepRun.status, func.count()).group_by(
                StepRun.uses, StepRun.status
            )
        ).all()
        durations = s.execute(
            select(StepRun.uses, func.sum(StepRun.finished_at - StepRun.started_at), func.count())
            .where(StepRun.finished_at.is_not(None), StepRun.started_at.is_not(None))
            .group_by(StepRun.uses)
        ).all()
    family(
        "rtauto_instances_stored",
        "gauge",
        "DICOM instances held in the spool (retention removes them once past received_days)",
        iter([("", status["instances"])]),
    )
    family(
        "rtauto_home_free_bytes",
        "gauge",
        "free space on the file system of rtauto's home (spool, jobs, store)",
        iter([("", status["home_free_bytes"])]),
    )
    family(
        "rtauto_ingest_paused",
        "gauge",
        "1 while free space in home is below min_free_mb: C-STOREs are refused, drop folders wait",
        iter([("", 1 if status["ingest_paused"] else 0)]),
    )
    family(
        "rtauto_quarantined_files",
        "gauge",
        "files refused and kept in the quarantine",
        iter([("", status["quarantined"])]),
    )
    scp = status.get("scp")
    if scp is not None:
        family(
            "rtauto_scp_associations_total",
            "counter",
            "associations the storage SCP accepted or rejected (calling or called AE title, "
            "application context) since the daemon started",
            ((f'{{result="{r}"}}', scp[f"associations_{r}"]) for r in ("accepted", "rejected")),
        )
        family(
            "rtauto_scp_instances_total",
            "counter",
            "C-STOREs by outcome since the daemon started: stored (re-sent ones included), "
            "refused (quarantined), not_stored (0xA700: the sender keeps the instance)",
            (
                (f'{{outcome="{o}"}}', scp[f"instances_{o}"])
                for o in ("stored", "refused", "not_stored")
            ),
        )
        family(
            "rtauto_scp_received_bytes_total",
            "counter",
            "data set bytes of the C-STOREs stored since the daemon started",
            iter([("", scp["bytes_received"])]),
        )
    family(
        "rtauto_jobs",
        "gauge",
        "jobs by status",
        # every status, 0 included: an alert on rtauto_jobs{status="fail"} sees 0, not nothing
        ((f'{{status="{k}"}}', v) for k, v in _every(status["jobs"], JOB_STATUSES)),
    )
    family(
        "rtauto_steps",
        "gauge",
        "steps by step type and status",
        ((f'{{uses="{u}",status="{st}"}}', n) for u, st, n in steps),
    )
    family(
        "rtauto_step_seconds_sum",
        "counter",
        "time spent in finished steps, by step type",
        ((f'{{uses="{u}"}}', float(total or 0)) for u, total, _ in durations),
    )
    family(
        "rtauto_step_seconds_count",
        "counter",
        "finished steps, by step type",
        ((f'{{uses="{u}"}}', n) for u, _, n in durations),
    )
    family(
        "rtauto_deliveries",
        "gauge",
        "deliveries by status (dead: the dead-letter list)",
        ((f'{{status="{k}"}}', v) for k, v in _every(status["deliveries"], DELIVERY_STATUSES)),
    )
    family(
        "rtauto_dead_letter_jobs",
        "gauge",
        "failed jobs whose dead letters the daemon sends again every retry_every_minutes; "
        "each is resumed once all of them arrived",
        iter([("", status["dead_letters"]["jobs_retried"])]),
    )
    family(
        "rtauto_workflows_loaded",
        "gauge",
        "workflows currently active",
        iter([("", status.get("workflows_loaded", 0))]),
    )
    family(
        "rtauto_workflow_files_refused",
        "gauge",
        "workflow files whose last edit was refused",
        iter([("", status.get("workflow_errors", 0))]),
    )
    family(
        "rtauto_up",
        "gauge",
        "1 while the daemon's scheduling loop runs",
        iter([("", 1 if time.time() - status.get("last_tick", 0) < 30 else 0)]),
    )
    return "\n".join(lines) + "\n"


JOB_STATUSES = ("pending", "running", "ok", "fail")
DELIVERY_STATUSES = ("pending", "sending", "delivered", "failed", "dead")


def _every(counts: dict[str, int], known: tuple[str, ...]) -> list[tuple[str, int]]:
    """``counts`` with a 0 for each known status it lacks, sorted by status."""
    return sorted({**dict.fromkeys(known, 0), **counts}.items())


def _resumed_table(store: Store, limit: int = 20) -> str:
    """The failed jobs resumed last (rtauto resume, the daemon's retry of dead letters)."""
    events = store.audit_events("job.resumed", limit=limit)
    if not events:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(e.ts.strftime('%Y-%m-%d %H:%M:%S'))} UTC</td>"
        f"<td><code>{html.escape(e.subject[:12])}</code></td>"
        f"<td>{html.escape(str(e.data.get('by', '')))}</td>"
        f"<td>{html.escape(', '.join(e.data.get('steps', [])))}</td>"
        f"<td>{html.escape(str(e.data.get('reason', '')))}</td></tr>"
        for e in events
    )
    return (
        "<h2>Resumed jobs</h2><table><tr><th>when</th><th>job</th><th>by</th>"
        f"<th>steps run again</th><th>why</th></tr>{rows}</table>"
    )


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rtauto</title>
<meta http-equiv="refresh" content="5">
<style>
body{{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}}
table{{border-collapse:collapse;width:100%}}td,th{{padding:.3rem .6rem;border-bottom:1px solid #ddd;
text-align:left;font-size:.9rem}}.ok{{color:#17702b}}.fail{{color:#b00020;font-weight:600}}
.running,.pending{{color:#8a6d00}}.cards{{display:flex;gap:1rem;margin:1rem 0}}
.card{{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem}}.card b{{font-size:1.4rem}}
code{{font-size:.85rem}}</style></head><body>
<h1>rtauto {version}</h1>
<div class="cards">{cards}</div>
<h2>Workflows</h2><table><tr><th>name</th><th>version</th><th>file</th></tr>{workflows}</table>
{errors}
<h2>Recent jobs</h2>
<table><tr><th>job</th><th>workflow</th><th>status</th><th>created</th><th>steps</th></tr>
{jobs}</table>
{resumed}</body></html>"""


def create_app(
    store: Store,
    settings: Any,
    workflows: Callable[[], list[Any]] = list,
    workflow_errors: Callable[[], dict[Any, list[str]]] = dict,
    last_tick: Callable[[], float] = time.time,
    scp_counters: Callable[[], dict[str, int]] | None = None,
) -> FastAPI:
    """The web application over ``store``; the callables give the daemon's live state."""
    from rtauto.store.summary import job_summary

    app = FastAPI(title="rtauto", version=__version__)

    def extra() -> dict[str, Any]:
        return {
            "workflows_loaded": len(workflows()),
            "workflow_errors": len(workflow_errors()),
            "last_tick": last_tick(),
            # what the storage SCP's receiving processes counted since the daemon started
            "scp": scp_counters() if scp_counters is not None else None,
        }

    @app.get("/api/status")
    def api_status() -> dict[str, Any]:
        return _status(store, settings, extra)

    @app.get("/api/jobs")
    def api_jobs(limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        rows = store.list_jobs([status] if status else None, limit=min(limit, 500))
        return [job_summary(store, j.id) for j in rows]

    @app.get("/api/jobs/{job_id}")
    def api_job(job_id: str) -> dict[str, Any]:
        job = store.get_job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job_summary(store, job.id)

    @app.get("/api/workflows")
    def api_workflows() -> dict[str, Any]:
        return {
            "workflows": [
                {"name": w.workflow.name, "hash": w.hash, "path": str(w.path)} for w in workflows()
            ],
            "errors": {str(k): v for k, v in workflow_errors().items()},
        }

    @app.get("/api/dead-letters")
    def api_dead_letters() -> list[dict[str, Any]]:
        """Items routing gave up on: what, where to, why (``rtauto replay JOB`` sends again)."""
        return [
            {
                "job": d.job_id,
                "step": d.step_id,
                "destination": d.destination,
                "item": d.item_key,
                "path": d.path,
                "attempts": d.attempts,
                "error": d.last_error,
                "updated_at": d.updated_at,
            }
            for d in sorted(store.dead_letters(), key=lambda d: d.updated_at, reverse=True)
        ]

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return _metrics(store, settings, extra)

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> str:
        status = _status(store, settings, extra)
        cards = "".join(
            f'<div class="card">{html.escape(label)}<br><b>{value}</b></div>'
            for label, value in (
                ("instances received", status["instances"]),
                ("jobs ok", status["jobs"].get("ok", 0)),
                ("jobs failed", status["jobs"].get("fail", 0)),
                (
                    "jobs running",
                    status["jobs"].get("running", 0) + status["jobs"].get("pending", 0),
                ),
                ("dead letters", status["deliveries"].get("dead", 0)),
                ("jobs awaiting redelivery", status["dead_letters"]["jobs_retried"]),
                ("quarantined files", status["quarantined"]),
                (
                    "associations rejected since start",
                    (status.get("scp") or {}).get("associations_rejected", 0),
                ),
                ("free in home", _size(status["home_free_bytes"])),
            )
        )
        rows = []
        for job in store.list_jobs(limit=50):
            steps = ", ".join(
                f'<span class="{html.escape(s.status)}">{html.escape(s.step_id)}</span>'
                for s in store.steps_of(job.id)
            )
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
            error = f"<br><small>{html.escape(job.error)}</small>" if job.error else ""
            rows.append(
                f"<tr><td><code>{job.id[:12]}</code></td><td>{html.escape(job.workflow_name)}</td>"
                f'<td class="{html.escape(job.status)}">{html.escape(job.status)}{error}</td>'
                f"<td>{created}</td><td>{steps}</td></tr>"
            )
        flows = "".join(
            f"<tr><td>{html.escape(w.workflow.name)}</td><td><code>{w.hash[:12]}</code></td>"
            f"<td>{html.escape(str(w.path))}</td></tr>"
            for w in workflows()
        )
        errors = workflow_errors()
        error_html = ""
        if status["ingest_paused"]:
            error_html += (
                "<h2>Ingest paused: the disk is nearly full</h2><p>"
                f"{_size(status['home_free_bytes'])} free in home, below the "
                f"{_size(status['min_free_bytes'])} of min_free_mb: C-STOREs are answered "
                "0xA700 (senders keep their instances) and drop-folder files wait.</p>"
            )
        retention = status["retention"]
        if retention["last_removed"]:
            error_html += (
                f"<p><small>Last retention pass that removed data "
                f"({html.escape(retention['last_removed']['at'])}): "
                f"{html.escape(retention['last_removed']['summary'])}</small></p>"
            )
        if errors:
            items = "".join(
                f"<li><code>{html.escape(line)}</code></li>"
                for lines in errors.values()
                for line in lines
            )
            error_html += f"<h2>Refused workflow edits</h2><ul>{items}</ul>"
        return PAGE.format(
            version=__version__,
            cards=cards,
            workflows=flows or '<tr><td colspan="3">none</td></tr>',
            errors=error_html,
            jobs="".join(rows) or '<tr><td colspan="5">no jobs yet</td></tr>',
            resumed=_resumed_table(store),
        )

    return app


class WebServer:
    """Runs the app with uvicorn in a thread of the daemon."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning")
        self.server = uvicorn.Server(self.config)
        self.thread: Any = None

    def start(self) -> int:
        """Listen (the socket is bound here, so a taken port is a clear error) and serve in a
        thread; returns the port. Raises :class:`RtautoError` when the port cannot be had."""
        import socket
        import threading

        from rtauto.errors import RtautoError

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise RtautoError(
                f"the dashboard cannot listen on {self.config.host}:{self.config.port}: "
                f"{exc.strerror or exc} (set web.port to a free port, or web.enabled: false)"
            ) from exc
        port = int(sock.getsockname()[1])
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="rtauto-web", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RtautoError(f"the dashboard on port {port} stopped while starting")
            time.sleep(0.05)
        return port

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
