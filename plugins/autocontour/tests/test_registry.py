"""Model cards and the registry: validation, NAME@latest, rescans, sha256, JSON Schema."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from rtauto_autocontour.card import card_json_schema
from rtauto_autocontour.registry import ModelError, ModelRegistry

MODELS = Path(__file__).resolve().parents[3] / "models"


def _copy_model(models: Path, version: str, *, name: str = "demo-thorax", **changes) -> Path:
    folder = models / name / version
    folder.mkdir(parents=True)
    shutil.copy(MODELS / "demo-thorax" / "1" / "model.onnx", folder / "model.onnx")
    card = yaml.safe_load((MODELS / "demo-thorax" / "1" / "model.yaml").read_text())
    card.update(name=name, version=version, **changes)
    (folder / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder


def test_shipped_models_verify() -> None:
    checks = ModelRegistry(MODELS).check()
    assert {c.ref for c in checks} >= {"demo-thorax@1", "demo-thorax-ts@1"}
    assert all(c.ok for c in checks), [c.reason for c in checks if not c.ok]
    for model in ModelRegistry(MODELS).models():
        assert model.weights_path.stat().st_size < 10_000_000


def test_latest_is_the_highest_version_and_a_new_version_is_picked_up(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    _copy_model(tmp_path, "9")
    first = registry.resolve("demo-thorax@latest")
    assert first.ref == "demo-thorax@9"
    assert registry.resolve("demo-thorax").ref == "demo-thorax@9"

    _copy_model(tmp_path, "10")  # dropped in while the registry lives
    latest = registry.resolve("demo-thorax@latest")
    assert latest.ref == "demo-thorax@10"
    assert (
        latest.card_hash
        == hashlib.sha256((tmp_path / "demo-thorax" / "10" / "model.yaml").read_bytes()).hexdigest()
    )
    assert latest.card_hash != first.card_hash
    assert registry.resolve("demo-thorax@9").ref == "demo-thorax@9"  # pinned stays pinned


def test_wrong_sha256_is_refused_with_the_reason(tmp_path: Path) -> None:
    _copy_model(tmp_path, "1", sha256="0" * 64)
    registry = ModelRegistry(tmp_path)
    with pytest.raises(
        ModelError, match="sha256 of .*model.onnx is [0-9a-f]{64}, the card says 0+"
    ):
        registry.resolve("demo-thorax@1")
    [check] = registry.check()
    assert not check.ok and "sha256" in check.reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"labels": {}}, "at least one output label"),
        ({"labels": {1: {"name": "Lung_L"}, 3: {"name": "Heart"}}}, "numbered 1..2 without gaps"),
        ({"backend": "tensorflow"}, "backend 'tensorflow' is not available"),
        ({"orientation": "LLS"}, "must name each patient axis once"),
        ({"license": ""}, "license"),
        ({"extra_key": 1}, "extra_key"),
        ({"version": "2"}, "card says demo-thorax@2 but lies in demo-thorax/1"),
    ],
)
def test_invalid_cards_are_refused_with_a_reason(tmp_path: Path, changes, reason) -> None:
    folder = _copy_model(tmp_path, "1")
    card = yaml.safe_load((folder / "model.yaml").read_text())
    card.update(changes)
    (folder / "model.yaml").write_text(yaml.safe_dump(card))
    registry = ModelRegistry(tmp_path)
    assert registry.models() == []
    [(path, message)] = registry.problems().items()
    assert path == folder / "model.yaml" and reason in message
    with pytest.raises(ModelError, match="refused cards"):
        registry.resolve("demo-thorax@1")


def test_latest_is_not_an_older_version_when_the_newest_card_is_refused(tmp_path: Path) -> None:
    _copy_model(tmp_path, "1")
    _copy_model(tmp_path, "2", normalisation={"kind": "window"})  # a typo: refused
    registry = ModelRegistry(tmp_path)
    with pytest.raises(
        ModelError,
        match=r"model demo-thorax@latest: the newest version, demo-thorax@2, is refused "
        r"\(.*normalisation.*\); mend its card, or name the version to use \(demo-thorax@1\)",
    ):
        registry.resolve("demo-thorax@latest")
    assert registry.resolve("demo-thorax@1").ref == "demo-thorax@1"  # named: still usable
    # an older refused card does not stand in the way of the latest valid one
    _copy_model(tmp_path, "3")
    assert registry.resolve("demo-thorax@latest").ref == "demo-thorax@3"


def test_a_card_that_is_not_yaml_names_its_file_and_line(tmp_path: Path) -> None:
    folder = _copy_model(tmp_path, "1")
    (folder / "model.yaml").write_text("name: demo-thorax\nversion: '1'\nlabels: [1, 2\n")
    [(path, message)] = ModelRegistry(tmp_path).problems().items()
    assert message.startswith(f"{folder / 'model.yaml'}:4:1: not valid YAML: ")
    assert "byte string" not in message


def test_unknown_model_names_what_is_known(tmp_path: Path) -> None:
    _copy_model(tmp_path, "1")
    with pytest.raises(ModelError, match=r"model heart@1 is not in .*known: \['demo-thorax@1'\]"):
        ModelRegistry(tmp_path).resolve("heart@1")


def test_json_schema_in_models_folder_is_current() -> None:
    committed = json.loads((MODELS / "model-card.schema.json").read_text())
    assert committed == card_json_schema()
    assert {"name", "version", "backend", "sha256", "labels", "spacing"} <= set(
        committed["required"]
    )


def test_example_workflow_validates_against_the_registered_steps() -> None:
    from rtauto.hooks import build_plugin_manager
    from rtauto.workflow.loader import load_workflow

    host = build_plugin_manager()
    assert {"autocontour.segment", "autocontour.threshold"} <= set(host.steps)
    assert {"onnx", "torchscript", "monai_bundle"} <= set(host.model_backends)
    loaded = load_workflow(MODELS.parent / "workflows" / "autocontour-ct.yaml", host.steps)
    assert loaded.params["contour"].model == "demo-thorax@latest"
    assert ModelRegistry(MODELS).resolve(loaded.params["contour"].model).ref == "demo-thorax@1"
