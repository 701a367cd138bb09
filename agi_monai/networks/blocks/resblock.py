"""DPIR's residual block: z + conv(relu(conv(z))), bias-free, channel count preserved."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from agi_monai.networks.blocks.cagr import CAGR

__all__ = ["ResBlock"]


class ResBlock(nn.Module):
    """Residual block of DPIR's UNetRes, optionally with a CAGR as its first convolution (AGI-Net).

    Args:
        spatial_dims: 2 or 3.
        channels: input and output channels.
        kernel_size: size of both convolutions (same padding).
        cagr: replace the first convolution by :class:`CAGR` (AGI-Net's stages).
        groups: CAGR's channel groups n (used when ``cagr``).
        attention: CAGR's Cross Group Attention flag (used when ``cagr``).
        rolling: CAGR's Group-wise Rolling flag (used when ``cagr``).
        portable: CAGR computes the roll with the pure-PyTorch reference (used when ``cagr``).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        kernel_size: int = 3,
        cagr: bool = False,
        groups: int = 8,
        attention: bool = True,
        rolling: bool = True,
        portable: bool = False,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.conv1: nn.Module
        if cagr:
            self.conv1 = CAGR(
                spatial_dims, channels, channels, kernel_size, groups=groups, attention=attention, rolling=rolling,
                portable=portable,
            )
        else:
            self.conv1 = conv(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = conv(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))
