"""Validation and evaluation of a synthesis generator: PSNR, SSIM and MAE of [0, 1] slices (METHOD §4, the
paper's 2D per-slice protocol: each slice's metric over the whole slice, averaged over slices)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import SSIMMetric
from monai.transforms import MapTransform, ScaleIntensityRanged
from monai.utils import CommonKeys as Keys
from monai.utils import MetricReduction

from agi_monai.data.foreground import widened_span

__all__ = ["CropToMaskSlabd", "StructuralSimilarityIndex", "clip_prediction"]


class StructuralSimilarityIndex(IgniteMetricHandler):
    """SSIM per image (Wang et al., IEEE TIP 2004), averaged over images: ``monai.metrics.SSIMMetric`` as an
    Ignite handler, shaped like ``monai.handlers.PeakSignalToNoiseRatio`` (MONAI 1.6 ships none for SSIM).

    Args:
        spatial_dims: 2 for slices, 3 for volumes.
        data_range: the images' value range (1.0 for [0, 1] images).
        kernel_type: ``"gaussian"`` or ``"uniform"`` window.
        win_size: window size (11, as Wang et al.).
        kernel_sigma: Gaussian window's standard deviation (1.5).
        k1: luminance stability constant (0.01).
        k2: contrast stability constant (0.03).
        reduction: how per-image values are reduced (see ``monai.metrics.SSIMMetric``).
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output``.
        save_details: keep per-image values in ``engine.state.metric_details`` (for ``MetricsSaver``).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        data_range: float = 1.0,
        kernel_type: str = "gaussian",
        win_size: int | Sequence[int] = 11,
        kernel_sigma: float | Sequence[float] = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = SSIMMetric(
            spatial_dims=spatial_dims, data_range=data_range, kernel_type=kernel_type, win_size=win_size,
            kernel_sigma=kernel_sigma, k1=k1, k2=k2, reduction=reduction,
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


def clip_prediction(pred_key: str = Keys.PRED, low: float = 0.0, high: float = 1.0) -> ScaleIntensityRanged:
    """Postprocessing clipping ``pred_key`` to ``[low, high]`` (the range the metrics assume) and nothing else:
    an identity intensity range with ``clip=True``, because MONAI has no plain clipping transform."""
    return ScaleIntensityRanged(keys=pred_key, a_min=low, a_max=high, b_min=low, b_max=high, clip=True)


class CropToMaskSlabd(MapTransform):
    """Postprocessing of a 3D validation (items (C, H, W, D)): cut ``keys`` to the axial slices where ``mask_key`` has
    foreground, widened where needed to ``min_slices`` (SSIM's window) inside the volume; whole volumes when the
    mask is empty. The mask leaves out the slices some contrast does not cover (``RestrictToCoveraged``
    of :mod:`agi_monai.data.transforms`), which the resampling zero-filled: measured, a partly covered case would be scored on
    them. It leaves out the air above and below the head too, as the 2D validation keeps only slices with
    foreground. (MONAI's ``CropForegroundd`` crops all axes and returns nothing for an empty mask.)

    Args:
        keys: the keys to cut, e.g. ``["pred", "label"]``.
        mask_key: the foreground mask, (1, H, W, D).
        min_slices: the fewest slices kept (SSIM's 3D window needs 11).
    """

    def __init__(self, keys: Sequence[str] = (Keys.PRED, Keys.LABEL), mask_key: str = "mask", min_slices: int = 11):
        super().__init__(keys)
        self.mask_key = mask_key
        self.min_slices = min_slices

    def __call__(self, data: Any) -> dict:
        item = dict(data)
        mask = torch.as_tensor(item[self.mask_key])
        depth = mask.shape[-1]
        slices = torch.nonzero(mask.reshape(-1, depth).any(dim=0)).flatten()
        if not len(slices):
            return item
        first, end = widened_span(int(slices[0]), int(slices[-1]) + 1, depth, self.min_slices)
        for key in self.key_iterator(item):
            item[key] = item[key][..., first:end]
        return item
