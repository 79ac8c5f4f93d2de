"""Patient and study attributes copied from a source image into the objects rtauto writes.

Values that are legal in a received image but not in a new object are normalised here, so
every writer (RTSTRUCT, SEG, REG) treats them alike: a Patient's Sex outside the enumerated
values (``U``, seen in anonymised data) is written empty, and text in any character set,
code extensions included, is carried over decoded and re-encoded as UTF-8 where a writer
needs one character set it can handle.
"""

from __future__ import annotations

import copy as copy_module

from pydicom.dataset import Dataset

__all__ = ["PATIENT_SEX_VALUES", "patient_sex", "utf8_header"]

PATIENT_SEX_VALUES = ("M", "F", "O")  # PS3.3 C.7.1.1, enumerated values


def patient_sex(header: Dataset) -> str:
    """The source's Patient's Sex when it is an enumerated value, else empty (unknown)."""
    value = str(header.get("PatientSex", "") or "").strip().upper()
    return value if value in PATIENT_SEX_VALUES else ""


def utf8_header(header: Dataset) -> Dataset:
    """A copy of an image header whose text is decoded from the source's character set and
    declared as UTF-8 (``ISO_IR 192``), with Patient's Sex normalised. The source dataset's
    values are decoded in place (which changes nothing it holds); pixel data is shared."""
    header.decode()  # every text value to str, read with the source's own character set
    # new elements (Dataset(header) would share the header's own dict): nothing done to the
    # copy reaches the received header; values (pixel data) are shared, not copied
    copy = Dataset()
    for element in header:
        copy.add(copy_module.copy(element))
    copy.add_new(0x00080005, "CS", "ISO_IR 192")  # SpecificCharacterSet
    if "PatientSex" in copy:
        copy.add_new(0x00100040, "CS", patient_sex(header))
    if hasattr(header, "file_meta"):
        copy.file_meta = header.file_meta
    return copy
