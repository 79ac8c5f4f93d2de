"""The workflows README.md shows are valid workflows (with the installed plugins)."""

from __future__ import annotations

import re
from pathlib import Path

from rtauto.hooks import build_plugin_manager
from rtauto.workflow import load_workflow_text

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_workflow_in_the_readme_validates():
    host = build_plugin_manager()
    blocks = [
        block
        for block in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
        if block.startswith("name:")
    ]
    assert blocks, "README.md shows no workflow"
    for number, block in enumerate(blocks, start=1):
        load_workflow_text(
            block,
            f"README.md workflow {number}",
            host.steps,
            known_destinations=set(),
            destination_types=host.destination_types,
        )
