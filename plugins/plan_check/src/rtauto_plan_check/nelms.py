"""The analytic DVH benchmark of Nelms et al. (Med. Phys. 42, 2015), as a test and benchmark
fixture for :mod:`rtauto_plan_check.dvh`.

The data set (structure sets of spheres, cylinders and cones on 0.2-3 mm planes, linear dose
gradients, and a spreadsheet of analytic D-points) is read in place; reading the spreadsheet
needs ``openpyxl`` (the project's ``dev`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom

from rtauto_plan_check.dvh import DVH, DoseGrid, compute_dvh, read_structures

__all__ = ["METRICS", "NelmsCase", "d_points", "nelms_cases", "our_dvh"]

METRICS = ("Dmin", "Dmax", "Dmean", "D99", "D95", "D5", "D1", "D0.03cc")


@dataclass(frozen=True)
class NelmsCase:
    """One spreadsheet row: a structure on a dose grid and its analytic values (cGy; the
    structure's volume in cm3 under ``Volume``)."""

    structure: Path
    dose: Path
    direction: str  # AntPost | SupInf
    voxel_mm: int
    reference: dict[str, float]

    @property
    def label(self) -> str:
        return f"{self.structure.stem} {self.direction} {self.voxel_mm}mm"


def nelms_cases(root: Path) -> list[NelmsCase]:
    """Every row of the spreadsheet whose structure set and dose grid are under ``root``
    (the folder holding ``dvh-benchmark-nelms``)."""
    import openpyxl

    folder = root / "dvh-benchmark-nelms" / "DVH-Analysis-Data-Etc"
    sheet = openpyxl.load_workbook(
        folder / "ANALYTICAL RESULTS" / "Extracted Analytical D points.xlsx", data_only=True
    ).active
    cases = []
    for row in sheet.iter_rows(min_row=4, max_col=27, values_only=True):
        name, voxel, gradient = row[0], row[3], row[4]
        if not name or not isinstance(voxel, int | float):
            continue
        direction = "AntPost" if str(gradient).startswith("Z") else "SupInf"
        structure = folder / "STRUCTURES" / f"{name.replace('__', '_')}.dcm"
        dose = folder / "DOSE GRIDS" / f"Linear_{direction}_{int(voxel)}mm_Aligned.dcm"
        if structure.is_file() and dose.is_file():
            reference = dict(zip(("Volume", *METRICS), row[18:27], strict=True))
            cases.append(NelmsCase(structure, dose, direction, int(voxel), reference))
    return cases


def our_dvh(case: NelmsCase, dose_cache: dict[Path, DoseGrid]) -> DVH:
    """rtauto's DVH of the case's structure (grids are read once into ``dose_cache``)."""
    if case.dose not in dose_cache:
        dose_cache[case.dose] = DoseGrid.from_dataset(pydicom.dcmread(case.dose))
    structures = read_structures(pydicom.dcmread(case.structure))
    structure = next(s for s in structures.values() if s.planes)
    return compute_dvh(structure, dose_cache[case.dose])


def d_points(dvh: DVH) -> dict[str, float]:
    """The spreadsheet's D-points of a DVH, in cGy."""
    values = {
        "Dmin": dvh.minimum,
        "Dmax": dvh.maximum,
        "Dmean": dvh.mean,
        "D99": dvh.d_percent(99),
        "D95": dvh.d_percent(95),
        "D5": dvh.d_percent(5),
        "D1": dvh.d_percent(1),
        "D0.03cc": dvh.d_cc(0.03),
    }
    return {k: 100.0 * v for k, v in values.items()}
