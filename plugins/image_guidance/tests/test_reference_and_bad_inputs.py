"""Finding the reference in the job store, the step's registration, and bad inputs.

The store is a real SQLite job store (``rtauto.store.Store``) whose instances lie in the spool,
as ingest leaves them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian
from rtauto_image_guidance.io import read_series
from rtauto_image_guidance.plugin import RegisterParams, register_images
from rtauto_image_guidance.reference import resolve_reference
from rtauto_image_guidance.testing import dciodvfy_errors, input_series, make_context

from rtauto.errors import StepFailed
from rtauto.hooks import build_plugin_manager
from rtauto.store import InstanceRecord, Store
from rtauto.testing import SyntheticSeries, ct_phantom, write_ct_series
from rtauto.uids import new_uid

PATIENT = "IGRT-001"


def _phantom(shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The synthetic CT phantom with head-feet structure (a sphere), shifted by whole voxels."""
    hu = ct_phantom(64, 64, 32, (4.0, 4.0, 4.0), seed=1)
    z, y, x = np.mgrid[0:32, 0:64, 0:64]
    hu[((x - 40) ** 2 + (y - 28) ** 2 + (z - 20) ** 2) < 36] = 900.0
    hu[((x - 22) ** 2 + (y - 34) ** 2 + (z - 9) ** 2) < 16] = -500.0
    shift_vox = [int(round(s / 4.0)) for s in shift_mm]
    return np.roll(hu, (shift_vox[2], shift_vox[1], shift_vox[0]), axis=(0, 1, 2))


def _ct(folder: Path, description: str, *, patient_id: str = PATIENT, **kw) -> SyntheticSeries:
    kw.setdefault("hu", _phantom())
    return write_ct_series(
        folder,
        spacing=(4.0, 4.0, 4.0),
        patient_id=patient_id,
        series_description=description,
        **kw,
    )


def _save(ds: pydicom.Dataset, path: Path, sop_class: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _structure_set(folder: Path, ct: SyntheticSeries) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPInstanceUID = new_uid()
    ds.PatientID = PATIENT
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = ct.study_instance_uid
    ds.SeriesInstanceUID = new_uid()
    series = pydicom.Dataset()
    series.SeriesInstanceUID = ct.series_instance_uid
    study = pydicom.Dataset()
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID = ct.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    _save(ds, folder / "rs.dcm", "1.2.840.10008.5.1.4.1.1.481.3")
    return ds


def _plan(folder: Path, structure_set: pydicom.Dataset, frame_uid: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPInstanceUID = new_uid()
    ds.PatientID = PATIENT
    ds.Modality = "RTPLAN"
    ds.StudyInstanceUID = structure_set.StudyInstanceUID
    ds.SeriesInstanceUID = new_uid()
    ds.FrameOfReferenceUID = frame_uid
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ref.ReferencedSOPInstanceUID = structure_set.SOPInstanceUID
    ds.ReferencedStructureSetSequence = DicomSequence([ref])
    _save(ds, folder / "rp.dcm", "1.2.840.10008.5.1.4.1.1.481.5")
    return ds


def _index(store: Store, spool: Path, files: list[Path], received_at: float) -> None:
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        store.record_instance(
            InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                study_instance_uid=str(ds.StudyInstanceUID),
                patient_id=str(ds.PatientID),
                modality=str(ds.Modality),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                path=str(path.relative_to(spool)),
                size=path.stat().st_size,
                source="scp",
                attributes={
                    k: str(ds.get(k, ""))
                    for k in ("SeriesDescription", "FrameOfReferenceUID")
                    if k in ds
                },
                received_at=received_at,
            )
        )


@pytest.fixture
def store_setup(tmp_path: Path):
    """A job store holding a planned CT (with RTSTRUCT + RTPLAN) and a newer unplanned CT."""
    home = tmp_path / "home"
    spool = home / "spool"
    url = f"sqlite:///{home / 'store.db'}"
    store = Store(url, migrate=True)
    now = time.time()
    planned = _ct(spool / "planned", "Planning CT", seed=1)
    structure_set = _structure_set(spool / "rs", planned)
    _plan(spool / "rp", structure_set, planned.frame_of_reference_uid)
    rescan = _ct(spool / "rescan", "Rescan CT", seed=2, hu=_phantom((4.0, 0.0, 0.0)))
    _index(store, spool, planned.files, now - 3000)
    _index(store, spool, [spool / "rs" / "rs.dcm"], now - 2900)
    _index(store, spool, [spool / "rp" / "rp.dcm"], now - 2800)
    _index(store, spool, rescan.files, now - 1000)
    store.close()
    return home, url, planned, rescan


def _daily(tmp_path: Path, frame_uid: str | None = None, shift=(8.0, -4.0, 4.0), **kw):
    series = _ct(
        tmp_path / "daily",
        "CBCT daily",
        hu=_phantom(shift),
        frame_of_reference_uid=frame_uid,
        **kw,
    )
    return series, input_series(series.files)


def test_reference_rules_pick_the_right_series(tmp_path: Path, store_setup) -> None:
    home, url, planned, rescan = store_setup
    daily, daily_input = _daily(tmp_path, frame_uid=rescan.frame_of_reference_uid)
    ctx = make_context(tmp_path, [daily_input], patient_id=PATIENT, store_url=url, home=home)
    picks = {
        rule: resolve_reference(ctx, daily_input, rule)
        for rule in ("planned_ct", "latest_ct", "same_frame_of_reference", "auto")
    }
    assert picks["planned_ct"].series_instance_uid == planned.series_instance_uid
    assert picks["latest_ct"].series_instance_uid == rescan.series_instance_uid
    assert picks["same_frame_of_reference"].series_instance_uid == rescan.series_instance_uid
    assert picks["auto"].series_instance_uid == planned.series_instance_uid
    assert picks["auto"].found_by == "planned_ct"
    assert sorted(picks["planned_ct"].files) == sorted(planned.files)
    described = resolve_reference(ctx, daily_input, "latest_ct", "(?i)planning")
    assert described.series_instance_uid == planned.series_instance_uid
    with pytest.raises(StepFailed, match="no reference image series"):
        resolve_reference(ctx, daily_input, "input")


def test_no_reference_in_the_store_fails_clearly(tmp_path: Path, store_setup) -> None:
    home, url, _, _ = store_setup
    daily, daily_input = _daily(tmp_path, patient_id="SOMEONE-ELSE")
    ctx = make_context(tmp_path, [daily_input], patient_id="SOMEONE-ELSE", store_url=url, home=home)
    with pytest.raises(StepFailed, match="no reference image found for patient 'SOMEONE-ELSE'"):
        register_images(ctx, RegisterParams())
    assert not list(ctx.workdir.glob("*"))
    ctx_without_store = make_context(tmp_path, [daily_input], patient_id="SOMEONE-ELSE")
    with pytest.raises(StepFailed, match="no job store"):
        register_images(ctx_without_store, RegisterParams())


def test_step_registers_the_daily_image_to_the_planned_ct(tmp_path: Path, store_setup) -> None:
    home, url, planned, _ = store_setup
    daily, daily_input = _daily(tmp_path, shift=(8.0, -4.0, 4.0))
    ctx = make_context(tmp_path, [daily_input], patient_id=PATIENT, store_url=url, home=home)
    result = register_images(ctx, RegisterParams(resolution_mm=4.0))
    assert result.outputs["reference_series_uid"] == planned.series_instance_uid
    shift = result.outputs["couch_shift"]
    # anatomy 8 mm to the patient's left, 4 mm anterior, 4 mm to the head (HFS)
    assert shift["lateral_mm"] == pytest.approx(-8.0, abs=0.5)
    assert shift["vertical_mm"] == pytest.approx(-4.0, abs=0.5)
    assert shift["longitudinal_mm"] == pytest.approx(-4.0, abs=0.5)
    assert result.outputs["outcome"] == "flag"
    kinds = sorted(a.kind for a in ctx.artifacts)
    assert kinds == ["REG", "report-json"]
    reg = next(a for a in ctx.artifacts if a.kind == "REG")
    assert dciodvfy_errors(reg.path) == []
    assert pydicom.dcmread(reg.path).SOPInstanceUID == reg.sop_instance_uid
    # within the action levels the outcome is pass
    relaxed = RegisterParams(resolution_mm=4.0, action_levels={"translation_mm": 10.0})
    ctx2 = make_context(tmp_path, [daily_input], patient_id=PATIENT, store_url=url, home=home)
    assert register_images(ctx2, relaxed).outputs["outcome"] == "pass"


def test_deformable_method_writes_a_valid_deformable_reg(tmp_path: Path) -> None:
    planned = _ct(tmp_path / "plan", "Planning CT")
    daily, daily_input = _daily(tmp_path, shift=(4.0, 0.0, 0.0))
    ctx = make_context(tmp_path, [input_series(planned.files), daily_input], patient_id=PATIENT)
    params = RegisterParams(method="deformable", resolution_mm=4.0, field_spacing_mm=8.0)
    result = register_images(ctx, params)
    deformable = result.outputs["quality"]["deformable"]
    assert 0.0 < deformable["jacobian_min"] <= deformable["jacobian_max"]
    regs = [a for a in ctx.artifacts if a.kind == "REG"]
    assert len(regs) == 2
    for reg in regs:
        assert dciodvfy_errors(reg.path) == []
    classes = {str(pydicom.dcmread(r.path).SOPClassUID) for r in regs}
    assert classes == {"1.2.840.10008.5.1.4.1.1.66.1", "1.2.840.10008.5.1.4.1.1.66.3"}


def test_almost_no_overlap_fails_without_reg(tmp_path: Path) -> None:
    planned = _ct(tmp_path / "plan", "Planning CT")
    far = _ct(tmp_path / "far", "CBCT daily", origin=(-128.0, -128.0, 60.0 + 110.0))
    ctx = make_context(
        tmp_path, [input_series(planned.files), input_series(far.files)], patient_id=PATIENT
    )
    with pytest.raises(StepFailed, match="overlaps the reference image by"):
        register_images(ctx, RegisterParams(resolution_mm=4.0, daily_description="CBCT"))
    assert not list(ctx.workdir.glob("*.dcm")) and not ctx.artifacts


def test_empty_series_fails_without_reg(tmp_path: Path) -> None:
    planned = _ct(tmp_path / "plan", "Planning CT")
    empty = input_series([])
    ctx = make_context(tmp_path, [input_series(planned.files), empty], patient_id=PATIENT)
    with pytest.raises(StepFailed, match="no reference image series"):
        register_images(ctx, RegisterParams(reference={"rule": "input"}))
    with pytest.raises(StepFailed, match="holds no images"):
        read_series([], label="image of the day")
    assert not ctx.artifacts and not list(ctx.workdir.glob("*"))


def test_mismatched_patient_fails_without_reg(tmp_path: Path) -> None:
    planned = _ct(tmp_path / "plan", "Planning CT")
    daily, daily_input = _daily(tmp_path, patient_id="ANOTHER-PATIENT")
    ctx = make_context(tmp_path, [input_series(planned.files), daily_input], patient_id=PATIENT)
    with pytest.raises(StepFailed, match="patient mismatch"):
        register_images(ctx, RegisterParams(resolution_mm=4.0, daily_description="CBCT"))
    assert not ctx.artifacts and not list(ctx.workdir.glob("*"))


def test_plugin_registers_its_steps_through_the_entry_point() -> None:
    host = build_plugin_manager()
    for name in ("image_guidance.register", "image_guidance.propagate_contours"):
        assert name in host.steps
    step = host.steps["image_guidance.register"]
    step_type = getattr(step, "step_type", step)
    assert step_type.warmup is not None
    step_type.warmup()
    with pytest.raises(ValueError, match="extra"):
        RegisterParams(metirc="mattes")


def test_elastix_backend_gives_the_same_shift(tmp_path: Path) -> None:
    pytest.importorskip("itk")
    planned = _ct(tmp_path / "plan", "Planning CT")
    daily, daily_input = _daily(tmp_path, shift=(8.0, -4.0, 4.0))
    ctx = make_context(tmp_path, [input_series(planned.files), daily_input], patient_id=PATIENT)
    params = RegisterParams(resolution_mm=4.0, backend="elastix", daily_description="CBCT")
    result = register_images(ctx, params)
    shift = result.outputs["couch_shift"]
    assert result.outputs["quality"]["backend"] == "elastix"
    assert shift["lateral_mm"] == pytest.approx(-8.0, abs=0.5)
    assert shift["vertical_mm"] == pytest.approx(-4.0, abs=0.5)
    assert shift["longitudinal_mm"] == pytest.approx(-4.0, abs=0.5)


def test_unsupported_patient_position_fails_before_registering(tmp_path: Path) -> None:
    planned = _ct(tmp_path / "plan", "Planning CT")
    daily, daily_input = _daily(tmp_path, patient_position="HFDL")
    ctx = make_context(tmp_path, [input_series(planned.files), daily_input], patient_id=PATIENT)
    with pytest.raises(StepFailed, match="HFDL"):
        register_images(ctx, RegisterParams(daily_description="CBCT"))
    assert not ctx.artifacts


def _plan_with_beams(
    folder: Path, frame_uid: str, isocentres: list[tuple[float, float, float]], label: str
) -> Path:
    """An RT Plan whose treatment beams sit at ``isocentres``, plus a setup beam elsewhere
    (a setup beam's isocentre is not the treatment one)."""
    ds = pydicom.Dataset()
    ds.SOPInstanceUID = new_uid()
    ds.PatientID = PATIENT
    ds.Modality = "RTPLAN"
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.FrameOfReferenceUID = frame_uid
    ds.RTPlanLabel = label
    beams = []
    for number, (iso, kind) in enumerate(
        [(iso, "TREATMENT") for iso in isocentres] + [((99.0, 99.0, 99.0), "SETUP")], start=1
    ):
        point = pydicom.Dataset()
        point.ControlPointIndex = 0
        point.IsocenterPosition = [f"{v:.1f}" for v in iso]
        beam = pydicom.Dataset()
        beam.BeamNumber = number
        beam.TreatmentDeliveryType = kind
        beam.ControlPointSequence = DicomSequence([point])
        beams.append(beam)
    ds.BeamSequence = DicomSequence(beams)
    path = folder / f"{label}.dcm"
    _save(ds, path, "1.2.840.10008.5.1.4.1.1.481.5")
    return path


def test_plan_isocentre_from_the_store_and_the_fallback(tmp_path: Path, store_setup) -> None:
    """The couch rotates about the treatment isocentre of the patient's plan in the job store;
    without one, ``auto`` uses the daily image's centre and says why, ``plan`` fails before
    registering; two plans with different isocentres are ambiguous."""
    home, url, planned, _ = store_setup
    daily, daily_input = _daily(tmp_path, shift=(8.0, -4.0, 4.0))
    fast = {"resolution_mm": 4.0}

    def run(**params):
        ctx = make_context(tmp_path, [daily_input], patient_id=PATIENT, store_url=url, home=home)
        return ctx, register_images(ctx, RegisterParams(**fast, **params))

    # the store's plan has no beams
    _, result = run()
    assert result.outputs["isocenter_source"]["source"] == "image_center"
    assert "no treatment plan with an isocentre" in result.outputs["isocenter_source"]["why"]
    assert result.outputs["isocenter_mm"] == pytest.approx(
        read_series(daily.files).center().tolist(), abs=1e-3
    )
    with pytest.raises(StepFailed, match="no treatment plan with an isocentre"):
        run(isocenter_from="plan")

    store = Store(url)
    spool = home / "spool"
    first = _plan_with_beams(
        spool / "beams", planned.frame_of_reference_uid, [(10.0, -20.0, 30.0)] * 2, "ONE"
    )
    _index(store, spool, [first], time.time())
    _, result = run(isocenter_from="plan")
    source = result.outputs["isocenter_source"]
    assert source["source"] == "plan (store)" and source["plan_label"] == "ONE"
    assert source["plan_sop_instance_uid"] == str(pydicom.dcmread(first).SOPInstanceUID)
    assert result.outputs["isocenter_mm"] == [10.0, -20.0, 30.0]
    # the translation the phantom's displacement needs does not depend on the isocentre
    assert result.outputs["couch_shift"]["lateral_mm"] == pytest.approx(-8.0, abs=0.5)
    # an explicit isocentre wins over the plan's
    _, result = run(isocenter_mm=(1.0, 2.0, 3.0))
    assert result.outputs["isocenter_source"] == {"source": "parameter"}

    second = _plan_with_beams(
        spool / "beams", planned.frame_of_reference_uid, [(40.0, -20.0, 30.0)], "TWO"
    )
    _index(store, spool, [second], time.time())
    store.close()
    ctx = make_context(tmp_path, [daily_input], patient_id=PATIENT, store_url=url, home=home)
    with pytest.raises(StepFailed, match="2 isocentres .*ONE.*TWO|2 isocentres .*TWO.*ONE"):
        register_images(ctx, RegisterParams(isocenter_from="plan", **fast))
    assert not ctx.artifacts
    _, result = run()
    assert result.outputs["isocenter_source"]["source"] == "image_center"
    assert "name one with isocenter_mm" in result.outputs["isocenter_source"]["why"]
