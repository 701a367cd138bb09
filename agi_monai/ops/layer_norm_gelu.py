"""Python entry point of the fused ``GELU(LayerNorm(x))`` op over the last axis (``csrc/layer_norm_gelu*``).

AGI-Net's routing function normalises full-resolution, channels-last features over their channels and
applies GELU, twice per CAGR block. As two ATen ops on CUDA that pair cost more than the grouped
convolution before it (docs/benchmarks.md, "H100 again"): LayerNorm's backward reduces gamma/beta
over millions of rows of 64–512 entries, and GELU saves a second full-size tensor. The compiled op reads x
once forward and twice backward and saves only its inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agi_monai.ops.group_roll import extension_available, kernel_device_types

__all__ = ["layer_norm_gelu", "layer_norm_gelu_reference", "fused_layer_norm_gelu_available"]

# An extension built before this op existed has none: then the ATen ops stand in (rebuild to get it).
_REGISTERED = extension_available() and hasattr(torch.ops.agi_monai, "layer_norm_gelu")
_FUSED_DEVICE_TYPES = kernel_device_types("layer_norm_gelu")

if _REGISTERED:

    @torch.library.register_fake("agi_monai::layer_norm_gelu")
    def _layer_norm_gelu_fake(input, weight, bias, eps):
        torch._check(input.dim() >= 1, lambda: f"layer_norm_gelu: input must be (..., C), got {input.shape}")
        return torch.empty_like(input, memory_format=torch.contiguous_format)

    @torch.library.register_fake("agi_monai::_layer_norm_gelu_backward")
    def _layer_norm_gelu_backward_fake(grad, input, weight, bias, eps):
        return (
            torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(weight),
            torch.empty_like(bias),
        )


def layer_norm_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``gelu(layer_norm(x, (C,), weight, bias, eps))`` with ATen's ops (the tests' reference)."""
    return F.gelu(F.layer_norm(x, (x.shape[-1],), weight, bias, eps))


def fused_layer_norm_gelu_available(device: torch.device) -> bool:
    """Whether the compiled op has kernels for ``device``'s type."""
    return device.type in _FUSED_DEVICE_TYPES


def layer_norm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """GELU (exact, erf form) of the LayerNorm of ``x`` over its last axis, fused.

    Args:
        x: (..., C); computed in float (double for float64) whatever its dtype.
        weight, bias: (C,) affine parameters, in ``x``'s dtype.
        eps: added to the biased variance.

    Returns:
        A contiguous tensor shaped as ``x``. Where the extension has no kernels for ``x``'s device, the
        ATen ops compute the same thing (no warning: the results agree to rounding, only the speed differs).
    """
    if fused_layer_norm_gelu_available(x.device):
        return torch.ops.agi_monai.layer_norm_gelu(x, weight, bias, eps)
    return layer_norm_gelu_reference(x, weight, bias, eps)
