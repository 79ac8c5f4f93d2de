"""From a CT volume to a full-resolution int8 label map with a model card's network.

1. reorient the image to the card's ``orientation`` (axis permutation and flips read from the
   affine: exact, no interpolation), resample to the card's ``spacing`` (MONAI ``Spacing``) and
   normalise intensities (MONAI ``ScaleIntensityRange`` / ``NormalizeIntensity``);
2. sliding-window inference (MONAI ``sliding_window_inference``) around the backend, which only
   ever sees fixed-size patches;
3. softmax at network resolution, then back to the image grid slab by slab through the two
   affines (trilinear), argmax per slab into an int8 label map: full-resolution float
   probabilities never exist;
4. per-label post-processing on each label's bounding box: MONAI
   ``KeepLargestConnectedComponent``; cavities filled in one labelling pass (MONAI ``FillHoles``
   gives the same result through scipy's iterative fill, far slower on a 512x512x177 CT).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import (
    KeepLargestConnectedComponent,
    NormalizeIntensity,
    ScaleIntensityRange,
    Spacing,
)
from scipy import ndimage as ndi

from rtauto.dicom.geometry import Volume
from rtauto_autocontour.backends import Predictor
from rtauto_autocontour.card import ModelCard

__all__ = ["NetworkInput", "Segmentation", "postprocess", "preprocess", "reorient", "segment"]

# patient axis (0 = x, 1 = y, 2 = z) and direction of each axis code, LPS patient space
_CODES = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
SLAB = 16  # full-resolution slices resampled at once: bounds the float memory of step 3


@dataclass
class NetworkInput:
    """The preprocessed image: ``tensor`` (1, 1, i, j, k) float32 and its affine (i, j, k)."""

    tensor: torch.Tensor
    affine: np.ndarray


@dataclass
class Segmentation:
    """An int8 label map on the image grid (slices, rows, columns) and where time went."""

    labels: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    provider: str = ""


def _assignment(affine: np.ndarray, codes: str) -> tuple[int, ...]:
    """The best assignment of array axes to the axes of ``codes``: target axis ``t`` takes
    source axis ``order[t]`` (the closest of the six permutations, so oblique images work)."""
    unit = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    wanted = [_CODES[c] for c in codes.upper()]
    return max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(abs(unit[wanted[t][0], perm[t]]) for t in range(3)),
    )


def reorient(
    array_ijk: np.ndarray, affine: np.ndarray, codes: str
) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip an (i, j, k) array so its axes point along ``codes`` (e.g. ``LPS``).

    Each array axis is assigned to the patient axis it is closest to (the best of the six
    permutations, so oblique images work); returns the new array (a view) and its affine.
    """
    unit = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    wanted = [_CODES[c] for c in codes.upper()]
    order = _assignment(affine, codes)
    array = np.transpose(array_ijk, order)
    new = np.eye(4)
    new[:3, 3] = affine[:3, 3]
    for t, source in enumerate(order):
        column = affine[:3, source]
        patient_axis, sign = wanted[t]
        if np.sign(unit[patient_axis, source]) != sign:
            array = np.flip(array, axis=t)
            new[:3, 3] = new[:3, 3] + (array_ijk.shape[source] - 1) * column
            column = -column
        new[:3, t] = column
    return array, new


def preprocess(volume: Volume, card: ModelCard) -> NetworkInput:
    """Resample, reorient and normalise ``volume`` as the card's network expects.

    MONAI ``Spacing`` resamples the volume as it lies in memory (slices, rows, columns; its
    affine says where each voxel is), each axis to the card's spacing of the patient axis it
    runs along; only the much smaller result is permuted and flipped into the card's
    orientation (exact: no second interpolation).
    """
    order = _assignment(volume.affine, card.orientation)  # card axis t <- image axis order[t]
    spacing_of = {source: card.spacing[t] for t, source in enumerate(order)}
    pixdim = [spacing_of[2], spacing_of[1], spacing_of[0]]  # memory axes: k, j, i
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None],
        affine=torch.as_tensor(volume.affine[:, [2, 1, 0, 3]]),
    )
    resampled = Spacing(pixdim=pixdim, mode="bilinear", padding_mode="border")(image)
    kji = np.asarray(resampled.affine, dtype=float)
    array, affine = reorient(
        resampled.as_tensor()[0].numpy().transpose(2, 1, 0),
        kji[:, [2, 1, 0, 3]],
        card.orientation,
    )
    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None])
    norm = card.normalization
    if norm.kind == "window":
        transform = ScaleIntensityRange(norm.low, norm.high, 0.0, 1.0, clip=True)
    else:
        transform = NormalizeIntensity(subtrahend=norm.mean, divisor=norm.std)
    normalised = transform(image)
    tensor = torch.as_tensor(
        normalised.as_tensor() if isinstance(normalised, MetaTensor) else normalised
    )
    return NetworkInput(tensor[None].float().contiguous(), affine)


def run_network(
    network_input: NetworkInput,
    card: ModelCard,
    predictor: Predictor,
    *,
    sw_batch_size: int = 1,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """Sliding-window inference: logits (1, labels + 1, i, j, k) at network resolution."""
    spent = [0.0]

    def network(patches: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        logits = predictor.predict(patches.numpy())
        spent[0] += time.perf_counter() - start
        return torch.from_numpy(logits)

    with torch.inference_mode():
        logits = sliding_window_inference(
            network_input.tensor,
            roi_size=card.patch_size,
            sw_batch_size=sw_batch_size,
            predictor=network,
            overlap=card.overlap,
            mode="gaussian",
        )
    if logits.shape[1] != len(card.labels) + 1:
        raise ValueError(
            f"model {card.ref} returned {logits.shape[1]} channels, its card names "
            f"{len(card.labels)} labels + background"
        )
    if timings is not None:
        timings["network"] = spent[0]
    return torch.as_tensor(logits)


def to_image_grid(logits: torch.Tensor, network_affine: np.ndarray, volume: Volume) -> np.ndarray:
    """Probabilities back onto the image grid as an int8 argmax label map.

    Trilinear interpolation of the softmax, then argmax. Where all 8 network voxels around a
    point agree on the label, interpolation cannot change it: those points take it directly
    and only points near a boundary are interpolated.
    """
    probabilities = torch.softmax(logits.float(), dim=1)[0].numpy()  # (C, i', j', k'), small
    cell = _cell_labels(probabilities)
    mapping = np.linalg.inv(network_affine) @ volume.affine  # image (i, j, k) -> (i', j', k')
    linear = mapping[:3, :3]
    src = np.abs(linear).argmax(axis=1)  # image axis each network axis follows
    axis_aligned = bool(
        np.allclose(linear, np.where(np.arange(3)[None, :] == src[:, None], linear, 0.0))
        and len(set(src.tolist())) == 3
    )
    if axis_aligned:
        return _to_image_grid_separable(probabilities, cell, mapping, src, volume)
    return _to_image_grid_general(probabilities, cell, mapping, volume)


def _cell_labels(probabilities: np.ndarray) -> np.ndarray:
    """The label of each network cell (i'..i'+1, j'..j'+1, k'..k'+1) when its 8 corners
    agree on the argmax, else -1."""
    winner = probabilities.argmax(axis=0).astype(np.int8)
    size = winner.shape
    padded = np.pad(winner, [(0, 1)] * 3, mode="edge")
    cell = padded[:-1, :-1, :-1].copy()
    for di, dj, dk in itertools.product((0, 1), repeat=3):
        corner = padded[di : di + size[0], dj : dj + size[1], dk : dk + size[2]]
        cell[corner != cell] = -1
    return cell


def _axis_samples(
    mapping: np.ndarray, axis: int, image_axis: int, count: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For network ``axis`` following ``image_axis``: the lower and upper network index and
    the interpolation weight of the upper one, for each of the ``count`` image indices
    (points outside the network grid take its edge values)."""
    t = np.arange(count, dtype=float)
    c = np.clip(mapping[axis, image_axis] * t + mapping[axis, 3], 0.0, max(size - 1, 0))
    low = np.minimum(np.floor(c).astype(np.intp), max(size - 2, 0))
    high = np.minimum(low + 1, size - 1)
    return low, high, (c - low).astype(np.float32)


def _to_image_grid_separable(
    probabilities: np.ndarray,
    cell: np.ndarray,
    mapping: np.ndarray,
    src: np.ndarray,
    volume: Volume,
) -> np.ndarray:
    """:func:`to_image_grid` when each network axis follows one image axis (any flips and
    permutations): cell labels by three 1-D lookups, and the trilinear interpolation at
    boundary points as three successive linear ones (along slices, rows, then columns)."""
    depth, rows, cols = volume.shape
    along = {int(image_axis): net_axis for net_axis, image_axis in enumerate(src)}
    order = (along[2], along[1], along[0])  # network axes following k, j, i
    cells = cell.transpose(order)
    probs = np.ascontiguousarray(probabilities.transpose(0, *(1 + a for a in order)))
    shape = cells.shape
    k0, k1, kw = _axis_samples(mapping, order[0], 2, depth, shape[0])
    j0, j1, jw = _axis_samples(mapping, order[1], 1, rows, shape[1])
    i0, i1, iw = _axis_samples(mapping, order[2], 0, cols, shape[2])
    # the cell of a point is the one at its lower corner
    labels = np.ascontiguousarray(
        np.take(np.take(np.take(cells, k0, axis=0), j0, axis=1), i0, axis=2)
    )
    flat_labels = labels.reshape(-1)  # a view
    plane = rows * cols
    for start in range(0, depth, SLAB):
        stop = min(depth, start + SLAB)
        # the boundary points of the slab, as flat indices (much faster than a 3-D nonzero)
        flat = np.flatnonzero(labels[start:stop] < 0)
        if not flat.size:
            continue
        w = kw[start:stop, None, None]
        along_k = np.take(probs, k0[start:stop], axis=1) * (1 - w)
        along_k += np.take(probs, k1[start:stop], axis=1) * w  # (C, slab, j', i'): small
        kk, rest = np.divmod(flat, plane)
        jj, ii = np.divmod(rest, cols)
        low, high, w = j0[jj], j1[jj], jw[jj]
        lower_i, upper_i = i0[ii], i1[ii]
        along_j_low = along_k[:, kk, low, lower_i] * (1 - w)
        along_j_low += along_k[:, kk, high, lower_i] * w
        along_j_high = along_k[:, kk, low, upper_i] * (1 - w)
        along_j_high += along_k[:, kk, high, upper_i] * w
        w = iw[ii]
        mixed = along_j_low * (1 - w) + along_j_high * w
        flat_labels[start * plane + flat] = mixed.argmax(axis=0).astype(np.int8)
    return labels


def _to_image_grid_general(
    probabilities: np.ndarray,
    cell: np.ndarray,
    mapping: np.ndarray,
    volume: Volume,
) -> np.ndarray:
    """:func:`to_image_grid` for an image grid oblique to the network's, slab by slab."""
    size = np.asarray(cell.shape)
    upper = np.maximum(size - 1, 0).astype(float)
    depth, rows, cols = volume.shape
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    labels = np.empty(volume.shape, dtype=np.int8)
    for k0 in range(0, depth, SLAB):
        k1 = min(depth, k0 + SLAB)
        kk = np.arange(k0, k1, dtype=float)[:, None, None]
        coords = [
            np.clip(
                mapping[a, 0] * ii + mapping[a, 1] * jj + mapping[a, 2] * kk + mapping[a, 3],
                0.0,
                upper[a],
            )
            for a in range(3)
        ]  # border: points outside the network grid take its edge values
        base = [
            np.minimum(np.floor(c).astype(np.int64), max(int(upper[a]) - 1, 0))
            for a, c in enumerate(coords)
        ]
        slab = cell[base[0], base[1], base[2]]
        todo = np.nonzero(slab < 0)
        if todo[0].size:
            frac = [coords[a][todo] - base[a][todo] for a in range(3)]
            at = [base[a][todo] for a in range(3)]
            mixed = np.zeros((probabilities.shape[0], todo[0].size), dtype=np.float32)
            for di, dj, dk in itertools.product((0, 1), repeat=3):
                weight = (
                    (frac[0] if di else 1 - frac[0])
                    * (frac[1] if dj else 1 - frac[1])
                    * (frac[2] if dk else 1 - frac[2])
                ).astype(np.float32)
                i_ = np.minimum(at[0] + di, size[0] - 1)
                j_ = np.minimum(at[1] + dj, size[1] - 1)
                k_ = np.minimum(at[2] + dk, size[2] - 1)
                mixed += probabilities[:, i_, j_, k_] * weight
            slab[todo] = mixed.argmax(axis=0).astype(np.int8)
        labels[k0:k1] = slab
    return labels


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """MONAI's KeepLargestConnectedComponent on a mask (given on its label's bounding box)."""
    kept = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False)(
        torch.from_numpy(mask.view(np.uint8))[None]
    )
    return torch.as_tensor(kept)[0].numpy().astype(bool)


def _fill_cavities(mask: np.ndarray) -> np.ndarray:
    """``mask`` with enclosed 3-D cavities filled: background not connected to the edge of
    the (bounding box) array.

    Same result as MONAI ``FillHoles`` (scipy's iterative fill), in one labelling pass.
    """
    inner = np.pad(mask, 1)
    background, _ = ndi.label(~inner)
    outside = background == background[0, 0, 0]
    return ~outside[1:-1, 1:-1, 1:-1]


def postprocess(labels: np.ndarray, card: ModelCard) -> np.ndarray:
    """Per-label options of the card: largest 3-D component, filled cavities (in place).

    Each label is processed on its bounding box (one pass over the volume finds them all);
    a filled cavity takes the label only where no other label is.
    """
    boxes = ndi.find_objects(labels)
    for index, spec in sorted(card.labels.items()):
        if index > len(boxes) or boxes[index - 1] is None:
            continue  # the model did not find it
        if not (spec.largest_component or spec.fill_holes):
            continue
        box = labels[boxes[index - 1]]  # a view: edits reach ``labels``
        mask = box == index
        if spec.largest_component:
            kept = _largest_component(mask)
            box[mask & ~kept] = 0
            mask = kept
        if spec.fill_holes:
            box[_fill_cavities(mask) & (box == 0)] = index  # other labels stay
    return labels


def segment(
    volume: Volume,
    card: ModelCard,
    predictor: Predictor,
    *,
    sw_batch_size: int = 1,
) -> Segmentation:
    """Run the whole chain on ``volume``; see the module docstring."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    network_input = preprocess(volume, card)
    timings["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    logits = run_network(
        network_input, card, predictor, sw_batch_size=sw_batch_size, timings=timings
    )
    timings["sliding_window"] = time.perf_counter() - start
    start = time.perf_counter()
    labels = to_image_grid(logits, network_input.affine, volume)
    timings["resample"] = time.perf_counter() - start
    start = time.perf_counter()
    labels = postprocess(labels, card)
    timings["postprocess"] = time.perf_counter() - start
    return Segmentation(labels, timings, predictor.provider)
