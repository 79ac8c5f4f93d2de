"""Makes the plugin importable from ``src/`` without installing it (``pip install -e .`` works
too; then this is a no-op)."""

from __future__ import annotations

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
