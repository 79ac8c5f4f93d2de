"""``autocontour.compare``: contours of earlier steps against a reference structure set.

For researchers re-running a cohort with another model and for a clinic commissioning one:
every structure an earlier step wrote (its RTSTRUCT or SEG artifacts) is compared with the
ROI of the same name (or the one ``match`` names) in a reference RTSTRUCT among the job's
inputs, typically the clinical structure set sent with the CT. Contours are rasterised onto
the CT's grid (pixel centres inside, even-odd), SEG frames placed on the slices they
reference; then:

* **Dice** = 2 |A & B| / (|A| + |B|);
* **mean surface distance** (symmetric, mm) and **HD95** (the 95th percentile of the
  distances from each surface to the other, both directions pooled), the surface being the
  voxels of a mask with a 6-neighbour outside it, distances in mm between voxel centres
  (nearest neighbours by a k-d tree);
* both **volumes** in ml.

The figures go into the step's outputs (``metrics`` flat, for ``rtauto batch`` reports and
``if:``) and into ``compare.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import pydicom
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from rtauto.dicom.geometry import GeometryError, Volume
from rtauto.dicom.rtstruct import Structure, read_rtstruct
from rtauto.dicom.seg import read_seg
from rtauto.errors import StepFailed
from rtauto.steps import StepContext, StepResult, StepType
from rtauto_autocontour.steps import _load_ct

__all__ = ["COMPARE_STEP", "CompareParams", "compare_masks", "run_compare"]


class CompareParams(BaseModel):
    """``with:`` of ``autocontour.compare``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: list[str] | None = Field(
        None,
        alias="from",
        description="earlier steps whose RTSTRUCTs and SEGs are compared (default: all)",
    )
    reference: str | None = Field(
        None,
        description="regular expression the reference RTSTRUCT's StructureSetLabel or "
        "SeriesDescription must match (default: the job's only input RTSTRUCT)",
    )
    match: dict[str, str] = Field(
        default_factory=dict,
        description="structure name -> reference ROI name where they differ (a structure "
        "whose match is absent is looked up by its own name; case ignored)",
    )
    structures: list[str] | None = Field(None, description="only these structures")


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndi.binary_erosion(mask, border_value=0)


def compare_masks(a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, ...]) -> dict[str, Any]:
    """Dice, mean surface distance and HD95 (mm) of two boolean masks, volumes in ml."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    sum_a, sum_b = int(a.sum()), int(b.sum())
    result: dict[str, Any] = {
        "volume_ml": round(sum_a * voxel_ml, 2),
        "reference_volume_ml": round(sum_b * voxel_ml, 2),
    }
    if not sum_a or not sum_b:
        result.update(dice=0.0 if sum_a or sum_b else 1.0, msd_mm=None, hd95_mm=None)
        return result
    result["dice"] = round(2.0 * int((a & b).sum()) / (sum_a + sum_b), 4)
    # surface voxel centres in mm; each one's nearest on the other surface by a k-d tree (the
    # head phantom's BODY: 15 s, against 18 s for distance transforms of the masks' box)
    scale = np.asarray(spacing_zyx, dtype=float)
    surface_a = np.argwhere(_surface(a)) * scale
    surface_b = np.argwhere(_surface(b)) * scale
    to_b = cKDTree(surface_b).query(surface_a, workers=-1)[0]
    to_a = cKDTree(surface_a).query(surface_b, workers=-1)[0]
    pooled = np.concatenate([to_b, to_a])
    result["msd_mm"] = round(float(pooled.mean()), 3)
    result["hd95_mm"] = round(float(np.percentile(pooled, 95)), 3)
    return result


def _reference(ctx: StepContext, pattern: str | None) -> pydicom.Dataset:
    """The one reference RTSTRUCT of the job's input (read once: its ROI names and contours
    are taken from this data set)."""
    candidates = [
        pydicom.dcmread(path) for s in ctx.study.by_modality("RTSTRUCT") for path in s.files
    ]
    if pattern:
        regex = re.compile(pattern)
        candidates = [
            ds
            for ds in candidates
            if regex.search(str(ds.get("StructureSetLabel", "")))
            or regex.search(str(ds.get("SeriesDescription", "")))
        ]
    if len(candidates) != 1:
        which = f" matching {pattern!r}" if pattern else ""
        raise StepFailed(
            f"the job's input holds {len(candidates)} reference RTSTRUCTs{which}; "
            "one is needed (name it with `reference`)"
        )
    return candidates[0]


def run_compare(ctx: StepContext, params: CompareParams) -> StepResult:
    """``autocontour.compare``: Dice, MSD, HD95 of earlier steps' structures."""
    volume: Volume = _load_ct(ctx)
    steps = params.from_ or list(ctx.previous)
    evaluated = {
        step_id: [a for a in ctx.previous[step_id].artifacts if a.kind in ("RTSTRUCT", "SEG")]
        for step_id in steps
        if step_id in ctx.previous
    }
    if not any(evaluated.values()):
        raise StepFailed(f"no RTSTRUCT or SEG among the artifacts of steps {steps}")
    reference_set = _reference(ctx, params.reference)
    try:
        found: list[tuple[str, Structure]] = []
        for step_id, artifacts in evaluated.items():
            # RTSTRUCTs first: with both outputs of one step, each structure is compared once
            seen: set[str] = set()
            for artifact in sorted(artifacts, key=lambda a: a.kind != "RTSTRUCT"):
                read = (
                    read_rtstruct(artifact.path, volume)[0]
                    if artifact.kind == "RTSTRUCT"
                    else read_seg(artifact.path, volume)
                )
                found += [(step_id, s) for s in read if s.name not in seen]
                seen |= {s.name for s in read}
        if params.structures:
            found = [(step_id, s) for step_id, s in found if s.name in params.structures]
        # a name two steps both produce (two model versions) is reported once per step, as
        # STEP/NAME; a name only one step produces keeps its own
        counts = Counter(s.name for _, s in found)
        ours = [
            replace(s, name=f"{step_id}/{s.name}") if counts[s.name] > 1 else s
            for step_id, s in found
        ]
        original = {labelled.name: s.name for labelled, (_, s) in zip(ours, found, strict=True)}
        # only the reference ROIs needed are read (a clinical set holds many more)
        names = {
            str(roi.ROIName).lower(): str(roi.ROIName)
            for roi in reference_set.get("StructureSetROISequence", [])
        }
        # the name ``match`` gives, else the structure's own (case ignored)
        wanted = {
            s.name: names.get(params.match.get(original[s.name], original[s.name]).lower())
            or names.get(original[s.name].lower())
            for s in ours
        }
        needed = sorted({name for name in wanted.values() if name})
        reference, reference_info = read_rtstruct(reference_set, volume, names=needed)
    except GeometryError as exc:
        raise StepFailed(f"cannot place the contours on the CT: {exc}") from exc
    by_name = {s.name: s for s in reference}
    spacing_zyx = tuple(float(v) for v in volume.spacing[::-1])
    structures: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for structure in ours:
        match = by_name.get(wanted[structure.name] or "")
        if match is None:
            missing.append(structure.name)
            continue
        figures = compare_masks(structure.mask, match.mask, spacing_zyx)
        structures[structure.name] = {"reference_roi": match.name, **figures}
    if not structures:
        raise StepFailed(
            f"no structure of steps {steps} has a counterpart in the reference "
            f"({', '.join(names.values())}); name them with `match`"
        )
    metrics = {
        f"{name}.{key}": value
        for name, figures in structures.items()
        for key, value in figures.items()
        if key in ("dice", "msd_mm", "hd95_mm")
    }
    outputs = {
        "reference_sop_instance_uid": reference_info.sop_instance_uid,
        "structures": structures,
        "unmatched": missing,
        "metrics": metrics,
    }
    report = ctx.workdir / "compare.json"
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(outputs, indent=2))
    ctx.add_artifact(report, kind="report-json", description="contours against the reference")
    return StepResult(
        outputs=outputs,
        summary=", ".join(
            f"{name} Dice {figures['dice']:.3f}" for name, figures in structures.items()
        )
        + (f"; no reference for {', '.join(missing)}" if missing else ""),
    )


COMPARE_STEP = StepType(
    name="autocontour.compare",
    run=run_compare,
    params=CompareParams,
    description="Compare earlier steps' contours with a reference RTSTRUCT: Dice, mean "
    "surface distance, HD95, volumes.",
    outputs={
        "structures": "per structure: reference_roi, dice, msd_mm, hd95_mm, volume_ml, "
        "reference_volume_ml",
        "metrics": "the same flat, as STRUCTURE.dice / .msd_mm / .hd95_mm",
        "unmatched": "structures with no counterpart in the reference",
        "reference_sop_instance_uid": "the reference structure set",
    },
)
