"""The example workflow loads with this plugin's steps; contours propagate through the REG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813  (the library's usual name)
from rtauto_image_guidance.plugin import (
    PropagateParams,
    RegisterParams,
    propagate_contours,
    register_images,
)
from rtauto_image_guidance.propagation import resample_mask
from rtauto_image_guidance.testing import (
    dciodvfy_errors,
    euler,
    input_series,
    make_context,
    matrix_of,
    simulate_daily,
    write_image_series,
)

from rtauto.dicom.geometry import load_series
from rtauto.dicom.rtstruct import read_rtstruct
from rtauto.hooks import build_plugin_manager
from rtauto.steps import PreviousStep
from rtauto.workflow.loader import load_workflow

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_example_workflow_loads_with_the_plugin_steps() -> None:
    host = build_plugin_manager()
    workflow = load_workflow(REPO_ROOT / "workflows" / "igrt-rigid.yaml", host.steps)
    assert workflow.name == "igrt-rigid"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_contours_propagate_to_the_daily_image(tmp_path: Path, test_data: Path) -> None:
    study = test_data / "dcpt-headphantom" / "study"
    ct_files = sorted(study.glob("CT*.dcm"))
    rs_file = next(study.glob("RS*.dcm"))
    planning = load_series(ct_files)
    plan_input = input_series(ct_files)
    iso = planning.index_to_patient(np.array(planning.shape[::-1]) / 2.0)[0] + [0, 20, 0]

    plan_image = sitk.GetImageFromArray(planning.array)
    plan_image.SetOrigin(tuple(planning.origin))
    plan_image.SetSpacing(tuple(planning.spacing))
    plan_image.SetDirection(tuple(np.asarray(planning.direction).ravel()))
    truth = euler(iso, (0.0, 0.0, 1.0), (6.0, -3.0, 4.5))  # daily -> planning
    daily_image = simulate_daily(
        plan_image, truth, center=iso, size=(180, 180, 70), spacing=(1.0, 1.0, 2.0)
    )
    daily_series = write_image_series(
        daily_image, tmp_path / "daily", patient_id=plan_input.attributes["PatientID"]
    )
    daily_input = input_series(daily_series.files)
    structure_input = input_series([rs_file])
    inputs = [plan_input, structure_input, daily_input]
    patient = plan_input.attributes["PatientID"]

    ctx = make_context(tmp_path, inputs, patient_id=patient)
    registered = register_images(
        ctx,
        RegisterParams(
            isocenter_mm=tuple(float(v) for v in iso),
            daily_description="CBCT",
            reference={"rule": "input", "series_description": "^(?!CBCT)"},
        ),
    )
    previous = {
        "register": PreviousStep(
            step_id="register",
            status="ok",
            outputs=registered.outputs,
            artifacts=tuple(ctx.artifacts),
        )
    }
    ctx2 = make_context(
        tmp_path,
        inputs,
        patient_id=patient,
        step_type="image_guidance.propagate_contours",
        previous=previous,
    )
    # Beekley (a skin marker) is typed UNSUPPORTED by the TPS, a term outside the DICOM
    # defined ones: it is propagated with its type left empty (unknown)
    result = propagate_contours(
        ctx2,
        PropagateParams(structures=["CTV", "BrainStem", "Beekley"], daily_description="CBCT"),
    )
    assert sorted(result.outputs["structures"]) == ["Beekley", "BrainStem", "CTV"]
    out = next(a.path for a in ctx2.artifacts if a.kind == "RTSTRUCT")
    assert dciodvfy_errors(out) == []
    ds = pydicom.dcmread(out)
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == (
        daily_series.frame_of_reference_uid
    )
    daily = load_series(daily_series.files)
    propagated, _ = read_rtstruct(out, daily)
    planned, _ = read_rtstruct(rs_file, planning, names=["CTV", "BrainStem"])
    expected = {s.name: resample_mask(s.mask, planning, daily, matrix_of(truth)) for s in planned}
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    assert {names[n]: t for n, t in types.items()}["Beekley"] == ""
    for structure in propagated:
        if structure.name not in expected:
            continue
        dice = _dice(structure.mask, expected[structure.name])
        print(f"{structure.name}: Dice {dice:.3f} against the true transform")
        assert dice > 0.95
