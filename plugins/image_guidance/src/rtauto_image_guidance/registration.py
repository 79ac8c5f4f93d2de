"""Rigid (SimpleITK or itk-elastix) and deformable (SimpleITK demons) registration.

Direction: every transform here maps a point of the *fixed* (reference, e.g. planning CT)
image's patient coordinates to the corresponding point of the *moving* (e.g. daily) image's
patient coordinates, as ITK defines it. The REG object stores the inverse (moving -> fixed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk  # noqa: N813  (the library's usual name)

from rtauto.errors import StepFailed

__all__ = [
    "DeformableResult",
    "RigidResult",
    "RigidSettings",
    "affine_of",
    "body_mask",
    "deformable_register",
    "fov_overlap",
    "rigid_register",
    "rigid_register_elastix",
    "rotation_angle_deg",
]

Metric = Literal["mattes", "correlation", "mean_squares"]


@dataclass(frozen=True)
class RigidSettings:
    """How a rigid registration runs. The defaults suit CT/CBCT and MR of the head and body."""

    metric: Metric = "mattes"
    histogram_bins: int = 48
    resolution_mm: float = 1.5  # isotropic working resolution of the finest level
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    samples: int = 20000  # metric samples per iteration at every level
    iterations: int = 200
    max_step_mm: float = 2.0
    min_step_mm: float = 0.001
    margin_mm: float = 20.0  # the fixed image is cropped to the moving field of view plus this
    body_mask: bool = True  # restrict the metric to the patient in the fixed image
    body_threshold: float | None = None  # patient = voxels above this (e.g. -400 HU); Otsu if None
    seed: int = 17


@dataclass
class RigidResult:
    """A rigid registration and its quality figures (AAPM TG-132)."""

    transform: sitk.Euler3DTransform  # fixed patient coordinates -> moving patient coordinates
    metric_before: dict[str, float]  # similarity() at the initial alignment
    metric_after: dict[str, float]
    overlap: float  # fraction of the moving field of view inside the fixed image, registered
    elapsed_s: float
    iterations: list[int] = field(default_factory=list)
    inverse_consistency_mm: float | None = None

    @property
    def fixed_to_moving(self) -> np.ndarray:
        return affine_of(self.transform)

    @property
    def moving_to_fixed(self) -> np.ndarray:
        return np.linalg.inv(affine_of(self.transform))


@dataclass
class DeformableResult:
    """A deformable registration sampled as a displacement field on a grid of the fixed image."""

    rigid: RigidResult
    transform: sitk.Transform  # fixed -> moving, rigid and demons field composed
    field: sitk.Image  # vector image, displacement (mm) fixed point -> moving point
    metric_before: dict[str, float]  # similarity() at the rigid result
    metric_after: dict[str, float]
    jacobian_min: float
    jacobian_max: float
    elapsed_s: float


def affine_of(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 homogeneous matrix of a linear (rigid/affine) SimpleITK transform."""
    # Euler3D/Versor/Affine all expose matrix, center and translation
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)  # type: ignore[attr-defined]
    center = np.array(transform.GetCenter())  # type: ignore[attr-defined]
    translation = np.array(transform.GetTranslation())  # type: ignore[attr-defined]
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = translation + center - matrix @ center
    return affine


def _physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    size = np.array(image.GetSize())
    corners = [
        image.TransformContinuousIndexToPhysicalPoint(
            [float(c) for c in np.array(ijk) * (size - 1)]
        )
        for ijk in np.ndindex(2, 2, 2)
    ]
    pts = np.array(corners)
    return pts.min(axis=0), pts.max(axis=0)


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array(
        [[(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]] for a, b, c in np.ndindex(2, 2, 2)]
    )


def _inside(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    index = (points - origin) @ direction / spacing
    size = np.array(image.GetSize())
    return np.all((index >= -0.5) & (index <= size - 0.5), axis=1)


def _grid_points(image: sitk.Image, count: int = 12) -> np.ndarray:
    size = np.array(image.GetSize())
    axes = [np.linspace(0, s - 1, min(count, s)) for s in size]
    ii, jj, kk = np.meshgrid(*axes, indexing="ij")
    index = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    return np.array(image.GetOrigin()) + (index * spacing) @ direction.T


def fov_overlap(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: np.ndarray) -> float:
    """Fraction of the moving image's field of view that lies inside the fixed image."""
    points = _grid_points(moving)
    moving_to_fixed = np.linalg.inv(fixed_to_moving)
    mapped = points @ moving_to_fixed[:3, :3].T + moving_to_fixed[:3, 3]
    return float(_inside(fixed, mapped).mean())


def _resample_isotropic(image: sitk.Image, spacing: float, box: tuple | None = None) -> sitk.Image:
    """Resample on an isotropic grid along the image's own axes (optionally cropped to a box)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    old_spacing = np.array(image.GetSpacing())
    size = np.array(image.GetSize())
    lo_idx = np.zeros(3)
    hi_idx = size - 1.0
    if box is not None:
        # box corners in this image's continuous index space
        lo, hi = box
        corners = _box_corners(lo, hi)
        idx = (corners - np.array(image.GetOrigin())) @ direction / old_spacing
        lo_idx = np.maximum(lo_idx, idx.min(axis=0))
        hi_idx = np.minimum(hi_idx, idx.max(axis=0))
        if np.any(hi_idx <= lo_idx):
            raise StepFailed("the moving image does not overlap the reference image")
    new_spacing = np.full(3, spacing)
    extent = (hi_idx - lo_idx) * old_spacing
    new_size = np.maximum(np.floor(extent / new_spacing).astype(int) + 1, 1)
    origin = np.array(image.GetOrigin()) + direction @ (lo_idx * old_spacing)
    # crop to the region first (two voxels of margin), then average whole voxel blocks down
    # towards the working resolution: anti-aliasing at the cost of one pass
    start = np.maximum(np.floor(lo_idx).astype(int) - 2, 0)
    stop = np.minimum(np.ceil(hi_idx).astype(int) + 3, size)
    source = sitk.RegionOfInterest(image, [int(v) for v in stop - start], [int(v) for v in start])
    factors = [max(1, int(spacing / s)) for s in old_spacing]
    if max(factors) > 1:
        source = sitk.BinShrink(source, factors)
    return sitk.Resample(
        source,
        [int(v) for v in new_size],
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(float(v) for v in origin),
        tuple(float(v) for v in new_spacing),
        image.GetDirection(),
        float(np.min(sitk.GetArrayViewFromImage(source))),
        sitk.sitkFloat32,
    )


def similarity(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    mask: sitk.Image | None = None,
    shrink: int = 2,
) -> dict[str, float]:
    """Normalized mutual information and correlation of ``fixed`` and the resampled ``moving``.

    Computed over the fixed voxels (every ``shrink``-th along each axis) that map inside the
    moving image and, when given, inside ``mask``: the TG-132 similarity figures.
    """
    grid = sitk.BinShrink(fixed, [shrink] * 3) if shrink > 1 else fixed
    resampled = sitk.Resample(moving, grid, transform, sitk.sitkLinear, np.nan, sitk.sitkFloat32)
    a = sitk.GetArrayViewFromImage(grid).ravel()
    b = sitk.GetArrayViewFromImage(resampled).ravel()
    valid = np.isfinite(b)
    if mask is not None:
        mask_grid = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        valid &= sitk.GetArrayViewFromImage(mask_grid).ravel() > 0
    a, b = a[valid], b[valid]
    if a.size < 100:
        return {"nmi": float("nan"), "ncc": float("nan"), "voxels": int(a.size)}
    hist, _, _ = np.histogram2d(a, b, bins=48)
    p = hist / hist.sum()
    px, py = p.sum(axis=1), p.sum(axis=0)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    nmi = (entropy(px) + entropy(py)) / entropy(p.ravel())
    ncc = float(np.corrcoef(a, b)[0, 1])
    return {"nmi": float(nmi), "ncc": ncc, "voxels": int(a.size)}


def body_mask(image: sitk.Image, threshold: float | None = None) -> sitk.Image:
    """A mask of the patient: above ``threshold`` (Otsu when None), largest component, filled."""
    if threshold is None:
        mask = sitk.OtsuThreshold(image, 0, 1)
    else:
        mask = sitk.BinaryThreshold(image, lowerThreshold=threshold, upperThreshold=1e9)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.Cast(sitk.BinaryThreshold(components, 1, 1), sitk.sitkUInt8)


def _method(
    settings: RigidSettings, fixed: sitk.Image, levels: slice = slice(None)
) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    if settings.metric == "mattes":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    elif settings.metric == "correlation":
        method.SetMetricAsCorrelation()
    else:
        method.SetMetricAsMeanSquares()
    shrinks = list(settings.shrink_factors)[levels]
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(
        [min(1.0, settings.samples * s**3 / float(np.prod(fixed.GetSize()))) for s in shrinks],
        settings.seed,
    )
    # gradients from the interpolator: cheaper than gradient images for a few samples
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.max_step_mm,
        minStep=settings.min_step_mm,
        numberOfIterations=settings.iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrinks)
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas)[levels])
    method.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
    return method


def _prepare(
    fixed: sitk.Image, moving: sitk.Image, initial: np.ndarray, settings: RigidSettings
) -> tuple[sitk.Image, sitk.Image]:
    # crop the fixed image to the moving field of view (mapped by the initial transform)
    inverse = np.linalg.inv(initial)
    lo, hi = _physical_box(moving)
    corners = _box_corners(lo, hi)
    mapped = corners @ inverse[:3, :3].T + inverse[:3, 3]
    box = (mapped.min(axis=0) - settings.margin_mm, mapped.max(axis=0) + settings.margin_mm)
    fixed_work = _resample_isotropic(fixed, settings.resolution_mm, box)
    moving_work = _resample_isotropic(moving, settings.resolution_mm)
    return fixed_work, moving_work


def _euler(center: np.ndarray, initial: np.ndarray) -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(v) for v in center))
    transform.SetMatrix(tuple(float(v) for v in initial[:3, :3].ravel()))
    # translation so that the transform equals ``initial`` about ``center``
    translation = initial[:3, 3] + initial[:3, :3] @ center - center
    transform.SetTranslation(tuple(float(v) for v in translation))
    return transform


def rigid_register(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    settings: RigidSettings | None = None,
    center: np.ndarray | None = None,
    initial: np.ndarray | None = None,
    min_overlap: float = 0.3,
    inverse_consistency: bool = True,
    check_points: np.ndarray | None = None,
    backend: Literal["simpleitk", "elastix"] = "simpleitk",
) -> RigidResult:
    """Register ``moving`` to ``fixed`` rigidly (6 DoF), multi-resolution.

    ``initial`` (4x4, fixed -> moving) defaults to the identity: both images in nominally the
    same patient coordinates, as a daily image and its planning CT are. ``center`` is the
    centre of rotation (default: the moving image's centre). Raises :class:`StepFailed` when
    less than ``min_overlap`` of the moving field of view lies in the fixed image, before or
    after registration. ``inverse_consistency`` registers the other way round as well (from the
    inverse of the result, finest levels only) and reports the largest discrepancy at
    ``check_points`` (default: corners of a 10 cm cube around ``center``). ``backend``
    ``elastix`` runs itk-elastix's default rigid registration on the same prepared images.
    """
    settings = settings or RigidSettings()
    start = time.perf_counter()
    initial = np.eye(4) if initial is None else np.asarray(initial, float)
    if center is None:
        lo, hi = _physical_box(moving)
        center = np.linalg.inv(initial)[:3, :3] @ ((lo + hi) / 2) + np.linalg.inv(initial)[:3, 3]
    center = np.asarray(center, float)
    before_overlap = fov_overlap(fixed, moving, initial)
    if before_overlap < min_overlap:
        raise StepFailed(
            f"the moving image overlaps the reference image by {before_overlap:.0%} of its field "
            f"of view (minimum {min_overlap:.0%}): not the same anatomy or position"
        )
    fixed_work, moving_work = _prepare(fixed, moving, initial, settings)
    method = _method(settings, fixed_work)
    mask: sitk.Image | None = None
    if settings.body_mask:
        mask = body_mask(fixed_work, settings.body_threshold)
    if mask is not None and sitk.GetArrayViewFromImage(mask).any():
        method.SetMetricFixedMask(mask)
    else:
        mask = None
    transform = _euler(center, initial)
    method.SetInitialTransform(transform, inPlace=True)
    metric_before = similarity(fixed_work, moving_work, transform, mask)
    iterations: list[int] = []
    if backend == "elastix":
        # elastix starts from its own default (image centres aligned, identity rotation)
        matrix, _ = rigid_register_elastix(fixed_work, moving_work)
        transform = _euler(center, matrix)
    else:
        method.AddCommand(
            sitk.sitkMultiResolutionIterationEvent,
            lambda: iterations.append(method.GetOptimizerIteration()),
        )
        try:
            method.Execute(fixed_work, moving_work)
        except RuntimeError as exc:
            raise StepFailed(f"registration did not converge: {exc}") from exc
        iterations.append(method.GetOptimizerIteration())
        iterations = iterations[1:]
    metric_after = similarity(fixed_work, moving_work, transform, mask)
    result_matrix = affine_of(transform)
    overlap = fov_overlap(fixed, moving, result_matrix)
    if overlap < min_overlap:
        raise StepFailed(
            f"after registration only {overlap:.0%} of the moving field of view lies in the "
            f"reference image (minimum {min_overlap:.0%})"
        )
    result = RigidResult(
        transform=transform,
        metric_before=metric_before,
        metric_after=metric_after,
        overlap=overlap,
        elapsed_s=0.0,
        iterations=iterations,
    )
    if inverse_consistency:
        points = check_points if check_points is not None else cube_corners(center, 100.0)
        result.inverse_consistency_mm = _inverse_consistency(
            fixed_work, moving_work, result_matrix, settings, points
        )
    result.elapsed_s = time.perf_counter() - start
    return result


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """The angle (degrees) of a 3x3 rotation, accurate for small angles too."""
    r = np.asarray(rotation, float)
    skew = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / 2
    return float(np.degrees(np.arctan2(np.linalg.norm(skew), (np.trace(r) - 1) / 2)))


def cube_corners(center: np.ndarray, edge_mm: float) -> np.ndarray:
    """The 8 corners of a cube of ``edge_mm`` centred on ``center``, shape (8, 3)."""
    half = edge_mm / 2.0
    offsets = np.array(
        [[x, y, z] for x in (-half, half) for y in (-half, half) for z in (-half, half)]
    )
    return np.asarray(center, float) + offsets


def _inverse_consistency(
    fixed_work: sitk.Image,
    moving_work: sitk.Image,
    forward: np.ndarray,
    settings: RigidSettings,
    points: np.ndarray,
) -> float:
    backward_initial = np.linalg.inv(forward)
    # the backward run starts from the forward answer, so the finest two levels suffice
    method = _method(settings, moving_work, slice(-2, None))
    lo, hi = _physical_box(moving_work)
    transform = _euler((lo + hi) / 2, backward_initial)
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(moving_work, fixed_work)
    backward = affine_of(transform)
    round_trip = backward @ forward
    moved = points @ round_trip[:3, :3].T + round_trip[:3, 3]
    return float(np.linalg.norm(moved - points, axis=1).max())


def rigid_register_elastix(fixed: sitk.Image, moving: sitk.Image) -> tuple[np.ndarray, float]:
    """itk-elastix's default rigid registration; returns (fixed -> moving 4x4, seconds)."""
    import itk

    start = time.perf_counter()
    fixed_itk = _to_itk(fixed)
    moving_itk = _to_itk(moving)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("rigid"))
    _, result = itk.elastix_registration_method(
        fixed_itk, moving_itk, parameter_object=parameters, log_to_console=False
    )
    transform_map = result.GetParameterMap(0)
    angles_translation = [float(v) for v in transform_map["TransformParameters"]]
    center = [float(v) for v in transform_map["CenterOfRotationPoint"]]
    euler = sitk.Euler3DTransform()
    euler.SetCenter(center)
    euler.SetRotation(*angles_translation[:3])
    euler.SetTranslation(angles_translation[3:])
    if transform_map.get("ComputeZYX", ["false"])[0] == "true":
        euler.SetComputeZYX(True)
    return affine_of(euler), time.perf_counter() - start


def _to_itk(image: sitk.Image):  # type: ignore[no-untyped-def]
    import itk

    array = sitk.GetArrayFromImage(image).astype(np.float32)
    out = itk.image_from_array(array)
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(np.array(image.GetDirection()).reshape(3, 3))
    return out


def deformable_register(
    fixed: sitk.Image,
    moving: sitk.Image,
    rigid: RigidResult,
    *,
    settings: RigidSettings | None = None,
    smoothing_mm: float = 3.0,
    field_spacing_mm: float = 4.0,
    iterations: int = 50,
    match_histograms: bool = True,
) -> DeformableResult:
    """Demons registration (symmetric forces) on top of ``rigid``, sampled as a displacement field.

    Suited to images of one modality (CT/CBCT, MR/MR of one sequence); ``match_histograms``
    maps the moving intensities onto the fixed ones first. ``smoothing_mm`` regularises the
    field (Gaussian, each iteration). The field covers the fixed image's part of the moving
    field of view on a grid of ``field_spacing_mm`` along the fixed image's axes, and holds the
    whole transform (rigid included): fixed point ``x`` lies at ``x + D(x)`` in the moving image.
    """
    settings = settings or RigidSettings()
    start = time.perf_counter()
    fixed_work, moving_work = _prepare(fixed, moving, rigid.fixed_to_moving, settings)
    background = float(np.min(sitk.GetArrayViewFromImage(moving_work)))
    moved = sitk.Resample(moving_work, fixed_work, rigid.transform, sitk.sitkLinear, background)
    if match_histograms:
        moved = sitk.HistogramMatching(moved, fixed_work, 256, 7, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(smoothing_mm / settings.resolution_mm)
    try:
        field = demons.Execute(fixed_work, moved)
    except RuntimeError as exc:
        raise StepFailed(f"deformable registration failed: {exc}") from exc
    local = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    # ITK composite transforms apply the last added first: rigid(x + d(x))
    composite = sitk.CompositeTransform([rigid.transform, local])
    metric_before = similarity(fixed_work, moving_work, rigid.transform)
    metric_after = similarity(fixed_work, moving_work, composite)
    spacing = [field_spacing_mm] * 3
    size = [
        max(2, int(sz * sp / field_spacing_mm) + 1)
        for sz, sp in zip(fixed_work.GetSize(), fixed_work.GetSpacing(), strict=True)
    ]
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    to_field.SetSize(size)
    to_field.SetOutputOrigin(fixed_work.GetOrigin())
    to_field.SetOutputSpacing(spacing)
    to_field.SetOutputDirection(fixed_work.GetDirection())
    displacement = to_field.Execute(composite)
    jacobian = sitk.GetArrayViewFromImage(sitk.DisplacementFieldJacobianDeterminant(displacement))
    # the filter leaves the outermost grid points at 0: only interior points have a Jacobian
    if min(jacobian.shape) > 2:
        jacobian = jacobian[1:-1, 1:-1, 1:-1]
    return DeformableResult(
        rigid=rigid,
        transform=composite,
        field=displacement,
        metric_before=metric_before,
        metric_after=metric_after,
        jacobian_min=float(jacobian.min()),
        jacobian_max=float(jacobian.max()),
        elapsed_s=time.perf_counter() - start,
    )
