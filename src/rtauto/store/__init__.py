"""The job store (SQLAlchemy): instances, series, studies, jobs, steps, deliveries, audit."""

from rtauto.store.store import TERMINAL_STEP_STATES, InstanceRecord, Store, run_migrations

__all__ = ["TERMINAL_STEP_STATES", "InstanceRecord", "Store", "run_migrations"]
