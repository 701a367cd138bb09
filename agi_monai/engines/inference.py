"""One case through a network for inference: the forward pass every synthesis path shares (folder synthesis, the
per-case evaluator, the Deploy operator, the downstream synthesizers), and axial slice-by-slice synthesis of a
volume as the bundles' ``inference.json`` runs it (the demo, the comparison, the robustness sweep)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from monai.inferers import SliceInferer
from monai.utils import convert_to_tensor

__all__ = ["default_slices_per_batch", "infer_case", "synthesize_volume"]


def default_slices_per_batch(device: torch.device) -> int:
    """Axial slices per forward pass for :func:`synthesize_volume`: 16 with CUDA; 2 on a CPU, where larger batches
    only cost cache (measured on one thread, 240x240 slices: batch 16 took 1.2-1.8x the time of batch 2 for
    AGI-Net and ResUNet at widths 8-64 and 16-128)."""
    return 16 if torch.device(device).type == "cuda" else 2


def infer_case(
    network: torch.nn.Module,
    inferer: Callable[[torch.Tensor, torch.nn.Module], Any],
    image: torch.Tensor,
    device: str | torch.device = "cpu",
    amp: bool = False,
    on_batch: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """``network`` in eval mode, without gradients, on one case's (C, spatial...) ``image``, through ``inferer``
    (e.g. a MONAI ``SliceInferer``) called with a batch of one on ``device``: the (C', spatial...) output as a
    plain float32 tensor on the CPU.

    A ``MetaTensor`` input loses its metadata first: tracking it costs time in every layer and nothing here needs
    it. ``amp`` autocasts (mixed precision) on ``device``'s type. ``on_batch`` is called with the size of every
    batch the inferer hands the network (a ``SliceInferer``'s: its number of slices), e.g. a progress bar's update.
    """
    network.eval()
    plain = convert_to_tensor(image, track_meta=False)
    autocast = torch.autocast(torch.device(device).type) if amp else nullcontext()
    forward: Callable[[torch.Tensor], Any] = network
    if on_batch is not None:
        def forward(batch: torch.Tensor) -> Any:
            output = network(batch)
            on_batch(batch.shape[0])
            return output
    with torch.inference_mode(), autocast:
        output = inferer(plain[None].to(device), forward)
    return convert_to_tensor(output, track_meta=False)[0].float().cpu()


def synthesize_volume(
    network: torch.nn.Module,
    volume: torch.Tensor,
    device: str | torch.device = "cpu",
    slices_per_batch: int = 16,
    amp: bool = False,
) -> torch.Tensor:
    """Axial slice-by-slice synthesis of a preprocessed (C, H, W, D) volume, as the bundles' ``inference.json``
    (MONAI ``SliceInferer``, no overlap; :func:`infer_case`): the (1, H, W, D) prediction clipped to [0, 1],
    float32 on the CPU. ``amp`` autocasts the network (mixed precision)."""
    inferer = SliceInferer(roi_size=volume.shape[1:3], sw_batch_size=slices_per_batch, spatial_dim=2, overlap=0.0)
    return infer_case(network, inferer, volume, device, amp).clamp(0.0, 1.0)
