"""The CAGR block of AGI-Net (arXiv 2411.14684, §3): Cross Group Attention, then Group-wise Rolling.

CAGR replaces a k×k convolution C_in → C_out. Its parts are small modules so that the paper's
ablations are constructor flags (``attention``, ``rolling``) and each part is testable alone.

Parameter accounting (docs/design.md): a CAGR adds 20·C²/n parameters and 18·C²/n·H·W multiply-adds
to the convolution it replaces (the paper's Table 7 and Table 9 imply exactly these rates):
- Cross Group Attention: a grouped 1×1 convolution on the pooled [intra-group, shuffled inter-group]
  descriptors, 2C → C with n groups: 2·C²/n parameters, negligible multiply-adds.
- Routing function: two grouped 3×3 convolutions C → C with n groups at full resolution
  (each followed by LayerNorm and GELU): 18·C²/n parameters and 18·C²/n·H·W multiply-adds.
  The paper's text names one grouped 3×3 convolution; its tables need two (see docs/design.md).
- Heads: offsets C → S·n (zero-initialised), scales C → n (zero weight, bias one, sigmoid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from agi_monai.ops import (
    extension_available,
    extension_error,
    fused_layer_norm_gelu_available,
    group_roll,
    group_roll_reference,
    layer_norm_gelu,
)
from agi_monai.ops.group_roll import warn_fallback_once

__all__ = [
    "CAGR",
    "ChannelLayerNorm",
    "CrossGroupAttention",
    "GroupRoll",
    "PortableGroupRoll",
    "RoutingFeatures",
    "RoutingFunction",
    "channel_shuffle",
]


# Where ChannelLayerNorm.forward_gelu runs the fused kernel (measured, docs/benchmarks.md): on CPU ATen's
# vectorised LayerNorm and GELU are ~10× faster than the fused op's scalar loops.
FUSED_NORM_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (B, n·m, …) viewed as (B, n, m, …) → (B, m, n, …) → (B, n·m, …)."""
    batch, channels = x.shape[0], x.shape[1]
    rest = x.shape[2:]
    shuffled = x.reshape([batch, groups, channels // groups] + list(rest)).transpose(1, 2)
    return shuffled.reshape([batch, channels] + list(rest))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, *spatial) tensor (as in the routing function).

    Under autocast a float16/bfloat16 input is normalised in its own precision (the kernels accumulate in
    float): CUDA autocast would run ``layer_norm`` in float32, so the routing function's LayerNorm and GELU
    would read and write float32 copies of full-resolution features, with a cast before the next
    convolution, twice per CAGR. CPU autocast already keeps the input's precision.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # (TorchScript knows no per-device autocast query)
            return self.norm(x.movedim(1, -1)).movedim(-1, 1)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                norm = self.norm
                y = F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)
        else:
            y = self.norm(x)
        return y.movedim(-1, 1)

    @torch.jit.unused
    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``gelu(self(x))`` (exact GELU) as one fused kernel, ``agi_monai.ops.layer_norm_gelu`` (which falls back
        to ATen's two ops where the extension has no kernels for x's device). On CUDA the two ATen ops cost more
        than the grouped convolution before them at full resolution, and GELU saved a second full-size tensor
        (docs/benchmarks.md); :class:`RoutingFeatures` calls this where ``FUSED_NORM_DEVICE_TYPES`` says so."""
        norm = self.norm
        # Computed in float whatever x's dtype, as _eager_forward does under autocast.
        y = layer_norm_gelu(x.movedim(1, -1), norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)
        return y.movedim(-1, 1)


class CrossGroupAttention(nn.Module):
    """Cross Group Attention (§3.1): x̃_i = x_i ⊙ sigmoid(F([z_i, z^s_i])).

    z = global average pool of x, z^s = channel shuffle of z (so group i sees every other group),
    and F is a grouped 1×1 convolution whose group i reads [z_i, z^s_i] and writes group i's C/n
    attention weights.

    Args:
        spatial_dims: 2 or 3.
        channels: C, the input channels.
        groups: n, the number of channel groups (divides ``channels``).
    """

    def __init__(self, spatial_dims: int, channels: int, groups: int) -> None:
        super().__init__()
        if channels % groups != 0:
            raise ValueError(f"CrossGroupAttention: groups={groups} must divide channels={channels}")
        self.groups = groups
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.fuse = Conv[Conv.CONV, spatial_dims](2 * channels, channels, kernel_size=1, groups=groups, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x)
        shuffled = channel_shuffle(pooled, self.groups)
        batch, channels = pooled.shape[0], pooled.shape[1]
        ones = [1] * (pooled.dim() - 2)
        # Interleave per group: [z_1, z^s_1, z_2, z^s_2, …] so that the grouped conv pairs them.
        paired = torch.stack(
            [pooled.reshape([batch, self.groups, channels // self.groups] + ones),
             shuffled.reshape([batch, self.groups, channels // self.groups] + ones)],
            dim=2,
        ).reshape([batch, 2 * channels] + ones)
        return x * torch.sigmoid(self.fuse(paired))


class RoutingFeatures(nn.Sequential):
    """The routing function's [grouped 3×3 conv → LayerNorm → GELU] × ``num_convs`` at full resolution
    (:meth:`build`), an ``nn.Sequential`` whose eager forward runs each stock ChannelLayerNorm and the GELU after it
    as one fused kernel where that exists (CUDA, ``FUSED_NORM_DEVICE_TYPES``).

    A pair with a hook on either module (which must see the LayerNorm's own output), or a module replaced by
    another, runs layer by layer as in ``nn.Sequential``, with the same results; so does TorchScript.
    """

    @classmethod
    def build(cls, spatial_dims: int, channels: int, groups: int, num_convs: int) -> "RoutingFeatures":
        """[grouped 3×3 conv (``groups`` groups, no bias) → ChannelLayerNorm → GELU] × ``num_convs``, ``channels`` →
        ``channels``, for ``spatial_dims`` = 2 or 3."""
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            layers += [
                Conv[Conv.CONV, spatial_dims](channels, channels, kernel_size=3, padding=1, groups=groups, bias=False),
                ChannelLayerNorm(channels),
                nn.GELU(),
            ]
        return cls(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            for layer in self:
                x = layer(x)
            return x
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self)
        index = 0
        while index < len(layers):
            if index + 1 < len(layers) and _fusable(layers[index], layers[index + 1], x):
                x = layers[index].forward_gelu(x)
                index += 2
            else:
                x = layers[index](x)
                index += 1
        return x


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _fusable(norm: nn.Module, activation: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``activation(norm(x))`` may run as one fused kernel: a ChannelLayerNorm then an exact GELU, no hooks
    that would miss the LayerNorm's output (global module hooks included: torch.nn's registries), on a device
    where the fused kernel is used."""
    global_hooks = any(
        getattr(torch.nn.modules.module, name, None)
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                     "_global_backward_pre_hooks")
    )
    return (
        x.device.type in FUSED_NORM_DEVICE_TYPES
        and fused_layer_norm_gelu_available(x.device)
        and type(norm) is ChannelLayerNorm
        and type(activation) is nn.GELU
        and activation.approximate == "none"
        and not (global_hooks or _has_hooks(norm) or _has_hooks(norm.norm) or _has_hooks(activation))
    )


class RoutingFunction(nn.Module):
    """Routing function (§3.2): per sample, n rolling offsets (S per group) and n scales λ.

    [grouped 3×3 conv → LayerNorm → GELU] × ``num_convs`` → global average pool → two linear heads:
    offsets (no activation; zero-initialised) and scales (sigmoid; zero weight, bias one).

    Args:
        spatial_dims: 2 or 3 (S offsets per group: x, y[, z]).
        channels: C, the input channels (the pooled feature vector has C entries).
        groups: n.
        num_convs: grouped 3×3 convolutions before pooling (2 reproduces Table 7, see module docstring).
    """

    def __init__(self, spatial_dims: int, channels: int, groups: int, num_convs: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.spatial_dims = spatial_dims
        self.features = RoutingFeatures.build(spatial_dims, channels, groups, num_convs)
        # Global average pool over the spatial axes of the channels-last view (see forward).
        self.pool_dims: list[int] = list(range(1, spatial_dims + 1))
        self.offset_head = nn.Linear(channels, groups * spatial_dims)
        self.scale_head = nn.Linear(channels, groups)
        # Start as the plain convolution up to a constant scale: no roll, λ = sigmoid(1).
        nn.init.zeros_(self.offset_head.weight)
        nn.init.zeros_(self.offset_head.bias)
        nn.init.zeros_(self.scale_head.weight)
        nn.init.ones_(self.scale_head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Channels-last: grouped convolutions run 1.5–2× faster on oneDNN/cuDNN in that layout, and the
        # channel LayerNorm then normalises a contiguous last axis instead of copying a permuted tensor.
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        # The average pool is a mean over the spatial axes of the (contiguous) channels-last view, so that
        # its gradient comes back channels-last as well. (AdaptiveAvgPool's backward returns a contiguous
        # NCHW gradient: GELU's backward with mixed layouts then runs ~10× slower on CPU, and LayerNorm's
        # backward copies; together ~15 % of a CAGR's time at 64 channels, 128², on CPU.)
        pooled = self.features(x).movedim(1, -1).mean(dim=self.pool_dims)
        offsets = self.offset_head(pooled).reshape(-1, self.groups, self.spatial_dims)
        scales = torch.sigmoid(self.scale_head(pooled))
        return offsets, scales


class GroupRoll(nn.Module):
    """The compiled group-wise roll as a module (TorchScript calls ``torch.ops.agi_monai.group_roll``).

    Eagerly it calls :func:`agi_monai.ops.group_roll`, which falls back (announced) to the pure-PyTorch
    reference on a device the extension was not built for.
    """

    def forward(self, weight: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return group_roll(weight, offsets, scales)


class PortableGroupRoll(nn.Module):
    """The pure-PyTorch group-wise roll as a module: a TorchScript file that runs without the extension."""

    def forward(self, weight: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return group_roll_reference(weight, offsets, scales)


class CAGR(nn.Module):
    """Cross Group Attention and Group-wise Rolling convolution (AGI-Net, arXiv 2411.14684, §3).

    Replaces ``Conv(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2)``.
    Per sample b and channel group i, the kernel's input-channel group is circularly rolled by a
    predicted fractional offset and scaled by λ_{b,i}; each sample is then convolved with its own
    kernel (the batch is folded into the convolution's groups, one cuDNN/oneDNN call per layer).

    Args:
        spatial_dims: 2 or 3.
        in_channels: C_in (divisible by ``groups``).
        out_channels: C_out.
        kernel_size: k of the replaced convolution (padding k // 2: the input's size for odd k, one more per
            axis for even k, as ``Conv(padding=k // 2)``).
        groups: n, channel groups with their own roll (the paper's best: 8).
        stride: stride of the replaced convolution.
        bias: bias of the replaced convolution (AGI-Net's ResUNet is bias-free).
        attention: apply Cross Group Attention (False: "GR only" ablation).
        rolling: apply Group-wise Rolling (False: "CA only" ablation, a plain convolution after CA).
        routing_convs: grouped 3×3 convolutions in the routing function (see module docstring).
        portable: compute the roll with the pure-PyTorch reference (for extension-free TorchScript).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        groups: int = 8,
        stride: int = 1,
        bias: bool = False,
        attention: bool = True,
        rolling: bool = True,
        routing_convs: int = 2,
        portable: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"CAGR: spatial_dims must be 2 or 3, got {spatial_dims}")
        if groups < 1 or in_channels < 1 or in_channels % groups != 0:
            raise ValueError(f"CAGR: groups={groups} must be positive and divide in_channels={in_channels}")
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"CAGR: kernel_size={kernel_size} and stride={stride} must be positive")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.stride = stride
        self.padding = kernel_size // 2
        # Parts left out by the ablation flags are None (TorchScript then compiles their branch away).
        self.attention = CrossGroupAttention(spatial_dims, in_channels, groups) if attention else None
        # The replaced convolution owns the kernel (and its initialisation); rolling only reads its weight.
        self.conv = Conv[Conv.CONV, spatial_dims](
            in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=self.padding, bias=bias
        )
        self.routing = RoutingFunction(spatial_dims, in_channels, groups, routing_convs) if rolling else None
        self.roll: nn.Module
        if portable:
            self.roll = PortableGroupRoll()
        elif extension_available():
            self.roll = GroupRoll()
        else:
            # announced here, where the choice is made: PortableGroupRoll itself never warns (it is also the
            # deliberate choice of an extension-free TorchScript export)
            warn_fallback_once("all devices", str(extension_error()))
            self.roll = PortableGroupRoll()

    def rolled_conv(self, x: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Convolves each sample of x with its own rolled, scaled kernel."""
        batch = x.shape[0]
        if batch == 0:  # nothing to fold into groups (a convolution refuses groups=0): the empty result's shape
            return self.conv(x)
        kernels = self.roll(self.conv.weight, offsets.to(self.conv.weight.dtype), scales.to(self.conv.weight.dtype))
        folded_x = x.reshape([1, batch * x.shape[1]] + list(x.shape[2:]))
        folded_w = kernels.reshape([batch * kernels.shape[1]] + list(kernels.shape[2:]))
        bias = self.conv.bias
        folded_b: torch.Tensor | None = None
        if bias is not None:
            folded_b = bias.repeat(batch)
        if self.spatial_dims == 2:
            y = F.conv2d(folded_x, folded_w, folded_b, self.stride, self.padding, 1, batch)
        else:
            y = F.conv3d(folded_x, folded_w, folded_b, self.stride, self.padding, 1, batch)
        return y.reshape([batch, -1] + list(y.shape[2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CAGR: expected input of shape (B, {self.in_channels}, {'D, ' if self.spatial_dims == 3 else ''}H, W), "
                f"got {list(x.shape)}"
            )
        if self.attention is not None:
            x = self.attention(x)
        if self.routing is None:
            return self.conv(x)
        offsets, scales = self.routing(x)
        return self.rolled_conv(x, offsets, scales)
