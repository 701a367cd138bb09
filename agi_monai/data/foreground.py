"""The foreground (head, or brain for skull-stripped data) of an MR volume, and the extent around it that a
measurement window needs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor

__all__ = ["foreground_mask", "inputs_foreground", "widened_span"]


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
    import SimpleITK as sitk  # here: the engines import widened_span, and need no SimpleITK

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


def inputs_foreground(image: Any, threshold: float = 0.05) -> np.ndarray:
    """:func:`foreground_mask` of the channel mean of ``image`` (C, X, Y, Z), or of ``image`` (X, Y, Z) itself: from
    the stacked inputs, the ``"mask"`` the bundles' preprocessing adds (:class:`agi_monai.data.AddForegroundMaskd`),
    so that training and inference see the same mask, and the mask the evaluation measures inside
    (:func:`agi_monai.evaluation.brain_mask`). A boolean (X, Y, Z)."""
    tensor = convert_to_tensor(image, track_meta=False).float()
    volume = tensor.mean(dim=0) if tensor.ndim == 4 else tensor
    return foreground_mask(volume.cpu().numpy(), threshold)


def widened_span(start: int, stop: int, size: int, minimum: int) -> tuple[int, int]:
    """``[start, stop)`` on an axis of ``size`` indices, widened about its centre to at least ``minimum`` indices (an
    SSIM window's) and shifted to stay on the axis; the whole axis when it holds fewer."""
    grow = max(minimum - (stop - start), 0)
    start = max(min(start - grow // 2, size - max(minimum, stop - start)), 0)
    return start, min(max(stop, start + minimum), size)
