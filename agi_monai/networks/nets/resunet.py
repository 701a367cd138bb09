"""ResUNet (DPIR's UNetRes) and AGI-Net, the same network with CAGR blocks in chosen stages."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from agi_monai.networks.blocks.resblock import ResBlock

__all__ = ["AGINet", "ResUNet", "STAGES"]

# Stage names of the paper's Table 9: three down stages, the body, three up stages ("up1" is the first
# up stage after the body, at the resolution of down3's input).
STAGES = ("down1", "down2", "down3", "body", "up1", "up2", "up3")


class ResUNet(nn.Module):
    """DPIR's UNetRes (Zhang et al., TPAMI 2021), the generator of the paper's pix2pix baseline.

    head conv → 3 × [ResBlocks, 2×2 stride-2 conv] → body ResBlocks → 3 × [+skip, 2×2 transposed
    conv, ResBlocks] → +skip → tail conv; all convolutions bias-free; each skip adds the input of a
    down stage's downsampling path back at the same resolution (DPIR's forward: up(x + skip)).

    Args:
        spatial_dims: 2 or 3.
        in_channels: stacked input contrasts.
        out_channels: synthesized contrasts (1).
        channels: widths of the four resolution levels.
        num_res_blocks: ResBlocks per stage.
        cagr_stages: stages (from ``STAGES``) whose ResBlocks start with a CAGR instead of a convolution.
        groups: CAGR's channel groups n.
        attention: CAGR's Cross Group Attention (ablation flag).
        rolling: CAGR's Group-wise Rolling (ablation flag).
        portable: CAGR computes the roll with the pure-PyTorch reference (extension-free TorchScript).

    Spatial sizes must be divisible by 8 (three 2× downsamplings).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512),
        num_res_blocks: int = 2,
        cagr_stages: Sequence[str] = (),
        groups: int = 8,
        attention: bool = True,
        rolling: bool = True,
        portable: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ResUNet: spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"ResUNet: channels must give 4 positive widths, got {tuple(channels)}")
        if in_channels < 1 or out_channels < 1 or num_res_blocks < 0:
            raise ValueError(
                f"ResUNet: in_channels={in_channels} and out_channels={out_channels} must be positive and "
                f"num_res_blocks={num_res_blocks} not negative"
            )
        if isinstance(cagr_stages, str):  # "body" would otherwise read as the stages 'b', 'o', 'd', 'y'
            raise ValueError(f"ResUNet: cagr_stages={cagr_stages!r}: expected a sequence of stage names, e.g. [{cagr_stages!r}]")
        cagr_stages = tuple(cagr_stages)  # read once: an iterator would be empty the second time
        unknown = [stage for stage in cagr_stages if stage not in STAGES]
        if unknown:
            raise ValueError(f"ResUNet: unknown cagr_stages {unknown}; expected a subset of {STAGES}")
        self.spatial_dims = spatial_dims
        self.cagr_stages = tuple(s for s in STAGES if s in cagr_stages)
        conv = Conv[Conv.CONV, spatial_dims]
        up_conv = Conv[Conv.CONVTRANS, spatial_dims]
        c0, c1, c2, c3 = channels
        if self.cagr_stages and groups < 1:
            raise ValueError(f"{type(self).__name__}: groups={groups} must be positive")
        widths = dict(zip(STAGES, (c0, c1, c2, c3, c2, c1, c0)))
        indivisible = [f"{stage} ({widths[stage]})" for stage in self.cagr_stages if widths[stage] % groups]
        if indivisible:  # else CAGR's own error, naming neither the stage nor these arguments
            raise ValueError(
                f"{type(self).__name__}: channels={tuple(channels)} with groups={groups}: the width of each CAGR stage "
                f"must be a multiple of groups, not {', '.join(indivisible)}"
            )

        def res_blocks(stage: str, width: int) -> list[nn.Module]:
            return [
                ResBlock(
                    spatial_dims, width, cagr=stage in self.cagr_stages, groups=groups, attention=attention,
                    rolling=rolling, portable=portable,
                )
                for _ in range(num_res_blocks)
            ]

        self.head = conv(in_channels, c0, 3, padding=1, bias=False)
        self.down1 = nn.Sequential(*res_blocks("down1", c0), conv(c0, c1, 2, stride=2, bias=False))
        self.down2 = nn.Sequential(*res_blocks("down2", c1), conv(c1, c2, 2, stride=2, bias=False))
        self.down3 = nn.Sequential(*res_blocks("down3", c2), conv(c2, c3, 2, stride=2, bias=False))
        self.body = nn.Sequential(*res_blocks("body", c3))
        self.up1 = nn.Sequential(up_conv(c3, c2, 2, stride=2, bias=False), *res_blocks("up1", c2))
        self.up2 = nn.Sequential(up_conv(c2, c1, 2, stride=2, bias=False), *res_blocks("up2", c1))
        self.up3 = nn.Sequential(up_conv(c1, c0, 2, stride=2, bias=False), *res_blocks("up3", c0))
        self.tail = conv(c0, out_channels, 3, padding=1, bias=False)

    #: Spatial sizes must be multiples of this (three 2× downsamplings); ``forward`` checks it.
    SIZE_MULTIPLE = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for size in x.shape[2:]:  # 8: SIZE_MULTIPLE, written out (TorchScript reads no class attribute or global)
            if size % 8 != 0:
                raise ValueError(f"ResUNet: spatial sizes must be divisible by 8, got input shape {list(x.shape)}")
        x1 = self.head(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        y = self.body(x4)
        y = self.up1(y + x4)
        y = self.up2(y + x3)
        y = self.up3(y + x2)
        return self.tail(y + x1)


class AGINet(ResUNet):
    """AGI-Net (Song et al., arXiv 2411.14684): ResUNet with CAGR in down1–3, body and up1 (n = 8).

    Same arguments as :class:`ResUNet`; only the defaults differ (those of the paper's best model).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512),
        num_res_blocks: int = 2,
        cagr_stages: Sequence[str] = ("down1", "down2", "down3", "body", "up1"),
        groups: int = 8,
        attention: bool = True,
        rolling: bool = True,
        portable: bool = False,
    ) -> None:
        super().__init__(
            spatial_dims, in_channels, out_channels, channels, num_res_blocks, cagr_stages, groups, attention,
            rolling, portable,
        )
