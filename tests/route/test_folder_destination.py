"""The ``folder`` destination type: durable copies, layouts, idempotence, conflicts."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError

from rtauto.errors import StepFailed, StepRetry
from rtauto.route.folder import FolderDestinationConfig, send_folder
from rtauto.testing import write_ct_series


@pytest.fixture
def series(tmp_path: Path):
    return write_ct_series(tmp_path / "ct", rows=32, cols=32, slices=3)


def test_flat_layout_names_dicom_by_uid_and_keeps_report_names(tmp_path, series, test_data):
    target = tmp_path / "out"
    target.mkdir()
    report = tmp_path / "plan-check.json"
    report.write_text('{"passed": true}')
    rtstruct = test_data / "dicompyler-core-example" / "rtss.dcm"
    confirmed: list[Path] = []

    send_folder(
        FolderDestinationConfig(path=target),
        [*series.files, rtstruct, report],
        on_delivered=confirmed.append,
    )

    assert confirmed == [*series.files, rtstruct, report]
    names = sorted(p.name for p in target.iterdir())
    expected = sorted(
        [f"CT.{uid}.dcm" for uid in series.sop_instance_uids]
        + [f"RTSTRUCT.{pydicom.dcmread(rtstruct).SOPInstanceUID}.dcm", "plan-check.json"]
    )
    assert names == expected
    for source, uid in zip(series.files, series.sop_instance_uids, strict=True):
        assert (target / f"CT.{uid}.dcm").read_bytes() == source.read_bytes()
    assert (target / "plan-check.json").read_text() == '{"passed": true}'


def test_by_series_layout(tmp_path, series):
    target = tmp_path / "out"
    target.mkdir()
    report = tmp_path / "summary.html"
    report.write_text("<p>ok</p>")
    send_folder(FolderDestinationConfig(path=target, layout="by-series"), [*series.files, report])
    folder = target / series.series_instance_uid
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"CT.{uid}.dcm" for uid in series.sop_instance_uids
    )
    assert (target / "summary.html").is_file()
    # no temporary file is left behind
    assert not list(target.rglob("*.rtauto-tmp"))


def test_sending_again_is_idempotent(tmp_path, series):
    target = tmp_path / "out"
    target.mkdir()
    config = FolderDestinationConfig(path=target)
    send_folder(config, series.files)
    send_folder(config, series.files)
    assert len(list(target.iterdir())) == len(series.files)


def test_different_dicom_content_for_the_same_uid_is_refused_unless_overwrite(tmp_path, series):
    target = tmp_path / "out"
    target.mkdir()
    send_folder(FolderDestinationConfig(path=target), series.files[:1])
    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(series.files[0])
    ds.SeriesDescription = "edited"
    ds.save_as(changed, enforce_file_format=True)
    placed = target / f"CT.{series.sop_instance_uids[0]}.dcm"

    with pytest.raises(StepFailed, match="different content for the same SOP Instance UID"):
        send_folder(FolderDestinationConfig(path=target), [changed])
    assert placed.read_bytes() == series.files[0].read_bytes()

    send_folder(FolderDestinationConfig(path=target, overwrite=True), [changed])
    assert placed.read_bytes() == changed.read_bytes()


def test_a_different_report_of_the_same_name_is_kept_beside_it(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    first, second = tmp_path / "a" / "report.json", tmp_path / "b" / "report.json"
    for path, text in ((first, "1"), (second, "2")):
        path.parent.mkdir()
        path.write_text(text)
    config = FolderDestinationConfig(path=target)
    send_folder(config, [first])
    send_folder(config, [second])
    send_folder(config, [second])  # again: recognised as already there
    assert (target / "report.json").read_text() == "1"
    assert (target / "report-2.json").read_text() == "2"
    assert len(list(target.iterdir())) == 2


def test_missing_folder_is_transient(tmp_path, series):
    with pytest.raises(StepRetry, match="not available"):
        send_folder(FolderDestinationConfig(path=tmp_path / "share-not-mounted"), series.files)


def test_missing_source_file_is_reported_and_the_rest_copied(tmp_path, series):
    target = tmp_path / "out"
    target.mkdir()
    confirmed: list[Path] = []
    gone = tmp_path / "gone.json"
    with pytest.raises(StepFailed, match="gone.json"):
        send_folder(FolderDestinationConfig(path=target), [gone, *series.files], confirmed.append)
    assert confirmed == series.files


def test_config_validation(tmp_path):
    with pytest.raises(ValidationError, match="layout"):
        FolderDestinationConfig.model_validate({"path": str(tmp_path), "layout": "by-patient"})
    with pytest.raises(ValidationError, match="extra"):
        FolderDestinationConfig.model_validate({"path": str(tmp_path), "owerwrite": True})
