"""From a CT volume to a full-resolution int8 label map with a model card's network.

1. reorient the image to the card's ``orientation`` (axis permutation and flips read from the
   affine: exact, no interpolation), resample to the card's ``spacing`` (MONAI ``Spacing``) and
   normalise intensities (MONAI ``ScaleIntensityRange`` / ``NormalizeIntensity``);
2. sliding-window inference (MONAI ``sliding_window_inference``) around the backend, which only
   ever sees fixed-size patches;
3. softmax at network resolution, then back to the image grid slab by slab through the two
   affines (trilinear), argmax per slab into an int8 label map: full-resolution float
   probabilities never exist;
4. per-label post-processing (MONAI ``KeepLargestConnectedComponent``, ``FillHoles``).
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
    FillHoles,
    KeepLargestConnectedComponent,
    NormalizeIntensity,
    ScaleIntensityRange,
    Spacing,
)

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


def reorient(
    array_ijk: np.ndarray, affine: np.ndarray, codes: str
) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip an (i, j, k) array so its axes point along ``codes`` (e.g. ``LPS``).

    Each array axis is assigned to the patient axis it is closest to (the best of the six
    permutations, so oblique images work); returns the new array (a view) and its affine.
    """
    unit = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    wanted = [_CODES[c] for c in codes.upper()]
    # best assignment target axis t <- source axis order[t]
    order = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(abs(unit[wanted[t][0], perm[t]]) for t in range(3)),
    )
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
    """Reorient, resample and normalise ``volume`` as the card's network expects."""
    array_ijk = volume.array.transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    array, affine = reorient(array_ijk, volume.affine, card.orientation)
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine)
    )
    resampled = Spacing(pixdim=card.spacing, mode="bilinear", padding_mode="border")(image)
    norm = card.normalization
    if norm.kind == "window":
        transform = ScaleIntensityRange(norm.low, norm.high, 0.0, 1.0, clip=True)
    else:
        transform = NormalizeIntensity(subtrahend=norm.mean, divisor=norm.std)
    normalised = transform(resampled)
    new_affine = np.asarray(resampled.affine, dtype=float)
    tensor = torch.as_tensor(
        normalised.as_tensor() if isinstance(normalised, MetaTensor) else normalised
    )
    return NetworkInput(tensor[None].float().contiguous(), new_affine)


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
    """Probabilities back onto the image grid, slab by slab, as an int8 argmax label map."""
    probabilities = torch.softmax(logits.float(), dim=1)  # (1, C, i', j', k'), small
    size = np.asarray(probabilities.shape[2:], dtype=float)  # i', j', k'
    # image voxel (i, j, k) -> network index (i', j', k')
    mapping = np.linalg.inv(network_affine) @ volume.affine
    depth, rows, cols = volume.shape
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # (rows, cols)
    labels = np.empty(volume.shape, dtype=np.int8)
    # grid_sample wants (x, y, z) = (W, H, D) = (k', j', i') normalised to [-1, 1]
    scale = 2.0 / np.maximum(size - 1, 1)
    for k0 in range(0, depth, SLAB):
        k1 = min(depth, k0 + SLAB)
        kk = np.arange(k0, k1, dtype=float)[:, None, None]
        index = (
            mapping[:3, 0, None, None, None] * ii
            + mapping[:3, 1, None, None, None] * jj
            + mapping[:3, 2, None, None, None] * kk
            + mapping[:3, 3, None, None, None]
        )  # (3, slab, rows, cols): i', j', k'
        normalised = index * scale[:, None, None, None] - 1.0
        grid = torch.from_numpy(normalised[::-1].transpose(1, 2, 3, 0).astype(np.float32))[None]
        sampled = torch.nn.functional.grid_sample(
            probabilities, grid, mode="bilinear", padding_mode="border", align_corners=True
        )  # (1, C, slab, rows, cols)
        labels[k0:k1] = sampled[0].argmax(dim=0).to(torch.int8).numpy()
    return labels


def postprocess(labels: np.ndarray, card: ModelCard) -> np.ndarray:
    """Per-label options of the card: largest 3-D component, filled cavities (in place)."""
    tensor = torch.from_numpy(labels)[None]
    for index, spec in sorted(card.labels.items()):
        if spec.largest_component and (labels == index).any():
            mask = tensor == index
            kept = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False)(
                mask.to(torch.uint8)
            )
            labels[(mask & (torch.as_tensor(kept) == 0))[0].numpy()] = 0
        if spec.fill_holes and (labels == index).any():
            mask = (tensor == index).to(torch.uint8)
            filled = torch.as_tensor(FillHoles(applied_labels=[1])(mask)).bool()[0].numpy()
            labels[filled & (labels == 0)] = index  # cavities only: other labels stay
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
