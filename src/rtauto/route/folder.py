"""The ``folder`` destination type: files copied durably into a folder (a share, a TPS import).

DICOM files are named ``<MODALITY>.<SOPInstanceUID>.dcm`` (built from validated UIDs only),
in ``<SeriesInstanceUID>/`` sub-folders with ``layout: by-series``; other files (reports) keep
their name, at the top. Each copy is written to a temporary name, fsynced and renamed, so a
reader of the folder never sees half a file.
"""

from __future__ import annotations

import errno
import filecmp
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import pydicom
from pydantic import BaseModel, ConfigDict, Field
from pydicom.errors import InvalidDicomError

from rtauto.destinations import DestinationType
from rtauto.errors import StepFailed, StepRetry
from rtauto.uids import is_valid_uid

__all__ = ["FOLDER_DESTINATION", "FolderDestinationConfig", "send_folder", "target_name"]

OnDelivered = Callable[[Path], None]

# errors an administrator has to fix; anything else (full disk, share gone) may pass
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG})


class FolderDestinationConfig(BaseModel):
    """A folder that receives copies. ``path`` must exist (a missing share is not created)."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    layout: Literal["flat", "by-series"] = "flat"
    overwrite: bool = Field(
        False,
        description="replace a DICOM file of the same SOP Instance UID that differs; "
        "when false that is refused and a different report of the same name is kept beside it",
    )


def _dicom_identity(path: Path) -> tuple[str, str, str] | None:
    """(modality, series UID, SOP instance UID) of a DICOM file; None for any other file."""
    try:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["Modality", "SeriesInstanceUID", "SOPInstanceUID"],
        )
    except (InvalidDicomError, ValueError, EOFError):
        return None
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    series_uid = str(ds.get("SeriesInstanceUID", ""))
    if not is_valid_uid(sop_uid):
        raise StepFailed(f"{path}: SOP Instance UID {sop_uid!r} is not a valid UID")
    modality = re.sub(r"[^A-Z0-9_]", "", str(ds.get("Modality", "")).upper()) or "DICOM"
    return modality, series_uid, sop_uid


def target_name(config: FolderDestinationConfig, path: Path) -> tuple[Path, bool]:
    """Where ``path`` goes inside the folder (relative), and whether it is a DICOM file."""
    identity = _dicom_identity(path)
    if identity is None:
        return Path(path.name), False
    modality, series_uid, sop_uid = identity
    name = Path(f"{modality}.{sop_uid}.dcm")
    if config.layout == "by-series":
        if not is_valid_uid(series_uid):
            raise StepFailed(f"{path}: Series Instance UID {series_uid!r} is not a valid UID")
        return series_uid / name, True
    return name, True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_durably(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.rtauto-tmp")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _place(config: FolderDestinationConfig, source: Path) -> Path:
    """Copy one file into the folder; returns where it is (an identical copy counts)."""
    relative, is_dicom = target_name(config, source)
    target = config.path / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        _copy_durably(source, target)
        return target
    if filecmp.cmp(source, target, shallow=False):
        return target  # delivered before (a re-run): nothing to do
    if config.overwrite:
        _copy_durably(source, target)
        return target
    if is_dicom:
        raise StepFailed(
            f"{target} exists with different content for the same SOP Instance UID "
            "(set overwrite: true to replace it)"
        )
    # a different report of the same name: keep both, never lose one
    stem, suffix = target.stem, target.suffix
    for n in range(2, 10_000):
        candidate = target.with_name(f"{stem}-{n}{suffix}")
        if not candidate.exists():
            _copy_durably(source, candidate)
            return candidate
        if filecmp.cmp(source, candidate, shallow=False):
            return candidate
    raise StepFailed(f"{target}: too many files of that name in the folder")


def send_folder(
    config: FolderDestinationConfig,
    files: Sequence[Path],
    on_delivered: OnDelivered | None = None,
) -> None:
    """Copy ``files`` into the folder; ``on_delivered(path)`` after each durable copy.

    Raises :class:`StepRetry` when the folder is absent (a share not mounted) or a write fails
    for a passing reason (disk full), :class:`StepFailed` for permissions, a read-only file
    system, or a conflicting DICOM file.
    """
    if not config.path.is_dir():
        raise StepRetry(f"folder {config.path} is not available (missing or not mounted)")
    problems: list[str] = []
    for source in map(Path, files):
        try:
            _place(config, source)
        except StepFailed as exc:
            problems.append(str(exc))
            continue
        except FileNotFoundError as exc:
            if not config.path.is_dir():
                raise StepRetry(f"folder {config.path} went away: {exc}") from exc
            problems.append(f"{source}: {exc.strerror}")
            continue
        except OSError as exc:
            if exc.errno in _PERMANENT_ERRNOS:
                problems.append(f"{source}: cannot write into {config.path}: {exc.strerror}")
                continue
            raise StepRetry(f"copying {source} into {config.path} failed: {exc}") from exc
        if on_delivered is not None:
            on_delivered(source)
    if problems:
        raise StepFailed("; ".join(problems))


FOLDER_DESTINATION = DestinationType(
    name="folder",
    config=FolderDestinationConfig,
    send=send_folder,
    description="a folder (files copied durably; flat or one sub-folder per series)",
)
