"""Contours without a model: the external (BODY) and the lungs from HU thresholds.

BODY: voxels above ``body_hu``; a morphological opening (``opening_mm``, in the image plane)
cuts thin contacts such as a couch top touching the patient; the largest 3-D connected
component is the patient, so a couch separated by air or a thin contact is dropped; the edge
the opening shaved off is restored within ``opening_mm``; cavities closed in each image plane
(lungs, airways, mouth) are filled. The component search runs on a grid coarsened to about
2 mm in-plane, the final mask at full resolution.

Lungs: air (below ``lung_hu``) enclosed by the BODY, components above ``min_lung_ml``;
each voxel is assigned to Lung_L or Lung_R by its patient x coordinate (LPS: +x is the
patient's left) relative to the body's centre, so prone and feet-first images get the
right side.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from rtauto.dicom.geometry import Volume

__all__ = ["body_mask", "fill_in_plane", "lung_masks"]


def _in_plane_structure() -> np.ndarray:
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndi.generate_binary_structure(2, 1)
    return structure


def fill_in_plane(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region enclosed in its image plane filled (slices independent)."""
    background, _ = ndi.label(~mask, structure=_in_plane_structure())
    edges = np.concatenate(
        [
            background[:, 0, :].ravel(),
            background[:, -1, :].ravel(),
            background[:, :, 0].ravel(),
            background[:, :, -1].ravel(),
        ]
    )
    outside = np.unique(edges)
    return ~np.isin(background, outside[outside > 0])


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = np.zeros((1, 2 * radius + 1, 2 * radius + 1), dtype=bool)
    disk[0] = xx**2 + yy**2 <= radius**2
    return disk


def body_mask(volume: Volume, body_hu: float = -350.0, opening_mm: float = 4.0) -> np.ndarray:
    """The external contour as a boolean mask on ``volume``'s grid (see the module doc)."""
    above = volume.array > body_hu
    if not above.any():
        return above
    # coarse grid, ~2 mm in-plane, for the opening and the component search
    step_r = max(1, int(round(2.0 / volume.spacing[1])))
    step_c = max(1, int(round(2.0 / volume.spacing[0])))
    coarse = above[:, ::step_r, ::step_c]
    pixel_mm = min(volume.spacing[0] * step_c, volume.spacing[1] * step_r)
    radius = int(round(opening_mm / pixel_mm))
    opened = ndi.binary_opening(coarse, structure=_disk(radius)) if radius > 0 else coarse
    if not opened.any():
        opened = coarse
    components, count = ndi.label(opened)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    patient = components == int(sizes.argmax())
    # restore what the opening shaved off, never more than the opening radius (+1 coarse px)
    region = ndi.binary_dilation(patient, structure=_disk(radius + 1)) if radius > 0 else patient
    full_region = np.repeat(np.repeat(region, step_r, axis=1), step_c, axis=2)
    full_region = full_region[:, : above.shape[1], : above.shape[2]]
    body = above & full_region
    # keep the largest piece again at full resolution: shaved fragments of a couch go
    components, count = ndi.label(body)
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        body = components == int(sizes.argmax())
    return fill_in_plane(body)


def lung_masks(
    volume: Volume,
    body: np.ndarray,
    lung_hu: float = -400.0,
    min_lung_ml: float = 50.0,
) -> dict[str, np.ndarray]:
    """``{"Lung_L": mask, "Lung_R": mask}`` inside ``body`` (either may be empty)."""
    # body is filled in-plane, so air inside it is enclosed: lungs, airways, bowel gas
    air = (volume.array < lung_hu) & body
    components, count = ndi.label(air)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    sizes = np.bincount(components.ravel()) * voxel_ml
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= min_lung_ml)
    lungs = np.isin(components, keep) if keep.size else np.zeros_like(air)
    empty = np.zeros(volume.shape, dtype=bool)
    if not lungs.any():
        return {"Lung_L": empty, "Lung_R": empty.copy()}
    # patient x of each voxel centre: affine row 0 applied to (i, j, k)
    kk, jj, ii = np.nonzero(body)
    step = max(1, len(ii) // 200_000)
    centre_x = float(
        (volume.affine[0, :3] @ np.vstack([ii[::step], jj[::step], kk[::step]])).mean()
        + volume.affine[0, 3]
    )
    kk, jj, ii = np.nonzero(lungs)
    x = volume.affine[0, 0] * ii + volume.affine[0, 1] * jj + volume.affine[0, 2] * kk
    x = x + volume.affine[0, 3]
    left = np.zeros(volume.shape, dtype=bool)
    right = np.zeros(volume.shape, dtype=bool)
    on_left = x > centre_x
    left[kk[on_left], jj[on_left], ii[on_left]] = True
    right[kk[~on_left], jj[~on_left], ii[~on_left]] = True
    return {"Lung_L": left, "Lung_R": right}
