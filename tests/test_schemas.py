"""The JSON Schemas committed under schemas/ match the pydantic models."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_exported_schemas_are_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_schemas.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _errors(schema: dict, document: object) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


EMPTY_BLOCKS = """\
name: empty-blocks
trigger: {modality: CT}
steps:
  - id: copy
    uses: route.folder
    with: {path: /tmp/out}
  - id: body
    uses: autocontour.threshold
    needs:
    with:
"""


def test_what_validate_accepts_the_workflow_schema_accepts(tmp_path):
    """Editors use the exported schema: it must not mark a workflow rtauto accepts as wrong."""
    import yaml

    from rtauto.hooks import build_plugin_manager
    from rtauto.workflow import load_workflow
    from rtauto.workflow.schema import workflow_json_schema

    empty = tmp_path / "empty-blocks.yaml"
    empty.write_text(EMPTY_BLOCKS)
    host = build_plugin_manager()
    schema = workflow_json_schema(host.steps)  # as `rtauto schema workflow` prints it
    files = [*sorted((ROOT / "workflows").glob("*.yaml")), empty]
    for path in files:
        load_workflow(path, host.steps)  # rtauto accepts it (raises otherwise)
        assert _errors(schema, yaml.safe_load(path.read_text())) == [], path


def test_the_example_configuration_matches_the_config_schema():
    import json

    import yaml

    schema = json.loads((ROOT / "schemas" / "rtauto-config.schema.json").read_text())
    example = yaml.safe_load((ROOT / "rtauto.example.yaml").read_text())
    assert _errors(schema, example) == []
