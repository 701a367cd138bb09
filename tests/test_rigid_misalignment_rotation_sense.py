"""The rigid misalignment of the robustness sweep turns the content by the recorded angle about the recorded axis in
the right-handed sense, as SimpleITK's ``VersorTransform`` (axis, angle) does: an independent rotation, where the
other tests rebuild the matrix with the code's own ``_rotation_matrix``, so a rotation the other way round (the
recorded axis and angle then describing the inverse motion) would go unnoticed."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from agi_monai.evaluation.robustness import misalign


def _blob(shape, centre, spacing, sigma_mm) -> np.ndarray:
    grids = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    squared = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
    return np.exp(-squared / (2 * sigma_mm**2)).astype(np.float32)


def test_a_rigid_misalignment_turns_the_content_as_the_recorded_axis_and_angle_say():
    # a blob 15 mm off the centre: a 15 degree rotation moves it 3.9 mm, the opposite rotation 7.8 mm from there;
    # anisotropic voxels, and at least 4 sigma of room to every face (a blob cut by a face has its centroid off)
    shape, spacing = (64, 64, 36), np.array([1.0, 1.0, 2.0])
    centre = (np.array(shape) - 1) / 2
    point = centre + np.array([15.0, 0.0, 0.0]) / spacing
    blob = _blob(shape, point, spacing, sigma_mm=3.0)
    image = MetaTensor(torch.from_numpy(np.stack([blob, blob])), affine=torch.from_numpy(np.diag([*spacing, 1.0])))
    moved, record = misalign(image, "rigid", 15.0, channel=0, seed=3)

    versor = sitk.VersorTransform(tuple(record.rotation_axis), math.radians(record.rotation_deg))
    rotated = np.asarray(versor.TransformPoint(tuple((point - centre) * spacing)))  # mm about the volume centre
    expected_mm = rotated + np.asarray(record.displacement)
    weights = moved[0].numpy().astype(np.float64)
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centroid_mm = (np.array([(weights * g).sum() for g in grids]) / weights.sum() - centre) * spacing
    np.testing.assert_allclose(centroid_mm, expected_mm, atol=0.1)
