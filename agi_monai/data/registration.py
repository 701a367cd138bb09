"""Rigid registration of one contrast onto another of the same subject (SimpleITK, Mattes mutual
information), resampling onto the reference grid, and the checks that catch images that are not of
the same subject or lie beyond what a rigid registration can recover.

Transforms follow ITK's convention: they map a point of the reference (fixed) image to the matching
point of the moving image, in LPS world coordinates (mm). :meth:`RigidRegistration.matrix_ras` gives
the same map as a 4x4 matrix in the RAS world of NIfTI/MONAI affines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from agi_monai.data.errors import DataError
from agi_monai.data.foreground import foreground_mask

__all__ = [
    "RigidRegistration",
    "register_rigid",
    "resample_to_reference",
    "coverage_mask",
    "normalized_mutual_information",
    "field_of_view_overlap",
    "same_grid",
    "same_voxel_centres",
]

_RAS_FROM_LPS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


@dataclass(frozen=True)
class RigidRegistration:
    """The result of :func:`register_rigid`.

    Attributes:
        transform: Euler transform mapping reference (fixed) LPS points to moving LPS points.
        metric: final Mattes mutual information (negative; lower is better).
        iterations: optimizer iterations at the last resolution level.
    """

    transform: sitk.Euler3DTransform
    metric: float
    iterations: int

    @property
    def matrix_lps(self) -> np.ndarray:
        """4x4 homogeneous matrix of :attr:`transform` (LPS, mm)."""
        return _affine_matrix(self.transform)

    @property
    def matrix_ras(self) -> np.ndarray:
        """4x4 matrix mapping reference RAS world points to moving RAS world points (mm)."""
        return _RAS_FROM_LPS_4 @ self.matrix_lps @ _RAS_FROM_LPS_4

    @property
    def rotation_deg(self) -> float:
        """Total rotation angle in degrees."""
        rotation = self.matrix_lps[:3, :3]
        return math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))

    @property
    def translation_mm(self) -> float:
        """Displacement (mm) of the rotation centre, i.e. of the reference image's centre."""
        centre = np.asarray(self.transform.GetCenter())
        return float(np.linalg.norm(np.asarray(self.transform.TransformPoint(tuple(centre))) - centre))


def register_rigid(
    reference: sitk.Image,
    moving: sitk.Image,
    *,
    sampling_fraction: float = 0.1,
    iterations: int = 100,
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_sigmas_mm: Sequence[float] = (2.0, 1.0, 0.0),
    histogram_bins: int = 32,
    seed: int = 1,
    max_translation_mm: float = 50.0,
    max_rotation_deg: float = 30.0,
    min_overlap: float = 0.25,
    min_foreground_dice: float = 0.85,
    moving_name: str = "moving image",
) -> RigidRegistration:
    """Rigidly register ``moving`` onto ``reference`` (two contrasts of one subject).

    Starts from the header alignment (identity in world coordinates; rotation centre at the reference
    centre) and refines it with Mattes mutual information, a multi-resolution pyramid and a regular-step
    gradient descent whose scales come from physical shifts, so that millimetres and radians are
    balanced. The sampling is random with a fixed ``seed``: the result is reproducible.

    Args:
        reference: the fixed image, whose grid the moving one will be resampled onto.
        moving: the image to align.
        sampling_fraction: share of reference voxels sampled for the metric at each level.
        iterations: maximum optimizer iterations per level.
        shrink_factors: downsampling per pyramid level, coarse to fine.
        smoothing_sigmas_mm: Gaussian smoothing per level, in mm.
        histogram_bins: Mattes mutual-information histogram bins.
        seed: seed of the metric's random sampling; not 0, which SimpleITK reads as "seed from the wall clock"
            (``sitk.sitkWallClock``), so that every run sampled other voxels and registered differently.
        max_translation_mm: larger displacements of the reference centre are rejected.
        max_rotation_deg: larger rotations are rejected.
        min_overlap: the two fields of view must overlap by at least this share of the smaller one.
        min_foreground_dice: after registration the head (or brain) masks must agree at least this well
            inside the common field of view; lower means a different subject, body part or head size
            (measured: 0.98 for contrasts of one subject, 0.69 for a head scaled by 1.3).
        moving_name: how errors name the moving image (its file).

    Raises:
        DataError: naming ``moving_name``, when the fields of view barely overlap, or the recovered motion
            or the final foreground agreement is beyond the range of one subject's scans.
    """
    overlap = field_of_view_overlap(reference, moving)
    if overlap < min_overlap:
        raise DataError(
            moving_name,
            f"overlaps the reference field of view by only {overlap:.0%} (header geometry)",
            f"contrasts of one subject overlapping by at least {min_overlap:.0%}",
        )
    fixed = sitk.Cast(reference, sitk.sitkFloat32)
    moving_float = sitk.Cast(moving, sitk.sitkFloat32)
    initial = sitk.Euler3DTransform()
    initial.SetCenter(_centre(fixed))

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    if seed == sitk.sitkWallClock:
        raise ValueError(f"seed={seed} is SimpleITK's 'wall clock' seed (a different sampling every run); expected a nonzero seed")
    method.SetMetricSamplingPercentage(sampling_fraction, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.5
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(smoothing_sigmas_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed, moving_float)

    result = RigidRegistration(initial, float(method.GetMetricValue()), int(method.GetOptimizerIteration()))
    if result.rotation_deg > max_rotation_deg or result.translation_mm > max_translation_mm:
        raise DataError(
            moving_name,
            f"registration needed {result.rotation_deg:.1f} deg and {result.translation_mm:.1f} mm",
            f"scans of one subject within {max_rotation_deg:g} deg and {max_translation_mm:g} mm",
        )
    dice = _foreground_dice(fixed, resample_to_reference(moving_float, fixed, result.transform), moving_float, result)
    if dice < min_foreground_dice:
        raise DataError(
            moving_name,
            f"its head/brain mask matches the reference only with Dice {dice:.2f} after registration "
            "(a different subject, body part or size?)",
            f"Dice >= {min_foreground_dice:g}",
        )
    return result


def resample_to_reference(
    moving: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform | None = None,
    interpolation: str = "linear",
) -> sitk.Image:
    """``moving`` resampled onto the grid of ``reference`` through ``transform`` (header alignment when None);
    voxels outside ``moving``'s field of view are 0. ``interpolation``: ``"linear"`` or ``"nearest"`` (labels)."""
    transform = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(moving, reference, transform, _INTERPOLATORS[interpolation], 0.0, moving.GetPixelID())


def coverage_mask(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """Where ``moving`` has data on the grid of ``reference``: 1 at the reference voxels whose centre ``transform``
    (header alignment when None) maps inside ``moving``'s field of view, 0 elsewhere (UInt8, the reference's grid).

    The coverage comes from the geometry, never from the intensities (a scan has zeros inside its field of view
    too): an image of ones resampled exactly as :func:`resample_to_reference` resamples ``moving``, whose zero
    default value marks the voxels it filled for lack of data. Nearest and linear interpolation take the same
    voxels as inside (ITK's continuous-index buffer test), so this is the coverage of either."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    return resample_to_reference(ones, reference, transform, "nearest")


def normalized_mutual_information(
    first: np.ndarray, second: np.ndarray, mask: np.ndarray | None = None, bins: int = 64
) -> float:
    """Studholme's normalized mutual information (H(A) + H(B)) / H(A, B) of two images on one grid.

    1 for independent images, 2 for identical ones. ``mask`` restricts it to some voxels (e.g. the
    common field of view).
    """
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if mask is not None:
        first, second = first[mask], second[mask]
    joint, _, _ = np.histogram2d(first.ravel(), second.ravel(), bins=bins)
    joint /= joint.sum()

    def entropy(probabilities: np.ndarray) -> float:
        nonzero = probabilities[probabilities > 0]
        return float(-(nonzero * np.log(nonzero)).sum())

    return (entropy(joint.sum(axis=1)) + entropy(joint.sum(axis=0))) / entropy(joint)


def field_of_view_overlap(first: sitk.Image, second: sitk.Image) -> float:
    """Volume of the intersection of the two images' world bounding boxes, over the smaller box's volume."""
    low_a, high_a = _bounding_box(first)
    low_b, high_b = _bounding_box(second)
    intersection = np.prod(np.clip(np.minimum(high_a, high_b) - np.maximum(low_a, low_b), 0.0, None))
    smaller = min(np.prod(high_a - low_a), np.prod(high_b - low_b))
    return float(intersection / smaller) if smaller > 0 else 0.0


def same_grid(first: sitk.Image, second: sitk.Image, tolerance_mm: float = 1e-3) -> bool:
    """Whether two images share size, spacing, origin and direction (so no resampling is needed)."""
    return (
        first.GetSize() == second.GetSize()
        and np.allclose(first.GetSpacing(), second.GetSpacing(), atol=tolerance_mm)
        and np.allclose(first.GetOrigin(), second.GetOrigin(), atol=tolerance_mm)
        and np.allclose(first.GetDirection(), second.GetDirection(), atol=1e-6)
    )


def same_voxel_centres(first: sitk.Image, second: sitk.Image, tolerance_mm: float = 1e-3) -> bool:
    """Whether two images hold the same voxel centres, in any storage order: each axis of one runs along an axis of
    the other (either way) with the same spacing and size, and their fields of view coincide. True for one volume
    saved in RAS and in LPS order, or axial and sagittal (:func:`same_grid` is the case of the same order). Resampling
    one onto the other by the headers then moves no voxel: it only reorders them."""
    if first.GetDimension() != second.GetDimension():
        return False
    dimension = first.GetDimension()
    directions = [np.asarray(image.GetDirection(), dtype=float).reshape(dimension, dimension) for image in (first, second)]
    for axis in range(dimension):
        alignment = np.abs(directions[0][:, axis] @ directions[1])  # |cos| with each axis of the other
        other = int(np.argmax(alignment))
        if (
            alignment[other] < 1 - 1e-6
            or first.GetSize()[axis] != second.GetSize()[other]
            or abs(first.GetSpacing()[axis] - second.GetSpacing()[other]) > tolerance_mm
        ):
            return False
    (low_a, high_a), (low_b, high_b) = _bounding_box(first), _bounding_box(second)
    return bool(np.allclose(low_a, low_b, atol=tolerance_mm) and np.allclose(high_a, high_b, atol=tolerance_mm))


def _centre(image: sitk.Image) -> tuple[float, ...]:
    return image.TransformContinuousIndexToPhysicalPoint([(size - 1) / 2.0 for size in image.GetSize()])


def _bounding_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    size = image.GetSize()
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint(
                [(-0.5 if bit == 0 else n - 0.5) for bit, n in zip(bits, size)]
            )
            for bits in np.ndindex(2, 2, 2)
        ]
    )
    return corners.min(axis=0), corners.max(axis=0)


def _affine_matrix(transform: sitk.Euler3DTransform) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    matrix[:3, 3] = np.asarray(transform.GetTranslation()) + centre - matrix[:3, :3] @ centre
    return matrix


def _foreground_dice(
    reference: sitk.Image, resampled: sitk.Image, moving: sitk.Image, registration: RigidRegistration
) -> float:
    """Dice of the foregrounds of the reference and the resampled moving image, counted only where the
    moving image had data (a scan covering less of the head is not penalised)."""
    covered = sitk.GetArrayViewFromImage(coverage_mask(moving, reference, registration.transform)) > 0
    # SimpleITK arrays are (z, y, x): fill holes in the planes of the reference's slices
    first, second = (
        foreground_mask(sitk.GetArrayViewFromImage(image), slice_axis=0) & covered for image in (reference, resampled)
    )
    total = first.sum() + second.sum()
    return float(2.0 * (first & second).sum() / total) if total else 0.0
