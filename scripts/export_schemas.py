"""Write the JSON Schemas of the files users write into schemas/ (for editors and CI).

    .venv/bin/python scripts/export_schemas.py          # rewrite
    .venv/bin/python scripts/export_schemas.py --check  # fail if a file is out of date

The workflow schema here covers rtauto's built-in steps; `rtauto schema workflow` prints one
that includes every installed plugin's step parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rtauto.config import Settings
from rtauto.hooks import build_plugin_manager
from rtauto.workflow import workflow_json_schema

ROOT = Path(__file__).resolve().parents[1]


def schemas() -> dict[str, dict]:
    builtins = build_plugin_manager(autoload=False)
    return {
        "rtauto-config.schema.json": Settings.model_json_schema(),
        "workflow.schema.json": workflow_json_schema(builtins.steps),
    }


def main(argv: list[str]) -> int:
    stale = []
    for name, schema in schemas().items():
        path = ROOT / "schemas" / name
        text = json.dumps(schema, indent=2, sort_keys=True) + "\n"
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run scripts/export_schemas.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
