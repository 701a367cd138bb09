"""Python entry point of the group-wise roll op.

``torch.ops.agi_monai.group_roll`` is the compiled op (``csrc/``). :func:`group_roll` calls it when the
extension is built for the tensor's device, and otherwise the pure-PyTorch reference, announcing the
fallback once with a warning (never silently).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from agi_monai.ops.reference import check_group_roll_inputs, group_roll_reference

__all__ = ["extension_available", "extension_has_cuda", "extension_error", "group_roll"]

_LOAD_ERROR: str | None = None


def _load_library() -> bool:
    """Loads ``agi_monai._C`` into ``torch.ops`` (not as a Python module: the op lives in the dispatcher)."""
    global _LOAD_ERROR
    spec = importlib.util.find_spec("agi_monai._C")
    if spec is None or spec.origin is None:
        _LOAD_ERROR = (
            "the compiled extension agi_monai._C is not built (install with "
            "`pip install --no-build-isolation -e .` after torch; see README.md)"
        )
        return False
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:  # e.g. built against another torch
        _LOAD_ERROR = f"the compiled extension {spec.origin} failed to load: {err}"
        return False
    return True


_LOADED = _load_library()

if _LOADED:
    # Shape propagation for FakeTensor / torch.compile / torch.export (the op stays one graph node).
    # It is also the op's meta kernel, so it checks what the CPU and CUDA kernels check, values apart (a CPU weight
    # with meta offsets would otherwise get an uninitialised CPU result).
    @torch.library.register_fake("agi_monai::group_roll")
    def _group_roll_fake(weight: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        check_group_roll_inputs(weight, offsets, scales, check_values=False)
        return weight.new_empty((offsets.shape[0], *weight.shape))

    @torch.library.register_fake("agi_monai::_group_roll_backward")
    def _group_roll_backward_fake(grad, weight, offsets, scales):
        # contiguous, as the kernels return them (empty_like would keep a channels-last weight's strides, which
        # Inductor then checks the real gradient against)
        return weight.new_empty(weight.shape), offsets.new_empty(offsets.shape), scales.new_empty(scales.shape)


def kernel_device_types(op: str) -> frozenset[str]:
    """The device types (``"cpu"``, ``"cuda"``) the compiled op ``agi_monai::<op>`` has kernels for. Asked once per op,
    at import, and kept as a constant: torch.compile cannot trace the dispatcher query, so asking it per call broke
    a compiled graph at every CAGR on CUDA."""
    return frozenset(
        device_type
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if _LOADED and hasattr(torch.ops.agi_monai, op)
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"agi_monai::{op}", key)
    )


_KERNEL_DEVICE_TYPES = kernel_device_types("group_roll")


def extension_available() -> bool:
    """Whether the compiled op is registered (CPU kernels at least)."""
    return _LOADED


def extension_error() -> str | None:
    """Why the compiled op is unavailable, or None."""
    return _LOAD_ERROR


def extension_has_cuda() -> bool:
    """Whether the compiled op has CUDA kernels (the extension was built with nvcc and a CUDA torch)."""
    return "cuda" in _KERNEL_DEVICE_TYPES


_WARNED: set[str] = set()


def warn_fallback_once(devices: str, reason: str, stacklevel: int = 3) -> None:
    """The one warning (per ``devices``) that the pure-PyTorch roll stands in for the compiled op: from
    :func:`group_roll`, and from the networks' CAGR blocks, which pick it when they are built.

    Args:
        devices: where the fallback applies: a device type, or "all devices" when the extension is absent.
        reason: why (:func:`extension_error`, or the missing kernels).
        stacklevel: passed to ``warnings.warn``, so that it points at the caller's caller.
    """
    if devices not in _WARNED:
        _WARNED.add(devices)
        warnings.warn(
            f"agi_monai: using the pure-PyTorch group_roll on {devices} (slower): {reason}",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def group_roll(weight: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-group fractional circular roll of a convolution kernel (AGI-Net's Group-wise Rolling).

    Args:
        weight: (C_out, C_in, ky, kx) or (C_out, C_in, kz, ky, kx) kernel.
        offsets: (B, n, S) real offsets, S = 2 or 3; [..., 0] rolls x (last axis), [..., 1] y, [..., 2] z.
            Any finite value is valid (circular); the fractional part blends neighbouring integer rolls.
        scales: (B, n) per-group factors λ.

    Returns:
        (B, C_out, C_in, k…): for group i (input channels i·C_in/n … (i+1)·C_in/n − 1),
        ``scales[b, i] · FloatRoll(weight[:, group i], offsets[b, i])`` with ``torch.roll``'s direction.

    Raises:
        ValueError: a shape, the groups, the devices, or non-finite offsets on CPU (message: the argument, the shape
            it got and the one expected).
        TypeError: an unsupported dtype, or dtypes that differ.

    In TorchScript this is ``torch.ops.agi_monai.group_roll`` (the extension must be loaded where the script runs;
    ``agi_monai.networks.CAGR(portable=True)`` scripts the pure-PyTorch reference instead).
    """
    if torch.jit.is_scripting():
        return torch.ops.agi_monai.group_roll(weight, offsets, scales)
    return _group_roll_eager(weight, offsets, scales)


def _group_roll_eager(weight: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    device_type = weight.device.type
    # (meta: the op's fake kernel, which checks the arguments as the kernels do)
    if _LOADED and (device_type == "meta" or device_type in _KERNEL_DEVICE_TYPES):
        return torch.ops.agi_monai.group_roll(weight, offsets, scales)
    if _LOADED:
        warn_fallback_once(device_type, f"the extension has no {device_type} kernels")
    else:
        warn_fallback_once("all devices", str(_LOAD_ERROR))
    return group_roll_reference(weight, offsets, scales)
