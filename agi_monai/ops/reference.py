"""Pure-PyTorch group-wise roll: the reference the compiled kernels are tested against, and the
fallback where the extension is not built.

It is a separate code path on purpose: the compiled kernels sum the 2^S bilinear/trilinear corners
directly, while this one applies, per axis, a (B, n, k, k) circulant "fractional roll" matrix —
bilinear interpolation of rolls factorises over axes — with einsum. Gradients come from autograd.
"""

from __future__ import annotations

import torch

__all__ = ["check_group_roll_inputs", "fractional_roll_matrix", "group_roll_reference"]


def check_group_roll_inputs(
    weight: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, check_values: bool = True
) -> None:
    """Same checks, messages and exception types (ValueError, TypeError) as the compiled op (csrc/group_roll.cpp).

    ``check_values=False`` checks shapes, dtypes and devices only: the compiled op's fake kernel (FakeTensor,
    ``torch.compile``, ``torch.export``, meta tensors), where values are not known.
    """
    if offsets.dim() != 3 or offsets.shape[2] not in (2, 3):
        raise ValueError(
            f"group_roll: offsets must have shape (B, n, S) with S = 2 (2D) or 3 (3D), got shape {list(offsets.shape)}"
        )
    spatial = offsets.shape[2]
    if weight.dim() != 2 + spatial:
        axes = "kz, ky, kx" if spatial == 3 else "ky, kx"
        raise ValueError(
            f"group_roll: weight must have shape (C_out, C_in, {axes}) to match offsets {list(offsets.shape)} "
            f"(S = {spatial}), got shape {list(weight.shape)}"
        )
    batch, groups = offsets.shape[0], offsets.shape[1]
    if groups < 1:
        raise ValueError(f"group_roll: offsets must have at least one group (n >= 1), got shape {list(offsets.shape)}")
    if scales.dim() != 2 or scales.shape[0] != batch or scales.shape[1] != groups:
        raise ValueError(
            f"group_roll: scales must have shape (B, n) = ({batch}, {groups}) to match offsets "
            f"{list(offsets.shape)}, got shape {list(scales.shape)}"
        )
    for axis in range(2, weight.dim()):
        if weight.shape[axis] < 1:
            raise ValueError(f"group_roll: weight must have non-empty kernel axes, got shape {list(weight.shape)}")
    if weight.shape[1] % groups != 0:
        raise ValueError(
            f"group_roll: the number of groups n = {groups} (offsets.size(1)) must divide C_in = {weight.shape[1]} "
            f"(weight.size(1)); weight has shape {list(weight.shape)}"
        )
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"group_roll: weight must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    if offsets.dtype != weight.dtype or scales.dtype != weight.dtype:
        raise TypeError(
            f"group_roll: weight, offsets and scales must share one dtype, got weight {weight.dtype}, "
            f"offsets {offsets.dtype}, scales {scales.dtype}"
        )
    if offsets.device != weight.device or scales.device != weight.device:
        raise ValueError(
            f"group_roll: weight, offsets and scales must be on one device, got weight on {weight.device}, "
            f"offsets on {offsets.device}, scales on {scales.device}"
        )
    # CPU only, like the compiled op: on a GPU the check would synchronise; there NaN propagates instead.
    if not check_values or offsets.device.type != "cpu" or offsets.numel() == 0:
        return
    if torch.compiler.is_compiling():  # traced (torch.compile, torch.export): a check in the graph, not a graph break
        torch._assert_async(torch.isfinite(offsets).all(), "group_roll: offsets must be finite, got NaN or Inf")
    elif not bool(torch.isfinite(offsets).all()):
        raise ValueError(f"group_roll: offsets must be finite, got NaN or Inf in offsets of shape {list(offsets.shape)}")


def fractional_roll_matrix(offset: torch.Tensor, size: int) -> torch.Tensor:
    """(…,) real offsets → (…, size, size) matrices M with (M @ v)[j] = FloatRoll(v, offset)[j].

    Row j blends v[(j - s) mod k] with weight 1 - t and v[(j - s - 1) mod k] with weight t,
    where s = floor(offset) and t = offset - s (torch.roll's convention, blended bilinearly).
    """
    whole = torch.floor(offset)
    frac = (offset - whole).unsqueeze(-1).unsqueeze(-1)
    # Reduce modulo k in floating point first so that very large offsets cannot overflow int64.
    shift = whole.remainder(size).to(torch.int64).remainder(size).unsqueeze(-1)
    rows = torch.arange(size, device=offset.device)
    at_floor = torch.nn.functional.one_hot((rows - shift).remainder(size), size).to(offset.dtype)
    at_ceil = torch.nn.functional.one_hot((rows - shift - 1).remainder(size), size).to(offset.dtype)
    return (1 - frac) * at_floor + frac * at_ceil


def group_roll_reference(weight: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """weight (C_out, C_in, k…), offsets (B, n, S), scales (B, n) → (B, C_out, C_in, k…).

    out[b, :, group i] = scales[b, i] · FloatRoll(weight[:, group i], offsets[b, i]); offsets[..., 0]
    rolls the last kernel axis (x), [..., 1] the one before (y), [..., 2] depth (z).
    """
    check_group_roll_inputs(weight, offsets, scales)
    batch, groups, spatial = offsets.shape
    c_out, c_in = weight.shape[0], weight.shape[1]
    kernel = list(weight.shape[2:])
    grouped = weight.reshape([c_out, groups, c_in // groups] + kernel)
    # Work in at least float32 so that half/bfloat16 accumulate in float, as the kernels do.
    compute = torch.promote_types(weight.dtype, torch.float32)
    offsets_c = offsets.to(compute)
    roll_x = fractional_roll_matrix(offsets_c[..., 0], kernel[-1])  # (B, n, kx, kx)
    roll_y = fractional_roll_matrix(offsets_c[..., 1], kernel[-2])  # (B, n, ky, ky)
    scale = scales.to(compute)
    if spatial == 2:
        rolled = torch.einsum("bgyY,bgxX,ogcYX->bogcyx", roll_y, roll_x, grouped.to(compute))
        rolled = rolled * scale[:, None, :, None, None, None]
    else:
        roll_z = fractional_roll_matrix(offsets_c[..., 2], kernel[-3])  # (B, n, kz, kz)
        rolled = torch.einsum("bgzZ,bgyY,bgxX,ogcZYX->bogczyx", roll_z, roll_y, roll_x, grouped.to(compute))
        rolled = rolled * scale[:, None, :, None, None, None, None]
    return rolled.reshape([batch, c_out, c_in] + kernel).to(weight.dtype)
