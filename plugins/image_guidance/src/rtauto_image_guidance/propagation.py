"""Contour propagation: the reference's RTSTRUCT mapped onto the image of the day through a REG.

Each ROI is rasterised on the reference CT grid (``rtauto.dicom.rtstruct.read_rtstruct``),
resampled onto the daily grid through the registration (linear interpolation of the mask,
kept where >= 0.5), and traced into a new RTSTRUCT on the daily series
(``rtauto.dicom.rtstruct.write_rtstruct``), whose Frame of Reference it then names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813  (the library's usual name)
from rtauto_image_guidance.reference import _StoreLookup, choose_daily

from rtauto.dicom.geometry import GeometryError, Volume, load_series
from rtauto.dicom.reg import read_registration
from rtauto.dicom.rtstruct import (
    RTSTRUCT_INTERPRETED_TYPES,
    Structure,
    read_rtstruct,
    write_rtstruct,
)
from rtauto.errors import StepFailed
from rtauto.steps import StepContext, StepResult

if TYPE_CHECKING:
    from rtauto_image_guidance.plugin import PropagateParams

__all__ = ["propagate", "resample_mask"]


def _image_of(volume: Volume, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    image.SetSpacing(tuple(float(v) for v in volume.spacing))
    image.SetDirection(tuple(float(v) for v in np.asarray(volume.direction).ravel()))
    return image


def resample_mask(
    mask: np.ndarray, reference: Volume, daily: Volume, daily_to_reference: np.ndarray
) -> np.ndarray:
    """A reference-grid mask on the daily grid; ``daily_to_reference`` maps daily -> reference."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in daily_to_reference[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in daily_to_reference[:3, 3]))
    source = _image_of(reference, mask.astype(np.float32))
    target = _image_of(daily, np.zeros(daily.shape, np.float32))
    out = sitk.Resample(source, target, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out) >= 0.5


def _structure_set_for(
    ctx: StepContext, reference_uid: str, frame_uid: str
) -> tuple[Path, list[Path]]:
    """The reference RTSTRUCT and the reference series' files (job input first, then the store)."""
    candidates: list[Path] = [p for s in ctx.study.by_modality("RTSTRUCT") for p in s.files]
    reference_files = [
        p for s in ctx.study.series if s.series_instance_uid == reference_uid for p in s.files
    ]
    lookup = None
    if ctx.store_url:
        lookup = _StoreLookup(ctx, ctx.study.patient_id)
        try:
            for row in lookup.store.series_of_patient(ctx.study.patient_id, modality="RTSTRUCT"):
                candidates.extend(lookup.files(row.series_uid))
            if not reference_files:
                reference_files = lookup.files(reference_uid)
        finally:
            lookup.close()
    by_frame = None
    for path in candidates:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        series = [
            str(se.SeriesInstanceUID)
            for fr in header.get("ReferencedFrameOfReferenceSequence", [])
            for st in fr.get("RTReferencedStudySequence", [])
            for se in st.get("RTReferencedSeriesSequence", [])
        ]
        if reference_uid in series:
            return path, reference_files
        frames = [
            str(fr.FrameOfReferenceUID)
            for fr in header.get("ReferencedFrameOfReferenceSequence", [])
        ]
        if by_frame is None and frame_uid in frames:
            by_frame = path
    if by_frame is None:
        raise StepFailed(f"no RTSTRUCT of the reference series {reference_uid} was found")
    return by_frame, reference_files


def propagate(ctx: StepContext, params: PropagateParams, reg_path: Path) -> StepResult:
    """Write the propagated RTSTRUCT artifact; see the module docstring."""
    reg = read_registration(reg_path)
    previous: Any = ctx.previous.get(params.registration_step)
    reference_uid = str(previous.outputs.get("reference_series_uid", "")) if previous else ""
    daily_input = choose_daily(ctx, params.daily_description)
    daily_sops = {inst.sop_instance_uid for inst in daily_input.instances}
    moving_item = next(
        (i for i in reg.items if set(i.referenced_sop_instance_uids) & daily_sops), None
    )
    if moving_item is None:
        raise StepFailed("the REG object does not reference the image of the day")
    rs_path, reference_files = _structure_set_for(ctx, reference_uid, reg.frame_of_reference_uid)
    if not reference_files:
        raise StepFailed(f"the reference series {reference_uid} has no images to read")
    try:
        reference = load_series(reference_files)
        daily = load_series(daily_input.files)
        structures, info = read_rtstruct(rs_path, reference, names=params.structures)
    except GeometryError as exc:
        raise StepFailed(str(exc)) from exc
    if not structures:
        raise StepFailed(f"{rs_path}: none of the requested structures is present")
    daily_to_reference = moving_item.matrix
    propagated = [
        Structure(
            name=s.name,
            mask=resample_mask(s.mask, reference, daily, daily_to_reference),
            color=s.color,
            # a vendor term outside the defined ones (e.g. UNSUPPORTED) is written as unknown
            interpreted_type=(
                s.interpreted_type if s.interpreted_type in RTSTRUCT_INTERPRETED_TYPES else ""
            ),
            description=f"propagated from {info.sop_instance_uid} by rigid registration",
            algorithm="AUTOMATIC",
        )
        for s in structures
    ]
    out = ctx.workdir / "propagated_rtstruct.dcm"
    ds = write_rtstruct(
        daily,
        propagated,
        out,
        label="RTAUTO_PROP",
        series_description="rtauto propagated contours",
        series_number=ctx.series_number(0),
        software_versions=ctx.provenance.software_versions(),
        derivation_description=ctx.provenance.derivation_description(),
    )
    ctx.add_artifact(
        out,
        kind="RTSTRUCT",
        modality="RTSTRUCT",
        sop_instance_uid=str(ds.SOPInstanceUID),
        description="reference contours propagated to the image of the day",
    )
    names = [s.name for s in propagated]
    return StepResult(
        outputs={"structures": names, "voxels": {s.name: int(s.mask.sum()) for s in propagated}},
        summary=f"{len(names)} structures propagated",
    )
