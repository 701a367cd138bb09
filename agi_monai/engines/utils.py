"""Batch preparation for synthesis engines: items carry the stacked inputs and the target contrast."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import convert_to_tensor

__all__ = ["SynthesisPrepareBatch"]


class SynthesisPrepareBatch(PrepareBatch):
    """Returns ``(image, target)`` of a dict batch on ``device``, as plain tensors.

    MONAI's ``default_prepare_batch`` reads ``"image"`` and ``"label"``; synthesis items name the contrast to
    synthesize ``"target"`` (see :func:`agi_monai.data.build_slice_dataset`). The slices' MetaTensor metadata
    is dropped because 2D training slices carry none worth tracking, and tracking it costs time in every layer.

    Args:
        image_key: key of the stacked input contrasts, (B, C, H, W).
        target_key: key of the contrast to synthesize, (B, 1, H, W).
    """

    def __init__(self, image_key: str = "image", target_key: str = "target") -> None:
        self.image_key = image_key
        self.target_key = target_key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``kwargs`` go to ``Tensor.to`` (e.g. ``memory_format=torch.channels_last``)."""
        if not isinstance(batchdata, dict):
            raise TypeError(f"SynthesisPrepareBatch: expected a dict batch, got {type(batchdata).__name__}")
        for key in (self.image_key, self.target_key):
            if key not in batchdata:
                raise KeyError(f"SynthesisPrepareBatch: the batch has no {key!r} (keys: {sorted(batchdata)})")
        return tuple(  # type: ignore[return-value]
            convert_to_tensor(batchdata[key], track_meta=False).to(device=device, non_blocking=non_blocking, **kwargs)
            for key in (self.image_key, self.target_key)
        )
