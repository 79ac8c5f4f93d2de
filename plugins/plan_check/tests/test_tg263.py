"""The TG-263 name parser and resolver."""

from __future__ import annotations

import pytest
from rtauto_plan_check import tg263


@pytest.mark.parametrize(
    "name",
    [
        "SpinalCord",
        "Lung_L",
        "Parotid_R",
        "PTV_7000",
        "CTVn_4500",
        "Brainstem_PRV03",
        "zPTV_Ring",
        "Heart",
        "Femur_Head_L",
        "External",
    ],
)
def test_compliant_names(name: str) -> None:
    parsed = tg263.parse(name)
    assert parsed.compliant, parsed.problems


def test_parts_are_split() -> None:
    parsed = tg263.parse("Brainstem_PRV03")
    assert parsed.root == "Brainstem" and parsed.prv_margin_mm == 3
    assert tg263.parse("Lung_L").laterality == "L"
    assert tg263.parse("PTV_7000").target == "PTV"
    assert tg263.parse("zPTV_Ring").non_evaluated


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("Lt Lung", "space"),
        ("Lung_Lt", "laterality"),
        ("SPINALCORD", "should be written"),
        ("Lung_L_Hilum_Sup_Ant", "longer than 16"),
        ("Hrt", "not a TG-263 root"),
    ],
)
def test_non_compliant_names(name: str, problem: str) -> None:
    parsed = tg263.parse(name)
    assert not parsed.compliant
    assert any(problem in p for p in parsed.problems), parsed.problems


@pytest.mark.parametrize(
    ("name", "standard"),
    [
        ("Lt Lung", "Lung_L"),
        ("Left Lung", "Lung_L"),
        ("LUNG_RT", "Lung_R"),
        ("Spinal Cord", "SpinalCord"),
        ("BODY", "External"),
        ("Heart", "Heart"),
        ("PTV_7000", "PTV_7000"),
        ("Hrt", None),
        ("zPTV_Ring", None),
    ],
)
def test_resolve(name: str, standard: str | None) -> None:
    assert tg263.resolve(name) == standard
