"""The step types: ``autocontour.segment`` (a model) and ``autocontour.threshold`` (HU rules).

Both load the job's CT series through :func:`rtauto.dicom.geometry.load_series`, build
structures on its grid and write an RTSTRUCT (default), a SEG or both into ``ctx.workdir``.
Files are written under a temporary name and renamed only when complete, so a failed step
leaves nothing a TPS could mistake for a result. Bad input (a missing slice, mixed
orientations, an unknown model, weights that do not match their card) ends the step FAIL
with the reason.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rtauto.dicom.geometry import GeometryError, Volume, load_series
from rtauto.dicom.rtstruct import ContourLimitError, Structure, write_rtstruct
from rtauto.dicom.seg import write_seg
from rtauto.errors import StepFailed
from rtauto.steps import StepContext, StepResult, StepType
from rtauto.uids import new_uid
from rtauto_autocontour.backends import BUILTIN_BACKENDS, load_predictor
from rtauto_autocontour.inference import segment
from rtauto_autocontour.registry import ModelError, ModelRegistry, RegisteredModel
from rtauto_autocontour.threshold import body_mask, lung_masks

__all__ = [
    "SEGMENT_STEP",
    "THRESHOLD_STEP",
    "SegmentParams",
    "ThresholdParams",
    "registry_for",
    "run_segment",
    "run_threshold",
]

Output = Literal["rtstruct", "seg", "both"]


class SegmentParams(BaseModel):
    """``with:`` of ``autocontour.segment``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        ...,
        pattern=r"^[a-z0-9][a-z0-9._-]*(@[0-9A-Za-z._-]+)?$",
        description="NAME@VERSION, NAME@latest or NAME (= latest) of a card in models_dir",
    )
    structures: list[str] | None = Field(None, description="subset of the model's labels")
    output: Output = "rtstruct"
    keyhole: bool = Field(False, description="splice holes into outer contours")
    drop_empty: bool = Field(False, description="leave out structures the model did not find")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sw_batch_size: int = Field(4, ge=1, le=64, description="patches per backend call")
    max_contours: int = Field(
        50_000,
        ge=1,
        description="a structure traced into more contours fails the step: the model's output "
        "is scattered voxels (untrained weights, or a card whose normalization or orientation "
        "does not match the network), which no TPS should be sent",
    )


class ThresholdParams(BaseModel):
    """``with:`` of ``autocontour.threshold``."""

    model_config = ConfigDict(extra="forbid")

    structures: list[Literal["BODY", "Lung_L", "Lung_R"]] = Field(default_factory=lambda: ["BODY"])
    body_hu: float = Field(-350.0, description="external: voxels above this HU")
    lung_hu: float = Field(-400.0, description="lungs: air below this HU inside the body")
    opening_mm: float = Field(4.0, ge=0, le=30, description="in-plane opening to cut a couch")
    output: Output = "rtstruct"
    keyhole: bool = False


@functools.lru_cache(maxsize=8)
def registry_for(models_dir: Path) -> ModelRegistry:
    """The registry of a models folder, one per process (it rescans itself on change)."""
    # backends other plugins register are looked up only when a card names one
    return ModelRegistry(models_dir, backends=None)


@functools.lru_cache(maxsize=1)
def _backends() -> dict[str, Callable[..., Any]]:
    """Backend loaders: the built-ins and those other plugins register (one lookup a process;
    it imports every plugin, so it is done only for a card whose backend is not built in)."""
    from rtauto.hooks import build_plugin_manager

    return {**BUILTIN_BACKENDS, **build_plugin_manager().model_backends}


def _load_ct(ctx: StepContext, modality: str = "CT") -> Volume:
    series = ctx.study.one_series(modality)
    try:
        return load_series(series.files)
    except GeometryError as exc:
        raise StepFailed(f"series {series.series_instance_uid}: {exc}") from exc


def _write_outputs(
    ctx: StepContext,
    volume: Volume,
    structures: Sequence[Structure],
    output: Output,
    *,
    keyhole: bool,
    drop_empty: bool,
    label: str,
    algorithm: tuple[str, str],
    extra_versions: Sequence[str],
    extra_description: str,
    provenance: dict[str, Any],
    max_contours: int | None = None,
    algorithm_family: str = "ArtificialIntelligence",
) -> dict[str, str]:
    """Write RTSTRUCT and/or SEG atomically into the workdir and record them as artifacts."""
    if drop_empty and not any(s.mask.any() for s in structures):
        # an RTSTRUCT needs one ROI and a SEG one segment: nothing a TPS could load is left
        names = ", ".join(s.name for s in structures)
        raise StepFailed(f"no structure was found (empty: {names}); nothing was written")
    versions = [*ctx.provenance.software_versions(), *extra_versions]
    description = ctx.provenance.derivation_description() + extra_description
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    uids: dict[str, str] = {}
    written: list[tuple[Path, Path, str, str]] = []
    partials: list[Path] = []  # every file begun, finished or not
    try:
        if output in ("rtstruct", "both"):
            uid = new_uid()
            final = ctx.workdir / f"RS.{uid}.dcm"
            partial = ctx.workdir / f".RS.{uid}.partial"
            partials.append(partial)
            write_rtstruct(
                volume,
                structures,
                partial,
                label=label,
                series_description=f"rtauto {label}",
                series_number=ctx.series_number(0),
                manufacturer="rtauto",
                software_versions=versions,
                derivation_description=description,
                keyhole=keyhole,
                drop_empty=drop_empty,
                sop_instance_uid=uid,
                max_contours=max_contours,
            )
            written.append((partial, final, "RTSTRUCT", uid))
        if output in ("seg", "both"):
            kept = [s for s in structures if s.mask.any()] if drop_empty else list(structures)
            uid = new_uid()
            final = ctx.workdir / f"SEG.{uid}.dcm"
            partial = ctx.workdir / f".SEG.{uid}.partial"
            partials.append(partial)
            write_seg(
                volume,
                kept,
                partial,
                algorithm_name=algorithm[0],
                algorithm_version=algorithm[1],
                algorithm_family=algorithm_family,
                manufacturer="rtauto",
                model_name=algorithm[0],
                software_versions=versions,
                derivation_description=description,
                series_description=f"rtauto {label}",
                series_number=ctx.series_number(1),
                sop_instance_uid=uid,
            )
            written.append((partial, final, "SEG", uid))
    except Exception:
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise
    for partial, final, kind, uid in written:
        os.replace(partial, final)
        ctx.add_artifact(
            final,
            kind=kind,
            modality=kind,
            sop_instance_uid=uid,
            description=f"{label}: {', '.join(s.name for s in structures)}",
            provenance=provenance,
        )
        uids[kind] = uid
    return uids


def run_segment(ctx: StepContext, params: SegmentParams) -> StepResult:
    """``autocontour.segment``: the named model's structures on the job's CT."""
    started = time.perf_counter()
    registry = registry_for(Path(ctx.settings.models_dir).resolve())
    try:
        model: RegisteredModel = registry.resolve(params.model)
    except ModelError as exc:
        raise StepFailed(str(exc)) from exc
    card = model.card
    wanted = params.structures or card.structure_names
    unknown = sorted(set(wanted) - set(card.structure_names))
    if unknown:
        raise StepFailed(
            f"model {model.ref} has no structure {unknown}; it offers {card.structure_names}"
        )
    loading = time.perf_counter()
    volume = _load_ct(ctx, card.input_modality)
    load_seconds = time.perf_counter() - loading
    backends = BUILTIN_BACKENDS if card.backend in BUILTIN_BACKENDS else _backends()
    try:
        predictor = load_predictor(model, backends, params.device)
        result = segment(volume, card, predictor, sw_batch_size=params.sw_batch_size)
    except (ModelError, ValueError) as exc:
        raise StepFailed(str(exc)) from exc
    ctx.logger.info("model %s ran on %s: %s", model.ref, result.provider, result.timings)

    structures = []
    for index, spec in sorted(card.labels.items()):
        if spec.name in wanted:
            structures.append(
                Structure(
                    name=spec.name,
                    mask=result.labels == index,
                    color=spec.color,
                    interpreted_type=spec.interpreted_type,
                    description=f"model {model.ref}",
                    algorithm="AUTOMATIC",
                    number=index,
                )
            )
    provenance = {
        "model": model.ref,
        "model_card_sha256": model.card_hash,
        "model_weights_sha256": card.sha256,
        "backend": card.backend,
        "provider": result.provider,
    }
    writing = time.perf_counter()
    try:
        uids = _write_outputs(
            ctx,
            volume,
            structures,
            params.output,
            keyhole=params.keyhole,
            drop_empty=params.drop_empty,
            label=card.name,
            algorithm=(card.name, card.version),
            extra_versions=[f"model {model.ref}"],
            extra_description=f"; model {model.ref} (card sha256 {model.card_hash})",
            provenance=provenance,
            max_contours=params.max_contours,
        )
    except ContourLimitError as exc:
        raise StepFailed(
            f"model {model.ref}: {exc}. Nothing was written: check that the card's "
            "normalization, orientation and spacing are those the network was trained with "
            "(max_contours sets the limit)"
        ) from exc
    write_seconds = time.perf_counter() - writing
    empty = [s.name for s in structures if not s.mask.any()]
    timings = {"load": round(load_seconds, 3)}
    timings.update((k, round(v, 3)) for k, v in result.timings.items())
    timings["write"] = round(write_seconds, 3)
    timings["total"] = round(time.perf_counter() - started, 3)
    return StepResult(
        outputs={
            **provenance,
            "structures": [s.name for s in structures],
            "empty_structures": empty,
            "referenced_images": len(volume.sop_instance_uids),
            "frame_of_reference_uid": volume.frame_of_reference_uid,
            "rtstruct_sop_instance_uid": uids.get("RTSTRUCT"),
            "seg_sop_instance_uid": uids.get("SEG"),
            "timings": timings,
        },
        summary=(
            f"{model.ref} on {result.provider}: {len(structures) - len(empty)} of "
            f"{len(structures)} structures found"
            + (f" (empty: {', '.join(empty)})" if empty else "")
        ),
    )


def run_threshold(ctx: StepContext, params: ThresholdParams) -> StepResult:
    """``autocontour.threshold``: BODY (couch removed) and lungs by HU."""
    volume = _load_ct(ctx)
    body = body_mask(volume, params.body_hu, params.opening_mm)
    masks: dict[str, np.ndarray] = {"BODY": body}
    if {"Lung_L", "Lung_R"} & set(params.structures):
        masks.update(lung_masks(volume, body, params.lung_hu))
    styles = {
        "BODY": ((0, 255, 0), "EXTERNAL"),
        "Lung_L": ((0, 160, 255), "ORGAN"),
        "Lung_R": ((255, 200, 0), "ORGAN"),
    }
    rule = f"threshold body>{params.body_hu:g} HU, lungs<{params.lung_hu:g} HU"
    structures = [
        Structure(
            name=name,
            mask=masks[name],
            color=styles[name][0],
            interpreted_type=styles[name][1],
            description=rule,
            algorithm="AUTOMATIC",
        )
        for name in params.structures
    ]
    uids = _write_outputs(
        ctx,
        volume,
        structures,
        params.output,
        keyhole=params.keyhole,
        drop_empty=False,
        label="threshold",
        algorithm=("rtauto-threshold", "1"),
        algorithm_family="HistogramAnalysis",  # HU thresholds and morphology, no model
        extra_versions=[],
        extra_description=f"; {rule}",
        provenance={"rule": rule},
    )
    empty = [s.name for s in structures if not s.mask.any()]
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    return StepResult(
        outputs={
            "structures": [s.name for s in structures],
            "empty_structures": empty,
            "volumes_ml": {s.name: round(float(s.mask.sum()) * voxel_ml, 1) for s in structures},
            "referenced_images": len(volume.sop_instance_uids),
            "frame_of_reference_uid": volume.frame_of_reference_uid,
            "rtstruct_sop_instance_uid": uids.get("RTSTRUCT"),
            "seg_sop_instance_uid": uids.get("SEG"),
        },
        summary=f"threshold contours: {', '.join(params.structures)}",
    )


def _warmup() -> None:
    # importing these takes seconds; a worker pays it once, not per job
    import monai.inferers  # noqa: F401
    import onnxruntime  # noqa: F401


def segment_resources(params: SegmentParams, settings: Any) -> dict[str, str]:
    """The model the step will run, resolved now (``NAME@latest`` to its version) and
    verified, with the hashes of its card and weights; StepFailed when it cannot be used."""
    registry = registry_for(Path(settings.models_dir).resolve())
    try:
        model = registry.resolve(params.model)
    except ModelError as exc:
        raise StepFailed(str(exc)) from exc
    return {
        "model": model.ref,
        "model_card_sha256": model.card_hash,
        "model_weights_sha256": model.card.sha256,
    }


SEGMENT_STEP = StepType(
    name="autocontour.segment",
    run=run_segment,
    params=SegmentParams,
    description="Contour the CT with a registered model; RTSTRUCT and/or SEG output.",
    outputs={
        "model": "NAME@VERSION that ran",
        "model_card_sha256": "sha256 of the model card used",
        "provider": "what ran the network (e.g. CPUExecutionProvider)",
        "structures": "structure names written",
        "empty_structures": "structures the model did not find",
        "rtstruct_sop_instance_uid": "SOP Instance UID of the RTSTRUCT (or null)",
        "seg_sop_instance_uid": "SOP Instance UID of the SEG (or null)",
    },
    warmup=_warmup,
    resources=segment_resources,
)

THRESHOLD_STEP = StepType(
    name="autocontour.threshold",
    run=run_threshold,
    params=ThresholdParams,
    description="BODY (couch removed) and lungs from HU thresholds; no model needed.",
    outputs={
        "structures": "structure names written",
        "empty_structures": "structures that came out empty",
        "volumes_ml": "volume of each structure in mL",
        "rtstruct_sop_instance_uid": "SOP Instance UID of the RTSTRUCT (or null)",
    },
)
