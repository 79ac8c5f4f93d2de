"""Destination types: where routing steps send files (DICOM nodes, folders, vendor targets)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

__all__ = ["DestinationType"]


@dataclass(frozen=True)
class DestinationType:
    """A kind of destination a plugin provides.

    ``name`` is what a destination block's ``type:`` says. ``config`` validates that block.
    ``send(config, files)`` delivers the files (DICOM objects or any file) and returns nothing;
    it raises :class:`rtauto.errors.StepRetry` when the destination is unreachable or busy
    (the routing step retries, then tries alternates) and :class:`rtauto.errors.StepFailed`
    when the destination refuses the files for good. ``dicom_only``: ``route.send`` gives it
    DICOM objects only (a PACS), not reports or other files.
    """

    name: str
    config: type[BaseModel]
    send: Callable[[Any, Sequence[Path]], None]
    description: str = ""
    dicom_only: bool = False
