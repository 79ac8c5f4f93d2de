"""UID policy: validation of received UIDs (they become path components) and new UIDs."""

from __future__ import annotations

import re

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

__all__ = ["is_valid_uid", "new_uid", "set_uid_root"]

# PS3.5 9.1: components of digits separated by '.', no leading zero, at most 64 characters.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

_root: str = PYDICOM_ROOT_UID


def is_valid_uid(value: object) -> bool:
    """True for a UID as PS3.5 defines it; such a string is safe as a file name."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def set_uid_root(root: str | None) -> None:
    """Use an organisation's UID root (ending in '.') for every new UID of this process."""
    global _root
    _root = root or PYDICOM_ROOT_UID


def new_uid() -> str:
    """A new UID under the configured organisation root (pydicom's root by default)."""
    return str(generate_uid(prefix=_root))
