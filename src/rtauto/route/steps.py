"""The routing steps ``route.dicom``, ``route.folder`` and ``route.send``.

Each selects items (the artifacts of earlier steps, the job's received instances, or both;
optionally only some steps' and some modalities'), then delivers them with
:func:`rtauto.route.deliveries.deliver`: delivery records, no re-send of what a destination
already confirmed, retries through the engine, alternates on the last attempt, dead letters.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom.errors import InvalidDicomError

from rtauto.destinations import DestinationType
from rtauto.errors import StepFailed
from rtauto.route.deliveries import (
    FOLDER_NAME_PREFIX,
    DeliveryItem,
    DeliveryLedger,
    ResolvedDestination,
    deliver,
    resolve_destination,
)
from rtauto.route.dicom import DICOM_DESTINATION
from rtauto.route.dicomweb import DICOMWEB_DESTINATION
from rtauto.route.folder import FOLDER_DESTINATION, FolderDestinationConfig
from rtauto.steps import StepContext, StepResult

__all__ = [
    "ROUTE_OUTPUTS",
    "RouteDicomParams",
    "RouteFolderParams",
    "RouteSendParams",
    "destination_type_named",
    "route_dicom",
    "route_folder",
    "route_send",
    "select_items",
]

BUILTIN_DESTINATION_TYPES: dict[str, DestinationType] = {
    DICOM_DESTINATION.name: DICOM_DESTINATION,
    DICOMWEB_DESTINATION.name: DICOMWEB_DESTINATION,
    FOLDER_DESTINATION.name: FOLDER_DESTINATION,
}

ROUTE_OUTPUTS = {
    "delivered": "number of items delivered by this run of the step",
    "destination": "name of the destination used (an alternate when the primary failed)",
    "already_delivered": "items skipped because an earlier run had delivered them",
}


class _Selection(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    alternates: list[str] = Field(
        default_factory=list,
        description="destinations tried in order on the last attempt when the primary fails",
    )
    send: Literal["artifacts", "inputs", "both"] = Field(
        "artifacts", description="artifacts of earlier steps, the job's received instances, or both"
    )
    from_: list[str] | None = Field(
        None, alias="from", description="earlier step ids whose artifacts go (default: all)"
    )
    modalities: list[str] | None = Field(
        None, description="only DICOM objects of these modalities, e.g. [RTSTRUCT]"
    )


class RouteDicomParams(_Selection):
    """``route.dicom``: DICOM objects to a DICOM node (C-STORE)."""

    destination: str = Field(description="name of a dicom destination")


class RouteSendParams(_Selection):
    """``route.send``: items to a destination of any type (DICOM objects only to dicom ones)."""

    destination: str = Field(description="name of a destination of any registered type")


class RouteFolderParams(_Selection):
    """``route.folder``: any files (DICOM objects, reports) into a folder."""

    path: str | None = Field(
        None,
        description="folder: absolute (a share, which must exist), or relative: under rtauto's "
        "home (OUT/.rtauto for rtauto run), made on first use",
    )
    destination: str | None = Field(None, description="name of a folder destination")

    @model_validator(mode="after")
    def _one_target(self) -> RouteFolderParams:
        if (self.path is None) == (self.destination is None):
            raise ValueError("give exactly one of path or destination")
        return self


@functools.cache
def _plugin_destination_types() -> dict[str, DestinationType]:
    from rtauto.hooks import build_plugin_manager

    return dict(build_plugin_manager().destination_types)


def destination_type_named(name: str) -> DestinationType | None:
    """A destination type: built-in, else from the installed plugins (loaded once).

    Used when the step context carries no ``destination_types`` (a context built by hand).
    """
    return BUILTIN_DESTINATION_TYPES.get(name) or _plugin_destination_types().get(name)


def _file_key(path: Path, job_dir: Path) -> str:
    try:
        shown = str(path.resolve().relative_to(job_dir.resolve()))
    except ValueError:
        shown = str(path)
    key = f"file:{shown}"
    if len(key) > 255:
        key = f"file-sha256:{hashlib.sha256(shown.encode()).hexdigest()}"
    return key


def _sop_instance_uid(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise StepFailed(f"artifact {path} is not a readable DICOM file: {exc}") from exc
    if "SOPInstanceUID" not in ds:
        raise StepFailed(f"artifact {path} has no SOP Instance UID")
    return str(ds.SOPInstanceUID)


def select_items(ctx: StepContext, params: _Selection, *, dicom_only: bool) -> list[DeliveryItem]:
    """The items a routing step delivers, in order, each once.

    ``dicom_only`` leaves out artifacts that are not DICOM objects (``modality`` unset).
    """
    wanted = {m.upper() for m in params.modalities} if params.modalities is not None else None
    items: dict[str, DeliveryItem] = {}
    if params.send in ("artifacts", "both"):
        unknown = [sid for sid in params.from_ or () if sid not in ctx.previous]
        if unknown:
            raise StepFailed(
                f"'from' names {', '.join(unknown)}, not an earlier step of this job "
                f"(earlier: {', '.join(ctx.previous) or 'none'})"
            )
        for artifact in ctx.artifacts_of(*(params.from_ or ())):
            modality = artifact.modality.upper() if artifact.modality else None
            if modality is None and dicom_only:
                continue
            if wanted is not None and modality not in wanted:
                continue
            if modality is not None:
                key = artifact.sop_instance_uid or _sop_instance_uid(artifact.path)
            else:
                key = _file_key(artifact.path, ctx.job_dir)
            items.setdefault(key, DeliveryItem(key, Path(artifact.path), modality))
    if params.send in ("inputs", "both"):
        for series in ctx.study.series:
            modality = series.modality.upper()
            if wanted is not None and modality not in wanted:
                continue
            for instance in series.instances:
                key = instance.sop_instance_uid
                items.setdefault(key, DeliveryItem(key, Path(instance.path), modality))
    return list(items.values())


def _home(ctx: StepContext) -> Path | None:
    home = getattr(ctx.settings, "home", None)
    return Path(home) if home is not None else None


def _run(
    ctx: StepContext,
    params: _Selection,
    primary: str,
    *,
    required_type: str | None,
    dicom_only: bool | None = None,
) -> StepResult:
    home = _home(ctx)
    registered = ctx.destination_types

    def lookup(type_name: str) -> DestinationType | None:
        return registered.get(type_name) or destination_type_named(type_name)

    # the primary must be of the step's type; an alternate may be any (a folder fallback)
    chain: list[ResolvedDestination] = [
        resolve_destination(
            name,
            ctx.destinations,
            lookup,
            required_type=required_type if index == 0 else None,
            home=home,
        )
        for index, name in enumerate((primary, *params.alternates))
    ]
    if dicom_only is None:
        dicom_only = chain[0].type.dicom_only
    items = select_items(ctx, params, dicom_only=dicom_only)
    if not items:
        return StepResult(
            outputs={"delivered": 0, "destination": chain[0].name, "already_delivered": 0},
            summary="nothing to deliver",
        )
    real = chain[0]
    if ctx.dry_run is not None:
        # every destination was resolved and checked above; the items go to a folder instead
        chain = [_dry_run_folder(ctx.dry_run, real.name)]
    store = None
    if ctx.store_url:
        from rtauto.store import Store

        store = Store(ctx.store_url)
    try:
        outputs: dict[str, Any] = deliver(
            items,
            chain,
            DeliveryLedger(store, ctx.job_id, ctx.step_id),
            final_attempt=ctx.attempt >= ctx.max_attempts,
            logger=ctx.logger,
        )
    finally:
        if store is not None:
            store.close()
    if ctx.dry_run is not None:
        outputs["destination"] = real.name
        return StepResult(
            outputs=outputs,
            summary=f"dry run: {outputs['delivered']} item(s) for {real.name} "
            f"({real.type.name}) copied to {chain[0].name.removeprefix(FOLDER_NAME_PREFIX)}"
            " instead",
        )
    summary = f"delivered {outputs['delivered']} item(s) to {outputs['destination']}"
    if outputs["already_delivered"]:
        summary += f", {outputs['already_delivered']} already delivered before"
    return StepResult(outputs=outputs, summary=summary)


def _dry_run_folder(root: Path, name: str) -> ResolvedDestination:
    """The folder under ``root`` that stands in for destination ``name`` in a dry run.

    Recorded as a folder given by path, so a replay of the dry run's deliveries goes to the
    same folder and never to the real destination.
    """
    if name.startswith(FOLDER_NAME_PREFIX):
        name = "folder-" + Path(name.removeprefix(FOLDER_NAME_PREFIX)).name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "destination"
    folder = (root / safe).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    config = FolderDestinationConfig(path=folder, layout="by-series")
    return ResolvedDestination(FOLDER_NAME_PREFIX + str(folder), FOLDER_DESTINATION, config)


def route_dicom(ctx: StepContext, params: RouteDicomParams) -> StepResult:
    """Send DICOM artifacts (and/or inputs) to a DICOM node, over one association."""
    return _run(ctx, params, params.destination, required_type="dicom", dicom_only=True)


def route_send(ctx: StepContext, params: RouteSendParams) -> StepResult:
    """Send items to a destination of any type; to a dicom one only DICOM objects go."""
    return _run(ctx, params, params.destination, required_type=None)


def route_folder(ctx: StepContext, params: RouteFolderParams) -> StepResult:
    """Copy artifacts (any file) and/or inputs into a folder."""
    if params.path is not None:
        path = Path(params.path).expanduser()
        home = _home(ctx)
        if not path.is_absolute() and home is not None:
            path = home / path
            if ctx.dry_run is None:
                # a folder of rtauto's own, made on first use; an absolute path is a share
                # that must be there already (missing means not mounted: retried)
                path.mkdir(parents=True, exist_ok=True)
        primary = FOLDER_NAME_PREFIX + str(path.resolve())
    else:
        primary = str(params.destination)
    return _run(ctx, params, primary, required_type="folder", dicom_only=False)
