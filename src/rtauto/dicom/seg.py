"""DICOM Segmentation (SEG) output through highdicom, one segment per structure.

The SEG references the source CT slices and their Frame of Reference exactly as highdicom
derives them from the image headers; geometry therefore follows the images for any patient
position. Empty structures are kept as segments without frames so the segment list matches
the model's labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from rtauto.dicom.attributes import utf8_header
from rtauto.dicom.geometry import GeometryError, Volume
from rtauto.dicom.rtstruct import Structure
from rtauto.uids import new_uid

__all__ = ["property_type_for", "read_seg", "write_seg"]

# TG-263 names -> SNOMED CT segmented property types (CID 7166 / 7140); others: "Organ".
_PROPERTY_TYPES = {
    "BODY": Code("38266002", "SCT", "Entire body"),
    "EXTERNAL": Code("38266002", "SCT", "Entire body"),
    "LUNG_L": Code("44029006", "SCT", "Left lung"),
    "LUNG_R": Code("3341006", "SCT", "Right lung"),
    "LUNGS": Code("39607008", "SCT", "Lung"),
    "HEART": Code("80891009", "SCT", "Heart"),
    "SPINALCORD": Code("2748008", "SCT", "Spinal cord"),
    "SPINE": Code("421060004", "SCT", "Vertebral column"),
    "ESOPHAGUS": Code("32849002", "SCT", "Esophagus"),
    "BRAINSTEM": Code("15926001", "SCT", "Brainstem"),
    "BRAIN": Code("12738006", "SCT", "Brain"),
    "LIVER": Code("10200004", "SCT", "Liver"),
}


def property_type_for(name: str) -> Code:
    """The SNOMED CT code a segment named ``name`` (TG-263) is described by."""
    return _PROPERTY_TYPES.get(name.upper(), codes.SCT.Organ)


def write_seg(
    volume: Volume,
    structures: Sequence[Structure],
    path: Path | str,
    source_images: Sequence[Dataset] | None = None,
    *,
    algorithm_name: str = "rtauto",
    algorithm_version: str = "0",
    algorithm_family: str = "ArtificialIntelligence",
    manufacturer: str = "rtauto",
    model_name: str = "rtauto",
    software_versions: Sequence[str] = ("rtauto",),
    derivation_description: str = "",
    series_description: str = "rtauto segmentation",
    series_number: int = 9002,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> Dataset:
    """Write a BINARY SEG of ``structures`` (masks on ``volume``'s grid); returns the dataset.

    ``source_images`` defaults to ``volume.headers`` (slice order). ``derivation_description``
    becomes the SEG's ContentDescription (cut at a word, at most 64 characters).
    ``algorithm_family``: a concept of CID 7162 (``ArtificialIntelligence`` for a model,
    ``HistogramAnalysis`` for thresholds). New UIDs come from :func:`rtauto.uids.new_uid`.
    """
    # highdicom refuses some legal source values (a first empty character set value, a
    # Patient's Sex of U): it gets decoded UTF-8 copies with normalised values
    images = [utf8_header(image) for image in (source_images or volume.headers)]
    if len(images) != volume.shape[0]:
        raise GeometryError("SEG needs one source image per slice of the volume")
    for image in images:
        if not image.get("SliceThickness"):
            # Type 2 in the image, required in the SEG's Pixel Measures: a series that leaves
            # it empty gets the distance between its slices (in these copies only)
            # (a new element: the copy shares its elements with the received header)
            image.add_new(0x00180050, "DS", round(float(volume.spacing[2]), 6))
    if not structures:
        raise ValueError("a SEG needs at least one structure")
    labels = np.zeros(volume.shape, dtype=np.uint8 if len(structures) < 256 else np.uint16)
    overlapping = False
    for number, structure in enumerate(structures, start=1):
        if structure.mask.shape != volume.shape:
            raise ValueError(f"structure {structure.name}: mask shape is not the volume's")
        overlapping |= bool((labels[structure.mask] > 0).any())
        labels[structure.mask] = number
    if overlapping:
        # A label map cannot hold overlaps: stack one binary plane per segment instead.
        pixel_array = np.stack([s.mask for s in structures], axis=-1).astype(np.uint8)
    else:
        pixel_array = labels
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64],
        family=getattr(codes.cid7162, algorithm_family),
        version=algorithm_version[:64],
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=structure.name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=property_type_for(structure.name),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=new_uid(),
            tracking_id=structure.name[:64],
            display_color=hd.color.CIELabColor.from_rgb(*structure.color),
        )
        for number, structure in enumerate(structures, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or new_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or new_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name[:64],
        software_versions=[v[:64] for v in software_versions],  # type: ignore[arg-type]
        device_serial_number="0",
        content_description=_shortened(derivation_description, 64) or None,
        content_label="RTAUTO",
        omit_empty_frames=True,
    )
    seg.SeriesDescription = series_description[:64]
    path = Path(path)
    seg.save_as(path, enforce_file_format=True)
    return seg


def read_seg(path: Path | str, volume: Volume) -> list[Structure]:
    """The segments of a SEG as masks on ``volume``'s grid, one per segment (its label as
    the name), placed by the CT slices each frame references.

    The SEG must share the volume's Frame of Reference and reference its images; frames a
    SEG leaves out (empty slices) read as empty. Raises :class:`GeometryError` otherwise.
    """
    seg = hd.seg.segread(str(path))
    if str(seg.FrameOfReferenceUID) != volume.frame_of_reference_uid:
        raise GeometryError(
            f"the SEG's Frame of Reference {seg.FrameOfReferenceUID} is not the image's "
            f"{volume.frame_of_reference_uid}"
        )
    numbers = list(seg.get_segment_numbers())
    if not numbers:
        return []
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(volume.sop_instance_uids),
            segment_numbers=numbers,
            combine_segments=False,
            assert_missing_frames_are_empty=True,
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        raise GeometryError(f"the SEG does not lie on the image's slices: {exc}") from exc
    structures = []
    for index, number in enumerate(numbers):
        description = seg.get_segment_description(number)
        structures.append(
            Structure(name=str(description.segment_label), mask=pixels[..., index] > 0)
        )
    return structures


def _shortened(text: str, limit: int) -> str:
    """``text`` cut at the last word boundary that fits ``limit`` characters."""
    if len(text) <= limit:
        return text
    cut = text[: limit + 1].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return cut if cut else text[:limit]
