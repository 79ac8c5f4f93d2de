"""The rtauto daemon: ingest (SCP + drop folders), assembler, engine, hot reload, in one process
tree. ``rtauto serve`` runs it until SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from rtauto import __version__
from rtauto.config import Settings
from rtauto.engine.engine import Engine
from rtauto.errors import ConfigError, RtautoError
from rtauto.hooks import PluginHost, build_plugin_manager
from rtauto.hooks.manager import failure_summary, forget_plugin_modules, plugin_fingerprint
from rtauto.ingest.assembler import Assembler
from rtauto.locks import exclusive_lock
from rtauto.store import Store
from rtauto.uids import set_uid_root
from rtauto.workflow.library import WorkflowLibrary
from rtauto.workflow.loader import check_configured_destinations

log = logging.getLogger("rtauto.daemon")

STATE_FILE = "daemon.json"
LOCK_FILE = "daemon.lock"


class Daemon:
    """Everything ``rtauto serve`` runs. ``start()`` returns once the SCP accepts associations."""

    def __init__(
        self, settings: Settings, host: PluginHost | None = None, config_path: Path | None = None
    ):
        self.settings = settings
        self.config_path = config_path  # where problems of the configuration point
        self.host = host or build_plugin_manager(settings)
        self.store: Store | None = None
        self.engine: Engine | None = None
        self.library: WorkflowLibrary | None = None
        self.assembler: Assembler | None = None
        self.scp: Any = None
        self.watcher: Any = None
        self.scp_port: int | None = None
        self.web: Any = None
        self.web_port: int | None = None
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self._home_lock: int | None = None
        self._last_reload = 0.0
        self.last_tick = 0.0
        self._next_purge = 0.0
        self._purger: threading.Thread | None = None
        self._next_retry = 0.0
        self._retrier: threading.Thread | None = None
        self._retry_window: float | None = None  # where the last retry pass's window began
        self._plugin_fingerprint = plugin_fingerprint(self.settings.plugin_modules.values())

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start everything; raises :class:`RtautoError` (after stopping what had started)
        when the home is another daemon's or a port cannot be had."""
        self.settings.ensure_dirs()
        self._lock_home()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _lock_home(self) -> None:
        """Hold ``HOME/daemon.lock`` for the daemon's life: two daemons on one home would run
        the same jobs twice (each takes the other's running steps for interrupted ones)."""
        home = Path(self.settings.home)
        fd = exclusive_lock(home / LOCK_FILE)
        if fd is None:
            try:
                pid = json.loads((home / STATE_FILE).read_text()).get("pid", "?")
            except (OSError, ValueError):
                pid = "?"
            raise RtautoError(
                f"another rtauto daemon (pid {pid}) is running with home {home}; stop it, "
                "or give this one its own --home"
            ) from None
        self._home_lock = fd

    def _start(self) -> None:
        from rtauto.ingest.scp import StorageSCP
        from rtauto.ingest.spool import Spool
        from rtauto.ingest.watcher import FolderWatcher

        settings = self.settings
        set_uid_root(settings.uid_root)
        for name, reason in self.host.failures.items():
            log.error("plugin %s is disabled: %s", name, failure_summary(reason))
        # a destination with a typo would otherwise fail only when a job routes to it, after
        # the contouring: refuse to start instead. One of a type no plugin provides (its
        # plugin failed to load) is logged: the other plugins and destinations keep working
        types = self.host.destination_types
        problems = check_configured_destinations(
            settings.destinations, types, self.config_path, skip_unknown_types=True
        )
        if problems:
            raise ConfigError("\n".join(problems))
        for name, block in sorted(settings.destinations.items()):
            if block.resolved_type() not in types:
                log.error(
                    "destination %s is of type %r, which no loaded plugin provides: jobs that "
                    "route there fail until its plugin loads",
                    name,
                    block.resolved_type(),
                )
        self.store = Store(settings.database_url, migrate=True)
        recovered = Spool(settings).reconcile(self.store)
        if recovered:
            log.info("indexed %d instance(s) found in the spool after an unclean stop", recovered)
        self.library = WorkflowLibrary(
            settings.workflows_dir,
            steps_provider=lambda: self.host.steps,
            known_destinations=lambda: set(settings.destinations),
            destination_types=lambda: self.host.destination_types,
            keep=settings.home / "workflows.last-good",
        )
        if not Path(settings.workflows_dir).is_dir():
            log.warning(
                "the workflows folder %s does not exist: no workflow runs until it is created",
                settings.workflows_dir,
            )
        self.library.refresh()  # logs each change itself
        self.engine = Engine(settings, self.store, self.host)
        resumed = self.engine.recover()
        if resumed:
            log.info("%d step(s) interrupted by the last stop will run again", resumed)
        self.engine.pool.prestart()
        self.assembler = Assembler(settings, self.store, self.host, lambda: self.library.workflows)
        if settings.scp.enabled:
            self.scp = StorageSCP(settings, settings.database_url)
            self.scp_port = self.scp.start()
            log.info(
                "storage SCP %s listening on %s:%s",
                settings.scp.ae_title,
                settings.scp.host,
                self.scp_port,
            )
        if settings.watch:
            self.watcher = FolderWatcher(settings, settings.database_url)
            self.watcher.start()
            for folder in settings.watch:
                log.info("watching %s (settle %.1f s)", folder.path, folder.settle_seconds)
        if settings.web.enabled:
            from rtauto.web.app import WebServer, create_app

            app = create_app(
                self.store,
                settings,
                workflows=lambda: self.library.workflows,
                workflow_errors=lambda: self.library.errors,
                last_tick=lambda: self.last_tick,
                scp_counters=self.scp.counters if self.scp is not None else None,
            )
            self.web = WebServer(app, settings.web.host, settings.web.port)
            self.web_port = self.web.start()
            log.info(
                "dashboard on http://%s:%s/ (metrics: /metrics)", settings.web.host, self.web_port
            )
        # receiving from here on: the quiet periods of series cut off by the last stop start now
        self.assembler.started = time.time()
        if settings.retention.enabled:
            # the first retention pass a minute after the start (sooner with a shorter interval)
            self._next_purge = time.time() + min(60.0, settings.retention.interval_minutes * 60)
        if settings.dead_letters.enabled:
            # likewise the first retry of dead letters: those a stop left wait no longer
            every = settings.dead_letters.retry_every_minutes * 60
            self._next_retry = time.time() + min(60.0, every)
        self._write_state()
        self._loop = threading.Thread(target=self._run_loop, name="rtauto-loop", daemon=True)
        self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        if self.web is not None:
            self.web.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.scp is not None:
            self.scp.stop()
        if self._loop is not None:
            self._loop.join(timeout=30)
        if self._purger is not None:
            self._purger.join(timeout=30)  # it stops between series
        if self._retrier is not None:
            self._retrier.join(timeout=30)  # it stops between jobs
        if self.engine is not None:
            self.engine.close(wait=False)
        if self.store is not None:
            self.store.close()
        if self._home_lock is not None:  # only the daemon holding the home owns its state
            (self.settings.home / STATE_FILE).unlink(missing_ok=True)
            os.close(self._home_lock)
            self._home_lock = None

    def serve_forever(self) -> None:
        """Start, then run until SIGTERM/SIGINT."""
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s: stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()

    # -- the loop ----------------------------------------------------------------------------
    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "version": __version__,
            "ae_title": self.settings.scp.ae_title,
            "host": self.settings.scp.host,
            "port": self.scp_port,
            "web_port": self.web_port,
            "home": str(self.settings.home),
            "store_url": self.settings.database_url,
            "started_at": time.time(),
        }
        path = self.settings.home / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, path)

    def _run_loop(self) -> None:
        poll = self.settings.executor.poll_seconds
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("error in the scheduling loop (continuing)")
            self.engine.wait_for_change(poll)

    def _reload_plugins_if_changed(self) -> None:
        """A plugin installed, removed or upgraded: rebuild the daemon's plugin manager, so
        workflows using new step types validate (workers pick the change up themselves)."""
        fingerprint = plugin_fingerprint(self.settings.plugin_modules.values())
        if fingerprint == self._plugin_fingerprint:
            return
        # a fresh import of every plugin package: the upgraded code, its new step types and
        # observers, or the error of a broken upgrade (reported below), never the old module
        forget_plugin_modules(self.settings.plugin_modules.values())
        host = build_plugin_manager(self.settings)
        self._plugin_fingerprint = fingerprint
        self.host = self.engine.host = self.assembler.host = host
        log.info("installed plugins changed: %d step types now available", len(host.steps))
        for name, reason in host.failures.items():
            log.error("plugin %s is disabled: %s", name, failure_summary(reason))

    def tick(self) -> None:
        now = time.time()
        if now - self._last_reload >= 1.0:
            self._last_reload = now
            self._reload_plugins_if_changed()
            self.library.refresh()  # logs each change itself
        self.assembler.tick(now)
        self.engine.tick()
        self._maybe_purge(now)
        self._maybe_retry_dead_letters(now)
        self.last_tick = now

    def _maybe_purge(self, now: float) -> None:
        """Start a retention pass in the background when one is due (see
        :mod:`rtauto.retention`); removing files must not hold up the scheduling loop."""
        retention = self.settings.retention
        if not retention.enabled or now < self._next_purge:
            return
        if self._purger is not None and self._purger.is_alive():
            return
        self._next_purge = now + retention.interval_minutes * 60
        self._purger = threading.Thread(target=self._purge, name="rtauto-retention", daemon=True)
        self._purger.start()

    def _purge(self) -> None:
        from rtauto.retention import PurgeRunning, purge

        try:
            report = purge(self.settings, self.store, stop=self._stop.is_set)
        except PurgeRunning as exc:
            log.info("retention pass skipped: %s", exc)
            return
        except Exception:
            log.exception("retention pass failed; the next one tries again")
            return
        if report.removed_anything:
            log.info("%s", report.summary())
        elif report.kept:
            log.debug("%s", report.summary())

    def _maybe_retry_dead_letters(self, now: float) -> None:
        """Send dead letters again in the background when a pass is due (see
        :mod:`rtauto.route.dead_letters`); a destination that does not answer must not hold
        up the scheduling loop."""
        policy = self.settings.dead_letters
        if not policy.enabled or now < self._next_retry:
            return
        if self._retrier is not None and self._retrier.is_alive():
            return
        self._next_retry = now + policy.retry_every_minutes * 60
        self._retrier = threading.Thread(
            target=self._retry_dead_letters, name="rtauto-dead-letters", daemon=True
        )
        self._retrier.start()

    def _retry_dead_letters(self) -> None:
        from rtauto.route.dead_letters import retry_dead_letters, send_in_worker

        try:
            report = retry_dead_letters(
                self.settings,
                self.store,
                self.host,
                send=send_in_worker(self.engine.pool, self.store),
                hold=self.engine.holding,
                stop=self._stop.is_set,
                window_was=self._retry_window,
            )
        except Exception:
            log.exception("retry of dead letters failed; the next pass tries again")
            return
        self._retry_window = report.since
        if report.jobs:
            log.info("%s", report.summary())


def read_state(home: Path) -> dict[str, Any] | None:
    """The running daemon's state file (pid, port), or None."""
    try:
        return json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
