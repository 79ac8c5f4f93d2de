"""Re-delivering a job's routed items (``rtauto replay JOB [--to NAME]``), and the dead letters
alone (the daemon's background retry, :mod:`rtauto.route.dead_letters`).

Replay is an explicit request, so it sends again what was delivered before, as well as what
went to the dead-letter list. Each send is recorded on the item's delivery record, and a
replay in the audit log.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from rtauto.config import Destination, effective_destinations
from rtauto.errors import RtautoError, StepError
from rtauto.route.deliveries import DeliveryItem, resolve_destination, send_items

__all__ = ["ReplayResult", "job_destinations", "replay_job", "send_dead_letters"]

REPLAYED_STATUSES = ("delivered", "dead")


@dataclass(frozen=True)
class ReplayResult:
    """What happened to one item: ``delivered`` true, or ``error`` says why not."""

    item_key: str
    path: str
    destination: str
    step_id: str
    delivered: bool
    error: str | None = None

    @property
    def status(self) -> str:
        """``delivered``, or ``failed`` (the error says why)."""
        return "delivered" if self.delivered else "failed"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def job_destinations(settings: Any, workflow_text: str) -> dict[str, Destination]:
    """The destinations the job's steps saw: its workflow version's, with the daemon
    configuration's of the same name winning (:func:`rtauto.config.effective_destinations`)."""
    try:
        workflow = yaml.safe_load(workflow_text or "") or {}
    except yaml.YAMLError:
        workflow = {}
    blocks = workflow.get("destinations") if isinstance(workflow, dict) else None
    defaults = {str(n): Destination.model_validate(b or {}) for n, b in (blocks or {}).items()}
    return effective_destinations(settings, defaults)


def replay_job(
    store: Any,
    settings: Any,
    host: Any,
    job_id: str,
    destination: str | None = None,
) -> list[ReplayResult]:
    """Send again every item the job's routing steps delivered or dead-lettered.

    Each item goes to the destination of its record, or to ``destination`` when given (a
    name from the daemon config or the job's workflow). ``host`` is the
    :class:`rtauto.hooks.PluginHost` whose destination types are used. Raises
    :class:`RtautoError` for an unknown job; delivery problems are reported per item.
    """
    job = store.get_job(job_id)
    if job is None:
        raise RtautoError(f"no job {job_id!r} in the store")
    rows = [row for row in store.deliveries_of(job.id) if row.status in REPLAYED_STATUSES]
    destinations = job_destinations(settings, job.workflow_text)
    home = Path(settings.home) if getattr(settings, "home", None) is not None else None
    if destination is not None:
        # a misspelt --to must not leave records (dead letters) for a destination that is none
        try:
            resolve_destination(destination, destinations, host.destination_types.get, home=home)
        except StepError as exc:
            raise RtautoError(f"--to {destination}: {exc}") from None

    results = _send_again(store, job.id, rows, destination, destinations, host, home, "replay")
    delivered = sum(r.delivered for r in results)
    store.audit(
        "delivery.replay",
        subject=job.id,
        message=f"replayed {len(results)} item(s): {delivered} delivered, "
        f"{len(results) - delivered} failed" + (f" (to {destination})" if destination else ""),
        destination=destination,
        results=[r.to_json() for r in results],
    )
    return results


def send_dead_letters(store: Any, settings: Any, host: Any, job_id: str) -> list[ReplayResult]:
    """Send the job's dead letters again, each to the destination that gave up on it, with
    the destinations the job's steps saw; an item the same step delivered to another
    destination (``rtauto replay --to``) is no dead letter (:meth:`Store.dead_letters_of`).
    An item that arrives is marked delivered; the others stay dead, with this attempt's
    error (``retry: ...``). Nothing is audited here: the daemon's background retry audits
    what it delivered."""
    job = store.get_job(job_id)
    if job is None:
        raise RtautoError(f"no job {job_id!r} in the store")
    rows = store.dead_letters_of(job.id)
    destinations = job_destinations(settings, job.workflow_text)
    home = Path(settings.home) if getattr(settings, "home", None) is not None else None
    return _send_again(store, job.id, rows, None, destinations, host, home, "retry")


def _send_again(
    store: Any,
    job_id: str,
    rows: list[Any],
    destination: str | None,
    destinations: Mapping[str, Destination],
    host: Any,
    home: Path | None,
    label: str,
) -> list[ReplayResult]:
    """Send the items of these delivery records again, to ``destination`` or each to its
    own; ``label`` starts the error a record keeps when its item does not arrive."""
    # one send per destination, an item once per destination: sent by several steps, it
    # goes once and counts for each of them
    plan: dict[str, dict[str, list[Any]]] = {}
    for row in rows:
        target = destination or row.destination
        plan.setdefault(target, {}).setdefault(row.item_key, []).append(row)
    results: list[ReplayResult] = []
    for target, by_key in plan.items():
        results.extend(_replay_to(store, job_id, target, by_key, destinations, host, home, label))
    return results


def _replay_to(
    store: Any,
    job_id: str,
    target: str,
    by_key: Mapping[str, list[Any]],
    destinations: Mapping[str, Destination],
    host: Any,
    home: Path | None,
    label: str,
) -> list[ReplayResult]:
    items = {key: DeliveryItem(key, Path(rows[0].path)) for key, rows in by_key.items()}
    try:
        resolved = resolve_destination(target, destinations, host.destination_types.get, home=home)
    except StepError as exc:
        # the destination is no longer configured: nothing was sent, the records stay as they are
        return [
            ReplayResult(key, rows[0].path, target, rows[0].step_id, False, str(exc))
            for key, rows in by_key.items()
        ]
    # the record of each step that sent the item, at the target (made when new: --to)
    records = {
        key: list(
            {
                row.step_id: store.delivery(job_id, row.step_id, key, row.path, target)
                for row in rows
            }.values()
        )
        for key, rows in by_key.items()
    }
    confirmed: set[str] = set()
    error: str | None = None

    def confirm(item: DeliveryItem) -> None:
        for record in records[item.key]:
            store.update_delivery(
                record.id,
                status="delivered",
                attempts=record.attempts + 1,
                last_error=None,
                delivered_at=time.time(),
            )
        confirmed.add(item.key)

    try:
        send_items(resolved, list(items.values()), confirm)
    except StepError as exc:
        error = str(exc)
    results = []
    for key, rows in by_key.items():
        if key in confirmed:
            results.append(ReplayResult(key, rows[0].path, target, rows[0].step_id, True))
            continue
        for record in records[key]:
            # a record delivered before stays delivered; a new or dead one is a dead letter
            status = "delivered" if record.status == "delivered" else "dead"
            store.update_delivery(
                record.id,
                status=status,
                attempts=record.attempts + 1,
                last_error=f"{label}: {error or 'not confirmed by the destination'}",
            )
        results.append(ReplayResult(key, rows[0].path, target, rows[0].step_id, False, error))
    return results
