"""Delivering items to named destinations: delivery records, alternates, the dead-letter list.

One record per (item, destination) in the store's ``deliveries`` table. An item is marked
``sending`` before the transfer and ``delivered`` right after the destination confirms it, so
a routing step run again after a crash sends only what was not confirmed. When every
destination fails, the item's record at the primary destination becomes ``dead`` (the
dead-letter list that ``rtauto replay`` works from); its records at alternates say ``failed``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select, update

from rtauto.config import Destination
from rtauto.destinations import DestinationType
from rtauto.errors import StepError, StepFailed, StepRetry
from rtauto.store.models import Delivery

__all__ = [
    "FOLDER_NAME_PREFIX",
    "DeliveryItem",
    "DeliveryLedger",
    "ResolvedDestination",
    "deliver",
    "resolve_destination",
    "send_items",
]

log = logging.getLogger("rtauto.route")

# a folder given by path in a workflow (not by name) is recorded as "folder:<absolute path>"
FOLDER_NAME_PREFIX = "folder:"


@dataclass(frozen=True)
class DeliveryItem:
    """One thing to deliver: ``key`` is its SOP Instance UID, or ``file:<path>`` for others."""

    key: str
    path: Path
    modality: str | None = None


@dataclass(frozen=True)
class ResolvedDestination:
    """A named destination with its type and validated configuration."""

    name: str
    type: DestinationType
    config: BaseModel


def _absolute_folder(config: BaseModel, base: Path | None) -> BaseModel:
    """A folder destination's relative ``path`` taken relative to ``base`` (rtauto's home),
    and made there when missing: inside rtauto's own home it cannot be a share that is not
    mounted (an absolute path that is missing is one, and waits for it)."""
    path = getattr(config, "path", None)
    if isinstance(path, Path) and not path.is_absolute() and base is not None:
        absolute = (base / path).resolve()
        if absolute.is_relative_to(Path(base).resolve()):  # not out through .. or a link
            with contextlib.suppress(OSError):  # unwritable: the delivery says why
                absolute.mkdir(parents=True, exist_ok=True)
        return config.model_copy(update={"path": absolute})
    return config


def resolve_destination(
    name: str,
    destinations: Mapping[str, Any],
    types: Mapping[str, DestinationType] | Callable[[str], DestinationType | None],
    *,
    required_type: str | None = None,
    home: Path | None = None,
) -> ResolvedDestination:
    """Look ``name`` up and validate its block with its type's config model.

    ``types`` maps type names to :class:`DestinationType` (or is a lookup function).
    ``folder:<path>`` names a folder by path. Raises :class:`StepFailed` naming the problem.
    """
    lookup = types.get if isinstance(types, Mapping) else types
    if name.startswith(FOLDER_NAME_PREFIX) and name not in destinations:
        block = Destination.model_validate(
            {"type": "folder", "path": name.removeprefix(FOLDER_NAME_PREFIX)}
        )
    elif name in destinations:
        raw = destinations[name]
        try:
            block = raw if isinstance(raw, Destination) else Destination.model_validate(raw)
        except ValidationError as exc:
            raise StepFailed(f"destination {name!r} is invalid: {exc}") from exc
    else:
        known = ", ".join(sorted(destinations)) or "none"
        raise StepFailed(f"destination {name!r} is not defined (defined: {known})")
    type_name = block.resolved_type()
    if required_type is not None and type_name != required_type:
        raise StepFailed(
            f"destination {name!r} is of type {type_name!r}; "
            f"this step needs a {required_type!r} destination"
        )
    destination_type = lookup(type_name)
    if destination_type is None:
        raise StepFailed(
            f"destination {name!r} has type {type_name!r}, which no installed plugin provides"
        )
    try:
        config = destination_type.config.model_validate(block.options())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(block)'}: {e['msg']}" for e in exc.errors()
        )
        raise StepFailed(f"destination {name!r} is invalid: {problems}") from exc
    return ResolvedDestination(name, destination_type, _absolute_folder(config, home))


class DeliveryLedger:
    """The delivery records of one routing step of one job; records nothing without a store."""

    def __init__(self, store: Any | None, job_id: str, step_id: str):
        self.store = store
        self.job_id = job_id
        self.step_id = step_id
        self._ids: dict[tuple[str, str], int] = {}

    def delivered_to(self) -> dict[str, str]:
        """Item key -> destination, for items this step already delivered anywhere: to a
        destination of its chain, or to another that ``rtauto replay --to`` sent them to."""
        if self.store is None:
            return {}
        return {
            row.item_key: row.destination
            for row in self.store.deliveries_of(self.job_id)
            if row.step_id == self.step_id and row.status == "delivered"
        }

    def start(self, items: Sequence[DeliveryItem], destination: str) -> None:
        """Mark the items ``sending`` to ``destination`` (one more attempt each).

        One transaction for all items, before the transfer begins.
        """
        if self.store is None or not items:
            return
        now = time.time()
        with self.store.session() as session:
            query = select(Delivery).where(
                Delivery.job_id == self.job_id,
                Delivery.step_id == self.step_id,
                Delivery.destination == destination,
            )
            existing = {row.item_key: row for row in session.scalars(query)}
            rows = []
            for item in items:
                row = existing.get(item.key)
                if row is None:
                    row = Delivery(
                        job_id=self.job_id,
                        step_id=self.step_id,
                        item_key=item.key,
                        destination=destination,
                        attempts=0,
                    )
                    session.add(row)
                row.status = "sending"
                row.attempts += 1
                row.path = str(item.path)
                row.updated_at = now
                rows.append(row)
            session.flush()
            self._ids.update({(row.item_key, destination): row.id for row in rows})

    def delivered(self, item: DeliveryItem, destination: str) -> None:
        if self.store is None:
            return
        self.store.update_delivery(
            self._ids[(item.key, destination)],
            status="delivered",
            last_error=None,
            delivered_at=time.time(),
        )

    def failed(
        self, items: Iterable[DeliveryItem], destination: str, error: str, status: str = "failed"
    ) -> None:
        """Record why the items did not reach ``destination`` (``dead``: the dead-letter list)."""
        if self.store is None:
            return
        items = list(items)
        self.start([i for i in items if (i.key, destination) not in self._ids], destination)
        ids = [self._ids[(item.key, destination)] for item in items]
        if not ids:
            return
        with self.store.session() as session:
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(ids))
                .values(status=status, last_error=error, updated_at=time.time())
            )


def _accepts_progress(send: Callable[..., Any]) -> bool:
    try:
        return "on_delivered" in inspect.signature(send).parameters
    except (TypeError, ValueError):
        return False


def send_items(
    destination: ResolvedDestination,
    items: Sequence[DeliveryItem],
    on_delivered: Callable[[DeliveryItem], None],
) -> None:
    """Send ``items`` with the destination type's ``send``; ``on_delivered`` per confirmed item.

    A type whose ``send`` takes an ``on_delivered`` keyword reports each file as it is
    confirmed; for any other, every item counts as delivered once ``send`` returns.
    """
    by_path = {item.path: item for item in items}
    files = list(by_path)
    if _accepts_progress(destination.type.send):
        destination.type.send(
            destination.config, files, on_delivered=lambda path: on_delivered(by_path[Path(path)])
        )
    else:
        destination.type.send(destination.config, files)
        for item in by_path.values():
            on_delivered(item)


def deliver(
    items: Sequence[DeliveryItem],
    chain: Sequence[ResolvedDestination],
    ledger: DeliveryLedger,
    *,
    final_attempt: bool,
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """Deliver ``items`` to ``chain[0]``, falling back to the alternates ``chain[1:]``.

    Items this step already delivered to any destination (see
    :meth:`DeliveryLedger.delivered_to`) are skipped. A
    transient failure of the primary raises :class:`StepRetry` unless ``final_attempt``; on
    the final attempt, or after a permanent refusal, the alternates are tried in order with
    what is still undelivered. When all fail the records go to the dead-letter list and
    :class:`StepFailed` names each destination and its error.

    Returns the step outputs ``{"delivered", "destination", "already_delivered"}``.
    """
    logger = logger or log
    primary = chain[0]
    done = ledger.delivered_to()
    already = [item for item in items if item.key in done]
    pending = [item for item in items if item.key not in done]
    if not pending:
        used = done[already[0].key] if already else primary.name
        return {"delivered": 0, "destination": used, "already_delivered": len(already)}

    confirmed: set[str] = set()
    errors: list[tuple[str, StepError]] = []
    for index, destination in enumerate(chain):
        remaining = [item for item in pending if item.key not in confirmed]
        ledger.start(remaining, destination.name)

        def confirm(item: DeliveryItem, name: str = destination.name) -> None:
            ledger.delivered(item, name)
            confirmed.add(item.key)

        try:
            send_items(destination, remaining, confirm)
        except StepError as exc:
            unsent = [item for item in remaining if item.key not in confirmed]
            ledger.failed(unsent, destination.name, str(exc))
            errors.append((destination.name, exc))
            logger.warning("delivery to %s failed: %s", destination.name, exc)
            if index == 0 and isinstance(exc, StepRetry) and not final_attempt:
                # the primary may be back next time: alternates wait for the last attempt
                raise StepRetry(f"{destination.name}: {exc}", after=exc.after) from exc
            continue
        if errors:
            logger.warning("used alternate %s after %s", destination.name, _describe(errors))
        return {
            "delivered": len(confirmed),
            "destination": destination.name,
            "already_delivered": len(already),
        }

    unsent = [item for item in pending if item.key not in confirmed]
    message = _describe(errors)
    ledger.failed(unsent, primary.name, message, status="dead")
    raise StepFailed(
        f"{len(unsent)} of {len(items)} item(s) could not be delivered and are in the "
        f"dead-letter list: {message}"
    )


def _describe(errors: Sequence[tuple[str, StepError]]) -> str:
    return "; ".join(f"{name}: {exc}" for name, exc in errors)
