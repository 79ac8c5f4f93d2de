"""The local executor: a pool of worker processes, each running one step at a time.

Workers are started with the ``spawn`` method (a fresh interpreter that imports the plugins as
they are on disk now) and recycled when the installed plugins change, so an upgrade reaches
the next job without a daemon restart and without touching a step in flight. A step past its
timeout has its worker killed; the pool starts another.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from rtauto.engine.worker import worker_main
from rtauto.hooks.manager import plugin_fingerprint

log = logging.getLogger("rtauto.engine")

_ctx = multiprocessing.get_context("spawn")


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    fingerprint: str
    ready: bool = False
    warmed: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)


class WorkerPool:
    """Up to ``size`` worker processes; ``run(task, timeout)`` blocks its calling thread."""

    def __init__(self, settings_json: dict[str, Any], size: int, warm: list[str] | None = None):
        self.settings_json = {**settings_json, "_parent_pid": os.getpid()}
        self.size = size
        self.warm = warm
        self._idle: list[_Worker] = []
        self._busy = 0
        self._lock = threading.Condition()
        self._closed = False
        self._running: set[_Worker] = set()
        self._fingerprint_value = ""
        self._site_modules = list((settings_json.get("plugin_modules") or {}).values())
        self._fingerprint_at = -1e9

    def _fingerprint(self) -> str:
        """The installed plugins' fingerprint, computed at most once a second."""
        now = time.monotonic()
        if now - self._fingerprint_at > 1.0:
            self._fingerprint_value = plugin_fingerprint(self._site_modules)
            self._fingerprint_at = now
        return self._fingerprint_value

    # -- lifecycle ---------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        parent, child = _ctx.Pipe()
        process = _ctx.Process(
            target=worker_main,
            args=(child, self.settings_json, self.warm),
            name="rtauto-worker",
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(process=process, conn=parent, fingerprint=self._fingerprint())

    def _wait_ready(self, worker: _Worker, timeout: float = 600) -> None:
        if worker.ready:
            return
        if not worker.conn.poll(timeout):
            worker.kill()
            raise RuntimeError(f"worker did not start within {timeout} s")
        hello = worker.conn.recv()
        worker.ready = True
        worker.warmed = list(hello.get("warmed", []))

    def prestart(self, count: int | None = None) -> None:
        """Start workers ahead of the first job so it does not pay their start-up (warm-up)."""
        with self._lock:
            wanted = min(count or self.size, self.size) - len(self._idle) - self._busy
            for _ in range(max(0, wanted)):
                self._idle.append(self._spawn())

    def close(self) -> None:
        """Stop idle workers; kill busy ones (their steps resume when rtauto starts again)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._running)
        for worker in idle:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
            worker.process.join(timeout=5)
            worker.kill()
        for worker in busy:
            worker.kill()

    # -- running -----------------------------------------------------------------------------
    def _acquire(self) -> _Worker:
        with self._lock:
            while self._busy >= self.size and not self._closed:
                self._lock.wait(timeout=1)
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            self._busy += 1
            current = self._fingerprint()
            while self._idle:
                worker = self._idle.pop()
                if worker.alive() and worker.fingerprint == current:
                    return worker
                if worker.fingerprint != current:
                    log.info("installed plugins changed: recycling worker %s", worker.process.pid)
                worker.kill()
        try:
            return self._spawn()
        except BaseException:
            with self._lock:
                self._busy -= 1
                self._lock.notify()
            raise

    def _release(self, worker: _Worker | None) -> None:
        with self._lock:
            self._busy -= 1
            if worker is not None and not self._closed and worker.alive():
                self._idle.append(worker)
            elif worker is not None:
                worker.kill()
            self._lock.notify()

    def run(self, task: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run a step task in a worker; the step's time limit starts when the worker is ready."""
        worker = self._acquire()
        try:
            self._wait_ready(worker)
        except Exception as exc:
            self._release(None)
            return {"status": "retry", "error": f"worker failed to start: {exc}"}
        started = time.monotonic()
        with self._lock:
            self._running.add(worker)
        try:
            worker.conn.send(task)
            if worker.conn.poll(timeout):
                result = worker.conn.recv()
                self._release(worker)
                return result
            log.warning(
                "step %s of job %s timed out after %.0f s: killing worker %s",
                task["step_id"],
                task["job_id"],
                timeout,
                worker.process.pid,
            )
            worker.kill()
            self._release(None)
            return {"status": "timeout", "error": f"timed out after {timeout:g} s"}
        except (EOFError, OSError, BrokenPipeError):
            worker.kill()
            code = worker.process.exitcode
            self._release(None)
            elapsed = time.monotonic() - started
            return {
                "status": "retry",
                "error": f"worker process died after {elapsed:.1f} s (exit code {code})",
            }
        finally:
            with self._lock:
                self._running.discard(worker)
