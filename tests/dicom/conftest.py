"""Helpers for the DICOM I/O tests: dciodvfy and plastimatch as independent checkers."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rtauto.testing import require_tool


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dicom3tools' IOD verifier reports for a file."""
    require_tool("dciodvfy")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def plastimatch_masks(rtstruct: Path, ct_dir: Path, out: Path, *, xor: bool) -> dict[str, object]:
    """Rasterise an RTSTRUCT on its CT with plastimatch; SimpleITK images by ROI name."""
    import SimpleITK as sitk  # noqa: N813

    require_tool("plastimatch")
    command = [
        "plastimatch",
        "convert",
        "--input",
        str(rtstruct),
        "--referenced-ct",
        str(ct_dir),
        "--output-prefix",
        str(out),
        "--prefix-format",
        "nrrd",
    ]
    if xor:
        command.append("--xor-contours")  # even-odd: inner contours on a plane are holes
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return {p.stem: sitk.ReadImage(str(p)) for p in sorted(out.glob("*.nrrd"))}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@pytest.fixture
def dicom_checks() -> SimpleNamespace:
    """``dciodvfy_errors``, ``plastimatch_masks`` and ``dice`` for a test."""
    return SimpleNamespace(
        dciodvfy_errors=dciodvfy_errors, plastimatch_masks=plastimatch_masks, dice=dice
    )
