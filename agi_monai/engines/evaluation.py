"""Validation and evaluation of a synthesis generator: PSNR, SSIM and MAE of [0, 1] slices (METHOD §4, the
paper's 2D per-slice protocol: each slice's metric over the whole slice, averaged over slices)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.handlers import IgniteMetricHandler, MeanAbsoluteError, PeakSignalToNoiseRatio, from_engine
from monai.inferers import Inferer, SimpleInferer
from monai.metrics import SSIMMetric
from monai.transforms import MapTransform, ScaleIntensityRanged
from monai.utils import CommonKeys as Keys
from monai.utils import MetricReduction
from torch import nn

from agi_monai.data.foreground import widened_span
from agi_monai.engines.utils import SynthesisPrepareBatch

__all__ = ["CropToMaskSlabd", "StructuralSimilarityIndex", "clip_prediction", "synthesis_evaluator", "synthesis_metrics"]


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


def synthesis_metrics(
    data_range: float = 1.0,
    spatial_dims: int = 2,
    output_transform: Callable | None = None,
    save_details: bool = True,
) -> dict[str, IgniteMetricHandler]:
    """``{"psnr": ..., "ssim": ..., "mae": ...}`` metric handlers (PSNR first: the key metric for the best model).

    Values are as MONAI computes them: PSNR in dB with ``max_val = data_range``, SSIM in [0, 1], MAE in image
    units; the paper reports SSIM in % and MAE ×100.

    Args:
        data_range: the images' value range (1.0: predictions clipped to [0, 1], targets in [0, 1]).
        spatial_dims: 2 for slices, 3 for volumes.
        output_transform: extracts ``(pred, target)`` from the engine output; default
            ``from_engine(["pred", "label"])``, the keys of ``SupervisedEvaluator``'s output.
        save_details: keep per-image values (for ``MetricsSaver``).
    """
    pairs = from_engine([Keys.PRED, Keys.LABEL]) if output_transform is None else output_transform
    return {
        "psnr": PeakSignalToNoiseRatio(max_val=data_range, output_transform=pairs, save_details=save_details),
        "ssim": StructuralSimilarityIndex(
            spatial_dims=spatial_dims, data_range=data_range, output_transform=pairs, save_details=save_details
        ),
        "mae": MeanAbsoluteError(output_transform=pairs, save_details=save_details),
    }


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


def synthesis_evaluator(
    device: str | torch.device,
    val_data_loader: Iterable,
    network: nn.Module,
    epoch_length: int | None = None,
    image_key: str = "image",
    target_key: str = "target",
    data_range: float = 1.0,
    clip_pred: bool = True,
    inferer: Inferer | None = None,
    val_handlers: Sequence | None = None,
    amp: bool = False,
    non_blocking: bool = False,
    save_details: bool = True,
    **evaluator_kwargs: Any,
) -> SupervisedEvaluator:
    """A ``monai.engines.SupervisedEvaluator`` of a synthesis generator with PSNR (key metric), SSIM and MAE.

    The same evaluator, written in a bundle config::

        "validate#evaluator": {
            "_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@validate#dataloader",
            "network": "@network", "inferer": {"_target_": "SimpleInferer"},
            "prepare_batch": {"_target_": "agi_monai.engines.SynthesisPrepareBatch"},
            "postprocessing": "$agi_monai.engines.clip_prediction()",
            "key_val_metric": {"val_psnr": {"_target_": "PeakSignalToNoiseRatio", "max_val": 1.0,
                                            "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "additional_metrics": {
                "val_ssim": {"_target_": "agi_monai.engines.StructuralSimilarityIndex", "spatial_dims": 2,
                             "data_range": 1.0, "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"},
                "val_mae": {"_target_": "MeanAbsoluteError",
                            "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "val_handlers": "@validate#handlers"}

    The output holds ``image``, ``label`` (the target contrast) and ``pred``, MONAI's evaluator keys.

    Args:
        device: where batches go; ``network`` must be there.
        val_data_loader: yields dict batches with ``image_key`` and ``target_key``.
        network: the generator.
        epoch_length: iterations per evaluation, default ``len(val_data_loader)``.
        image_key: batch key of the stacked inputs.
        target_key: batch key of the real contrast.
        data_range: value range of the images for PSNR and SSIM.
        clip_pred: clip predictions to ``[0, data_range]`` before the metrics (the generator has no output
            activation; synthesized images are used clipped).
        inferer: forward method, default ``SimpleInferer()`` (2D slices fit whole).
        val_handlers: handlers to attach (``StatsHandler``, ``CheckpointSaver`` of the best model, ``MetricsSaver``...).
        amp: mixed-precision inference on CUDA (ignored elsewhere).
        non_blocking: asynchronous host-to-device copies.
        save_details: keep per-image metric values (for ``MetricsSaver``).
        evaluator_kwargs: further ``SupervisedEvaluator`` arguments (``decollate``, ``to_kwargs``...).
    """
    device = torch.device(device)
    metrics = synthesis_metrics(data_range=data_range, save_details=save_details)
    key_name = next(iter(metrics))
    return SupervisedEvaluator(
        device=device,
        val_data_loader=val_data_loader,
        network=network,
        epoch_length=epoch_length,
        non_blocking=non_blocking,
        prepare_batch=SynthesisPrepareBatch(image_key, target_key),
        inferer=SimpleInferer() if inferer is None else inferer,
        postprocessing=clip_prediction(high=data_range) if clip_pred else None,
        key_val_metric={key_name: metrics.pop(key_name)},
        additional_metrics=metrics,
        val_handlers=val_handlers,
        amp=amp and device.type == "cuda",
        **evaluator_kwargs,
    )
