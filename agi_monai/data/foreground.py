"""The foreground (head, or brain for skull-stripped data) of an MR volume."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["foreground_mask"]


def foreground_mask(volume: np.ndarray, threshold: float = 0.05, slice_axis: int = -1) -> np.ndarray:
    """Boolean foreground of a 3D volume: voxels above ``threshold`` x its 99th percentile, the largest
    connected component, holes filled slice by slice.

    The threshold sits above background noise yet below dark tissue (CSF on T1, FLAIR); for skull-stripped
    data, whose background is 0, the result is the brain. MONAI's Otsu-based ``ForegroundMask`` and
    ``KeepLargestConnectedComponent`` need scikit-image, which this project does not depend on, so
    SimpleITK does the morphology.

    Args:
        volume: the (X, Y, Z) intensities.
        threshold: fraction of the 99th percentile above which a voxel is foreground.
        slice_axis: holes are filled in the slices across this axis (a head is open at the neck, so
            3D filling would leave its inside empty).
    """
    volume = np.asarray(volume, dtype=np.float32)
    binary = (volume > threshold * float(np.percentile(volume, 99))).astype(np.uint8)
    if not binary.any():
        return binary.astype(bool)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(binary)), sortByObjectSize=True)
    largest = np.moveaxis(sitk.GetArrayViewFromImage(components) == 1, slice_axis, 0)
    filled = np.stack(
        [
            sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(plane.astype(np.uint8))))
            for plane in largest
        ]
    )
    return np.moveaxis(filled > 0, 0, slice_axis)
