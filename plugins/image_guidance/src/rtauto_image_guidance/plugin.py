"""Image-guidance steps: ``image_guidance.register``, ``image_guidance.propagate_contours``.

``image_guidance.register`` finds the reference (planning) image of the image of the day,
registers them (rigid 6-DoF, optionally deformable on top), writes a Spatial Registration
(and a Deformable Spatial Registration) object, a couch-shift report, and ends with outcome
``pass`` or ``flag`` (shift beyond the action levels, or a registration whose quality figures
are out of bounds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from rtauto_image_guidance.couch import couch_shift, patient_to_iec
from rtauto_image_guidance.io import SeriesImage, read_series
from rtauto_image_guidance.isocenter import IsocenterFrom, choose_isocenter
from rtauto_image_guidance.reference import ReferenceRule, choose_daily, resolve_reference
from rtauto_image_guidance.registration import (
    RigidSettings,
    deformable_register,
    rigid_register,
)

from rtauto import hookimpl
from rtauto.dicom.reg import (
    RegisteredSeries,
    read_registration,
    write_deformable_registration,
    write_spatial_registration,
)
from rtauto.errors import StepFailed
from rtauto.steps import StepContext, StepResult, StepType

__all__ = [
    "PropagateParams",
    "RegisterParams",
    "propagate_contours",
    "register_images",
    "rtauto_register_steps",
    "warmup",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActionLevels(_Strict):
    """Couch-shift tolerances: any component beyond its level flags the result."""

    translation_mm: float = Field(
        3.0, gt=0, description="per axis (lateral, longitudinal, vertical)"
    )
    rotation_deg: float = Field(2.0, gt=0, description="per axis (pitch, roll, yaw)")


class ReferenceParams(_Strict):
    """How the reference (planning) image is found; see ``rtauto_image_guidance.reference``."""

    rule: ReferenceRule = "auto"
    series_description: str | None = Field(
        None, description="regular expression the reference's SeriesDescription must match"
    )


class QualityLimits(_Strict):
    """Registration quality checks (AAPM TG-132); a failed check flags the result."""

    min_overlap: float = Field(0.3, ge=0, le=1, description="below this the step fails")
    max_inverse_consistency_mm: float = Field(1.0, gt=0)
    jacobian_range: tuple[float, float] = (0.2, 5.0)  # deformable: folding or extreme volume change


class RegisterParams(_Strict):
    method: Literal["rigid", "deformable"] = "rigid"
    backend: Literal["simpleitk", "elastix"] = "simpleitk"
    metric: Literal["mattes", "correlation", "mean_squares"] = "mattes"
    masks: list[Literal["fov", "body"]] = Field(
        default_factory=lambda: ["fov", "body"],
        description="fov: the metric only sees the moving field of view (always on); "
        "body: and only the patient in the reference image",
    )
    resolution_mm: float = Field(1.5, gt=0.2, le=10)
    action_levels: ActionLevels = Field(default_factory=ActionLevels)
    quality: QualityLimits = Field(default_factory=QualityLimits)
    outputs: list[Literal["reg", "report"]] = Field(default_factory=lambda: ["reg", "report"])
    reference: ReferenceParams = Field(default_factory=ReferenceParams)
    daily_description: str | None = Field(
        None, description="regular expression picking the image of the day among the input"
    )
    isocenter_mm: tuple[float, float, float] | None = Field(
        None,
        description="treatment isocentre in patient coordinates (couch rotations turn about "
        "it); when given, isocenter_from is not used",
    )
    isocenter_from: IsocenterFrom = Field(
        "auto",
        description="where the isocentre comes from without isocenter_mm: plan = the "
        "IsocenterPosition of the patient's RT (Ion) Plan on the reference's Frame of "
        "Reference (job input, else job store; the step fails without a single one); "
        "image_center = the centre of the image of the day; auto = plan when found, else "
        "image_center (the report says which and why)",
    )
    couch_shift: bool = Field(True, description="compute the IEC 61217 couch shift")
    smoothing_mm: float = Field(
        3.0, gt=0, description="deformable: field regularisation (Gaussian)"
    )
    field_spacing_mm: float = Field(4.0, gt=0.5, description="deformable: written vector grid")


REGISTER_OUTPUTS = {
    "outcome": "pass | flag (shift beyond action levels or a failed quality check)",
    "couch_shift": "lateral_mm, longitudinal_mm, vertical_mm, pitch_deg, roll_deg, yaw_deg "
    "(IEC 61217)",
    "quality": "similarity before/after, overlap, inverse consistency, Jacobian range",
    "quality_ok": "true when every quality check of the registration passed (a shift beyond "
    "the action levels aside): the registration itself can be trusted",
    "flags": "why the outcome is flag",
    "reference_series_uid": "the reference series found",
    "isocenter_mm": "the point couch rotations turn about (patient coordinates)",
    "isocenter_source": "where it came from: parameter, plan (input|store) with the plan's "
    "SOP Instance UID and label, or image_center (with why no plan isocentre was used)",
}


def _registered(series: SeriesImage) -> RegisteredSeries:
    return RegisteredSeries(
        frame_of_reference_uid=series.frame_of_reference_uid,
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        instances=series.instances,
    )


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}


def register_images(ctx: StepContext, params: RegisterParams) -> StepResult:
    """Register the image of the day to its reference; write REG, report; outcome pass/flag.

    Raises :class:`StepFailed` (and writes nothing) when no reference is found, the patients
    differ, a series is empty or unreadable, the fields of view barely overlap, or couch shifts
    are asked for a patient position other than HFS, HFP, FFS, FFP.
    """
    daily_input = choose_daily(ctx, params.daily_description)
    reference_choice = resolve_reference(
        ctx, daily_input, params.reference.rule, params.reference.series_description
    )
    daily = read_series(daily_input.files, label="image of the day")
    reference = read_series(reference_choice.files, label="reference series")
    if daily.patient_id != reference.patient_id:
        raise StepFailed(
            f"patient mismatch: the image of the day belongs to PatientID {daily.patient_id!r}, "
            f"the reference series {reference.series_instance_uid} to {reference.patient_id!r}"
        )
    if daily.series_instance_uid == reference.series_instance_uid:
        raise StepFailed("the reference series is the image of the day itself")
    ctx.logger.info(
        "registering %s (%s) to %s (%s, found by %s)",
        daily.series_instance_uid,
        daily.series_description,
        reference.series_instance_uid,
        reference.series_description,
        reference_choice.found_by,
    )
    if params.couch_shift:
        # an unsupported patient position fails before the registration work, not after
        patient_to_iec(daily.patient_position)
    isocenter, isocenter_source = choose_isocenter(
        ctx,
        params.isocenter_from,
        params.isocenter_mm,
        reference.frame_of_reference_uid,
        daily.patient_id,
        daily.center(),
    )
    settings = RigidSettings(
        metric=params.metric,
        resolution_mm=params.resolution_mm,
        body_mask="body" in params.masks,
        body_threshold=-400.0 if reference.modality.upper() == "CT" else None,
    )
    rigid = rigid_register(
        reference.image,
        daily.image,
        settings=settings,
        center=isocenter,
        min_overlap=params.quality.min_overlap,
        backend=params.backend,
    )
    flags: list[str] = []
    quality: dict[str, object] = {
        "similarity_before": _rounded(rigid.metric_before),
        "similarity_after": _rounded(rigid.metric_after),
        "fov_overlap": round(rigid.overlap, 4),
        "inverse_consistency_mm": round(rigid.inverse_consistency_mm or 0.0, 4),
        "iterations": rigid.iterations,
        "elapsed_s": round(rigid.elapsed_s, 2),
        "backend": params.backend,
    }
    if rigid.metric_after["nmi"] < rigid.metric_before["nmi"] - 1e-3:
        flags.append("similarity decreased during registration")
    if (rigid.inverse_consistency_mm or 0.0) > params.quality.max_inverse_consistency_mm:
        flags.append(
            f"inverse consistency {rigid.inverse_consistency_mm:.2f} mm beyond "
            f"{params.quality.max_inverse_consistency_mm} mm"
        )
    deformable = None
    if params.method == "deformable":
        deformable = deformable_register(
            reference.image,
            daily.image,
            rigid,
            settings=settings,
            smoothing_mm=params.smoothing_mm,
            match_histograms=reference.modality == daily.modality,
            field_spacing_mm=params.field_spacing_mm,
        )
        quality["deformable"] = {
            "similarity_before": _rounded(deformable.metric_before),
            "similarity_after": _rounded(deformable.metric_after),
            "jacobian_min": round(deformable.jacobian_min, 4),
            "jacobian_max": round(deformable.jacobian_max, 4),
            "elapsed_s": round(deformable.elapsed_s, 2),
        }
        low, high = params.quality.jacobian_range
        if not (low <= deformable.jacobian_min and deformable.jacobian_max <= high):
            flags.append(
                f"Jacobian range {deformable.jacobian_min:.2f}..{deformable.jacobian_max:.2f} "
                f"outside {low}..{high}"
            )

    quality_ok = not flags  # the checks of the registration itself; a large shift is not one
    shift = None
    if params.couch_shift:
        shift = couch_shift(rigid.fixed_to_moving, isocenter, daily.patient_position)
        beyond = shift.exceeds(
            params.action_levels.translation_mm, params.action_levels.rotation_deg
        )
        if beyond:
            flags.append("couch shift beyond action level: " + ", ".join(beyond))
    outcome = "flag" if flags else "pass"

    provenance = ctx.provenance
    software = provenance.software_versions()
    derivation = provenance.derivation_description()
    matrix = rigid.moving_to_fixed
    written: dict[str, str] = {}
    if "reg" in params.outputs:
        reg_path = ctx.workdir / "registration.dcm"
        reg = write_spatial_registration(
            reg_path,
            fixed=_registered(reference),
            moving=_registered(daily),
            matrix=matrix,
            study=daily.header,
            software_versions=software,
            derivation_description=derivation,
            content_description=f"rigid {params.metric} registration, outcome {outcome}",
            series_description="rtauto image guidance",
            series_number=ctx.series_number(0),
        )
        ctx.add_artifact(
            reg_path,
            kind="REG",
            modality="REG",
            sop_instance_uid=str(reg.SOPInstanceUID),
            description="rigid registration of the image of the day to the reference",
        )
        written["reg"] = str(reg.SOPInstanceUID)
        if deformable is not None:
            dreg_path = ctx.workdir / "deformable_registration.dcm"
            vectors = _field_vectors(deformable.field)
            dreg = write_deformable_registration(
                dreg_path,
                fixed=_registered(reference),
                moving=_registered(daily),
                vectors=vectors,
                grid_origin=deformable.field.GetOrigin(),
                grid_spacing=deformable.field.GetSpacing(),
                grid_direction=np.array(deformable.field.GetDirection()).reshape(3, 3),
                study=daily.header,
                software_versions=software,
                derivation_description=derivation,
                content_description="rigid and demons registration",
                series_description="rtauto image guidance deformable",
                series_number=ctx.series_number(1),
            )
            ctx.add_artifact(
                dreg_path,
                kind="REG",
                modality="REG",
                sop_instance_uid=str(dreg.SOPInstanceUID),
                description="deformable registration of the reference to the image of the day",
            )
            written["deformable_reg"] = str(dreg.SOPInstanceUID)

    outputs: dict[str, object] = {
        "outcome": outcome,
        "quality_ok": quality_ok,
        "flags": flags,
        "couch_shift": shift.to_json() if shift else None,
        "quality": quality,
        "reference_series_uid": reference.series_instance_uid,
        "reference_found_by": reference_choice.found_by,
        "isocenter_mm": [round(float(v), 3) for v in isocenter],
        "isocenter_source": isocenter_source,
    }
    if "report" in params.outputs:
        report = {
            **outputs,
            "patient_id": daily.patient_id,
            "patient_position": daily.patient_position,
            "image_of_the_day": {
                "series_instance_uid": daily.series_instance_uid,
                "frame_of_reference_uid": daily.frame_of_reference_uid,
                "description": daily.series_description,
                "modality": daily.modality,
            },
            "reference": {
                "series_instance_uid": reference.series_instance_uid,
                "frame_of_reference_uid": reference.frame_of_reference_uid,
                "description": reference.series_description,
                "modality": reference.modality,
            },
            "matrix_daily_to_reference": [[round(float(v), 6) for v in row] for row in matrix],
            "action_levels": params.action_levels.model_dump(),
            "written": written,
            "provenance": provenance.to_json(),
            "couch_shift_convention": "IEC 61217 table axes; the table motion that corrects "
            "the displacement, rotations right-handed about X (pitch), Y (roll), Z (yaw)",
        }
        report_path = ctx.workdir / "couch_shift.json"
        report_path.write_text(json.dumps(report, indent=2))
        ctx.add_artifact(report_path, kind="report-json", description="couch-shift report")
    summary = f"{outcome}: " + (
        ", ".join(f"{k} {v:+.1f}" for k, v in shift.to_json().items()) if shift else "registered"
    )
    return StepResult(outputs=outputs, summary=summary)


def _field_vectors(field) -> np.ndarray:  # type: ignore[no-untyped-def]
    import SimpleITK as sitk  # noqa: N813

    # (planes, rows, columns, 3): displacement of each fixed point to its moving point
    return sitk.GetArrayFromImage(field).astype(np.float32)


class PropagateParams(_Strict):
    registration_step: str = Field("register", description="the step whose REG object is used")
    structures: list[str] | None = Field(None, description="ROI names; default: all")
    daily_description: str | None = None


def propagate_contours(ctx: StepContext, params: PropagateParams) -> StepResult:
    """Map the reference's RTSTRUCT onto the image of the day through a registration step's REG.

    Uses the rigid REG written by ``registration_step``: each structure's mask on the reference
    grid is resampled onto the daily grid through the registration, then traced into a new
    RTSTRUCT that references the daily series and its Frame of Reference.
    """
    from rtauto_image_guidance.propagation import propagate

    regs = ctx.artifacts_of(params.registration_step, kind="REG")
    rigid_regs = [a for a in regs if read_registration(a.path).items]
    if not rigid_regs:
        raise StepFailed(
            f"step {params.registration_step!r} produced no REG object to propagate with"
        )
    return propagate(ctx, params, Path(rigid_regs[0].path))


def warmup() -> None:
    """Load SimpleITK and run a tiny registration so the first job does not pay for it."""
    import SimpleITK as sitk  # noqa: N813

    grid = np.mgrid[0:24, 0:24, 0:24].astype(np.float32)
    blob = np.exp(-(((grid - 12.0) ** 2).sum(axis=0)) / 30.0).astype(np.float32)
    fixed = sitk.GetImageFromArray(blob)
    moving = sitk.GetImageFromArray(np.roll(blob, 1, axis=2))
    rigid_register(
        fixed,
        moving,
        settings=RigidSettings(
            shrink_factors=(2, 1),
            smoothing_sigmas=(1.0, 0.0),
            iterations=5,
            resolution_mm=1.0,
            body_mask=False,
            samples=2000,
        ),
        inverse_consistency=False,
    )


@hookimpl
def rtauto_register_steps(register):  # type: ignore[no-untyped-def]
    register(
        StepType(
            name="image_guidance.register",
            run=register_images,
            params=RegisterParams,
            description="register the image of the day to its planning image; REG, couch shift",
            outputs=REGISTER_OUTPUTS,
            warmup=warmup,
        )
    )
    register(
        StepType(
            name="image_guidance.propagate_contours",
            run=propagate_contours,
            params=PropagateParams,
            description="the planning RTSTRUCT mapped onto the image of the day",
            outputs={"structures": "names of the propagated ROIs"},
            warmup=warmup,
        )
    )
