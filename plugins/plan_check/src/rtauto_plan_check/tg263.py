"""AAPM TG-263 structure names: a parser of the naming scheme and a resolver of common variants.

A TG-263 name is built from parts, not matched against one regular expression:

* an optional non-evaluation prefix ``z`` or ``_`` (``zPTV_Ring``: planning helper);
* a target (``GTV``, ``CTV``, ``ITV``, ``PTV``, with optional ``n``/``p`` and a suffix after
  ``_``, e.g. ``PTV_High``, ``PTV_7000``, ``CTVn_4500``) or an anatomical root from the
  standard's vocabulary written in its capitalisation (``SpinalCord``, ``Lung``, ``Heart``);
* optional ``_`` parts: laterality (``_L``, ``_R``), partial/spatial qualifiers (``_Ant``,
  ``_Sup``, ``_Hilum`` ...), a PRV margin (``_PRV`` or ``_PRV05``, mm);
* at most 16 characters in all.

:func:`parse` splits a name into those parts and lists what breaks the scheme;
:func:`resolve` maps a name as clinics write it (``Lt Lung``, ``L_Lung``, ``Spinal Cord``,
``BODY``) to the TG-263 name it stands for, or None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["ParsedName", "parse", "resolve", "ROOTS"]

MAX_LENGTH = 16

# TG-263 anatomical roots (the common subset), in the standard's capitalisation.
ROOTS: tuple[str, ...] = (
    "A_Aorta",
    "Bladder",
    "Body",
    "Bone_Mandible",
    "BrachialPlex",
    "Brain",
    "Brainstem",
    "Breast",
    "Bronchus",
    "Cavity_Oral",
    "Cochlea",
    "Colon",
    "Couch",
    "CouchInterior",
    "CouchSurface",
    "Duodenum",
    "Esophagus",
    "External",
    "Eye",
    "Femur_Head",
    "Glnd_Lacrimal",
    "Glnd_Submand",
    "Glnd_Thyroid",
    "GreatVes",
    "Heart",
    "Hippocampus",
    "Kidney",
    "Larynx",
    "Lens",
    "Lips",
    "Liver",
    "Lung",
    "Lungs",
    "Musc_Constrict",
    "Bowel",
    "Bowel_Small",
    "Bowel_Large",
    "OpticChiasm",
    "OpticNrv",
    "Parotid",
    "Pancreas",
    "PenileBulb",
    "Pituitary",
    "Prostate",
    "Rectum",
    "Retina",
    "Ribs",
    "SeminalVes",
    "Skin",
    "SpinalCanal",
    "SpinalCord",
    "Spleen",
    "Stomach",
    "Trachea",
    "Bolus",
    "Chestwall",
    "Scar",
    "Nodes",
    "LN_Ax",
    "LN_IMN",
    "LN_Sclav",
    "Areola",
    "Cauda",
    "Urethra",
    "Uterus",
    "Vagina",
    "Brain_Stem_PRV",
)
_ROOTS_LOWER = {r.lower(): r for r in ROOTS}

# How clinics often write a root (lower case, spaces and underscores removed) -> TG-263 root.
SYNONYMS: dict[str, str] = {
    "cord": "SpinalCord",
    "spinalcord": "SpinalCord",
    "spcord": "SpinalCord",
    "brainstem": "Brainstem",
    "stem": "Brainstem",
    "oesophagus": "Esophagus",
    "esoph": "Esophagus",
    "body": "External",
    "external": "External",
    "outline": "External",
    "skin": "External",
    "chiasm": "OpticChiasm",
    "opticchiasm": "OpticChiasm",
    "opticnerve": "OpticNrv",
    "femoralhead": "Femur_Head",
    "femurhead": "Femur_Head",
    "smallbowel": "Bowel_Small",
    "largebowel": "Bowel_Large",
    "thyroid": "Glnd_Thyroid",
    "lung": "Lung",
    "lungs": "Lungs",
    "totallung": "Lungs",
    "heart": "Heart",
    "kidney": "Kidney",
    "parotid": "Parotid",
    "eye": "Eye",
    "lens": "Lens",
    "breast": "Breast",
    "couch": "Couch",
    "table": "Couch",
    "bolus": "Bolus",
    "rectum": "Rectum",
    "bladder": "Bladder",
    "liver": "Liver",
}

_LEFT = {"l", "lt", "left", "lft"}
_RIGHT = {"r", "rt", "right", "rgt"}
_QUALIFIERS = {
    "ant",
    "post",
    "sup",
    "inf",
    "med",
    "lat",
    "prox",
    "dist",
    "hilum",
    "ex",
    "in",
    "ring",
    "base",
    "tip",
    "high",
    "mid",
    "low",
    "eval",
    "opt",
    "avoid",
    "boost",
    "nonpl",
}
_TARGET_RE = re.compile(r"^(GTV|CTV|ITV|PTV|IGTV|ICTV)(n|p|sb|par|v|vas)?(\d+)?$")
_PRV_RE = re.compile(r"^PRV(\d{1,2})?$")


@dataclass
class ParsedName:
    """The parts of a structure name and what, if anything, breaks TG-263."""

    name: str
    root: str = ""
    target: str = ""  # GTV/CTV/ITV/PTV when the name is a target
    laterality: str = ""  # "L", "R" or ""
    qualifiers: list[str] = field(default_factory=list)
    prv_margin_mm: int | None = None
    non_evaluated: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def compliant(self) -> bool:
        return not self.problems


def parse(name: str) -> ParsedName:
    """Split ``name`` by the TG-263 scheme; ``problems`` says what breaks it (empty: compliant)."""
    parsed = ParsedName(name=name)
    text = name
    if len(name) > MAX_LENGTH:
        parsed.problems.append(f"longer than {MAX_LENGTH} characters")
    if " " in name:
        parsed.problems.append("contains a space")
    if re.search(r"[^A-Za-z0-9_^\-.]", name.replace(" ", "")):
        parsed.problems.append("contains characters outside A-Z, a-z, 0-9, _ ^ - .")
    if text[:1] in ("z", "_") and len(text) > 1 and (text[1].isupper() or text[0] == "_"):
        parsed.non_evaluated = True
        text = text[1:].lstrip("_")
    parts = [p for p in re.split(r"[_ ]", text) if p]
    if not parts:
        parsed.problems.append("empty name")
        return parsed
    head = parts[0].split("^")[0]
    if _TARGET_RE.match(head):
        parsed.target = _TARGET_RE.match(head).group(1)  # type: ignore[union-attr]
        parsed.root = head
        parsed.qualifiers = parts[1:]
        return parsed
    # the longest run of leading parts that spells a root (roots may contain "_")
    for length in range(len(parts), 0, -1):
        candidate = "_".join(parts[:length])
        if candidate.lower() in _ROOTS_LOWER:
            standard = _ROOTS_LOWER[candidate.lower()]
            parsed.root = standard
            if candidate != standard:
                parsed.problems.append(f"root {candidate!r} should be written {standard!r}")
            rest = parts[length:]
            break
    else:
        parsed.root = parts[0]
        parsed.problems.append(f"{parts[0]!r} is not a TG-263 root")
        rest = parts[1:]
    for part in rest:
        low = part.lower()
        if part in ("L", "R"):
            parsed.laterality = part
        elif low in _LEFT | _RIGHT:
            parsed.laterality = "L" if low in _LEFT else "R"
            parsed.problems.append(f"laterality {part!r} should be _{parsed.laterality}")
        elif _PRV_RE.match(part):
            margin = _PRV_RE.match(part).group(1)  # type: ignore[union-attr]
            parsed.prv_margin_mm = int(margin) if margin else None
        elif low in _QUALIFIERS or part[:1].isupper() or part.isdigit():
            parsed.qualifiers.append(part)
        else:
            parsed.problems.append(f"unknown part {part!r}")
    return parsed


def resolve(name: str) -> str | None:
    """The TG-263 name ``name`` stands for (``Lt Lung`` -> ``Lung_L``), or None.

    Targets resolve to themselves; a non-evaluated helper (``zPTV_Ring``) resolves to None.
    """
    parsed = parse(name.strip())
    if parsed.non_evaluated:
        return None
    if parsed.target:
        return name.strip()
    words = [w for w in re.split(r"[_\s\-.]+", name.strip()) if w]
    laterality = ""
    kept = []
    for word in words:
        low = word.lower()
        if low in _LEFT and not laterality:
            laterality = "L"
        elif low in _RIGHT and not laterality:
            laterality = "R"
        else:
            kept.append(word)
    key = "".join(kept).lower()
    root = SYNONYMS.get(key) or _ROOTS_LOWER.get("_".join(kept).lower())
    if root is None:
        return name.strip() if parsed.compliant else None
    if root == "Body":
        root = "External"
    return f"{root}_{laterality}" if laterality else root
