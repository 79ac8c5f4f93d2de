"""The model card: what a contouring model is, what it expects and what it outputs.

A card is ``models/NAME/VERSION/model.yaml``; the weights lie beside it. The card is a pydantic
model, so a typo is an error with its location; :func:`card_json_schema` exports the JSON
Schema that editors use to check cards.

Array convention: the network sees a channel-first array indexed ``[c, i, j, k]`` after the
image is reoriented to ``orientation`` (``LPS``: ``i`` runs to the patient's left, ``j`` to
posterior, ``k`` to superior) and resampled to ``spacing`` (mm along ``i, j, k``).
``patch_size`` is in the same ``i, j, k`` order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rtauto.dicom.rtstruct import RTSTRUCT_INTERPRETED_TYPES

__all__ = [
    "KNOWN_BACKENDS",
    "LabelSpec",
    "ModelCard",
    "Normalization",
    "card_json_schema",
    "write_card_json_schema",
]

KNOWN_BACKENDS = ("onnx", "torchscript", "monai_bundle")

_AXES = {"L": "x", "R": "x", "P": "y", "A": "y", "S": "z", "I": "z"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Normalization(_Strict):
    """Intensity normalisation before the network.

    ``window``: clip to ``[low, high]`` (HU for CT) and scale to ``[0, 1]``.
    ``zscore``: ``(value - mean) / std``.
    """

    kind: Literal["window", "zscore"] = "window"
    low: float = -1000.0
    high: float = 1000.0
    mean: float = 0.0
    std: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> Normalization:
        if self.kind == "window" and self.high <= self.low:
            raise ValueError("normalization window: high must be above low")
        if self.kind == "zscore" and self.std <= 0:
            raise ValueError("normalization zscore: std must be positive")
        return self


class LabelSpec(_Strict):
    """One output label of the network and how it becomes a structure."""

    name: str = Field(..., min_length=1, max_length=64, description="TG-263 structure name")
    color: tuple[int, int, int] = Field((255, 0, 0), description="RGB, 0-255")
    interpreted_type: str = Field("ORGAN", description="DICOM RTROIInterpretedType")
    largest_component: bool = Field(False, description="keep only the largest 3-D component")
    fill_holes: bool = Field(False, description="fill cavities enclosed by the structure")

    @field_validator("interpreted_type")
    @classmethod
    def _check_type(cls, value: str) -> str:
        if value not in RTSTRUCT_INTERPRETED_TYPES:
            raise ValueError(f"{value!r} is not a DICOM RTROIInterpretedType defined term")
        return value

    @field_validator("color")
    @classmethod
    def _check_color(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError("colour components must lie in 0..255")
        return value


class ModelCard(_Strict):
    """``model.yaml``: identity, input expectations, outputs and provenance of a model."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=48)
    version: str = Field(..., pattern=r"^[0-9A-Za-z][0-9A-Za-z._-]*$", max_length=16)
    description: str = ""
    backend: str = Field(
        ...,
        description="onnx | torchscript | monai_bundle, or a backend a plugin registers",
    )
    weights: str = Field(
        ..., description="file (onnx, torchscript) or folder (monai_bundle) beside the card"
    )
    sha256: str = Field(
        ...,
        pattern=r"^[0-9a-f]{64}$",
        description="of the weights file; of a bundle's models/model.ts or model.pt",
    )
    input_modality: str = "CT"
    orientation: str = Field("LPS", description="axis codes of the network's i, j, k")
    spacing: tuple[float, float, float] = Field(..., description="mm along i, j, k")
    normalization: Normalization = Field(default_factory=Normalization)
    patch_size: tuple[int, int, int] = Field(..., description="sliding-window patch, i, j, k")
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    labels: dict[int, LabelSpec] = Field(..., description="label index (1..n) -> structure")
    license: str = Field(..., min_length=1)
    training_data: str = Field(..., min_length=1, description="what the model was trained on")
    references: list[str] = Field(default_factory=list)

    @field_validator("orientation")
    @classmethod
    def _check_orientation(cls, value: str) -> str:
        value = value.upper()
        if len(value) != 3 or sorted(_AXES.get(c, "?") for c in value) != ["x", "y", "z"]:
            raise ValueError(f"orientation {value!r} must name each patient axis once, e.g. LPS")
        return value

    @field_validator("spacing")
    @classmethod
    def _check_spacing(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v <= 0 for v in value):
            raise ValueError("spacing must be positive")
        return value

    @field_validator("patch_size")
    @classmethod
    def _check_patch(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v < 1 for v in value):
            raise ValueError("patch_size must be positive")
        return value

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: dict[int, LabelSpec]) -> dict[int, LabelSpec]:
        if not value:
            raise ValueError("a model must name at least one output label")
        if sorted(value) != list(range(1, len(value) + 1)):
            raise ValueError(
                f"labels must be numbered 1..{len(value)} without gaps (0 is background), "
                f"got {sorted(value)}"
            )
        names = [spec.name for spec in value.values()]
        if len(set(names)) != len(names):
            raise ValueError(f"label names must be unique: {names}")
        return value

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def structure_names(self) -> list[str]:
        return [self.labels[i].name for i in sorted(self.labels)]


def card_json_schema() -> dict:
    """The JSON Schema of ``model.yaml``."""
    schema = ModelCard.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rtauto model card (model.yaml)"
    return schema


def write_card_json_schema(path: Path) -> None:
    """Write :func:`card_json_schema` to ``path`` (kept in ``models/model-card.schema.json``)."""
    path.write_text(json.dumps(card_json_schema(), indent=2) + "\n", encoding="utf-8")
