"""The field-of-view overlap that registration checks first (``min_overlap``) is the overlap of the images' extents,
voxel edges included (a voxel of an image covers its spacing about its centre), by hand: taking the boxes of the voxel
centres instead would give a thin slab no extent at all along its normal, an overlap of 0, and every slab would be
refused as "overlapping the reference field of view by only 0%"."""

from __future__ import annotations

import pytest
import SimpleITK as sitk

from agi_monai.data import field_of_view_overlap


def _image(size, spacing, origin) -> sitk.Image:
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_overlap_of_shifted_grids_by_hand():
    # 10 x 10 x 10 voxels of 2 mm: 20 mm boxes from -1 to 19 mm (centres 0 ... 18); shifted by 5 mm along x and 10 mm
    # along z: intersection 15 x 20 x 10 mm of the 20 x 20 x 20 mm box
    first = _image((10, 10, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    second = _image((10, 10, 10), (2.0, 2.0, 2.0), (5.0, 0.0, 10.0))
    assert field_of_view_overlap(first, second) == pytest.approx(15 * 20 * 10 / 20**3)


def test_a_one_slice_slab_inside_a_volume_overlaps_it_wholly():
    volume = _image((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    slab = _image((20, 20, 1), (1.0, 1.0, 5.0), (10.0, 10.0, 20.0))  # 5 mm thick, 17.5 ... 22.5 mm
    assert field_of_view_overlap(volume, slab) == pytest.approx(1.0)
    assert field_of_view_overlap(slab, volume) == pytest.approx(1.0)
