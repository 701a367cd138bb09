"""The two metric protocols of METHOD §4 on whole volumes: PSNR (dB), SSIM (%) and MAE (x100).

Synthesis papers disagree on how these are computed (per slice or per volume, which maximum, with or without
a brain mask), so each result carries its :class:`Protocol`: name, data range, mask policy, normalisation,
SSIM window and aggregation, printed next to every number.

- **"slice2d"** (the paper's, :func:`slice_protocol`): volumes already [0, 1]-normalised (x / 99.5th
  percentile, clipped; the bundles' preprocessing), data range 1; per axial slice, then the mean over slices.
- **"brasyn3d"** (BraSyn 2023, :func:`brasyn_protocol`): per volume, prediction and ground truth both mapped
  by the ground truth's 0.5 and 99.5 percentiles inside the brain mask to [0, 1] and clipped; metrics inside
  the mask; SSIM in 3D.

Volumes are torch tensors or numpy arrays, (H, W, D) or (1, H, W, D), the axial axis last (the bundles'
preprocessed items). ``docs/evaluation.md`` states both protocols in full.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric
from monai.transforms.utils_pytorch_numpy_unification import percentile

from agi_monai.data.foreground import inputs_foreground, widened_span

__all__ = [
    "METRIC_NAMES",
    "PROTOCOL_NAMES",
    "Protocol",
    "ProtocolResult",
    "brain_mask",
    "brasyn_protocol",
    "evaluate_volume",
    "evaluated_slices",
    "mask_bounding_box",
    "percentile_normalize",
    "protocol_record",
    "slice_protocol",
]

#: The metrics every protocol reports, in the paper's units.
METRIC_NAMES = ("psnr_db", "ssim_pct", "mae_x100")
#: The protocols :func:`evaluate_volume` knows.
PROTOCOL_NAMES = ("slice2d", "brasyn3d")
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


@dataclass(frozen=True)
class Protocol:
    """How a set of numbers was computed; :meth:`as_dict` goes into every JSON, and tables print it.

    Attributes:
        name: ``"slice2d"`` or ``"brasyn3d"``.
        title: a short human name.
        data_range: the value range of the compared images (PSNR's peak, SSIM's L).
        mask: the mask policy in a few words (a table column).
        mask_policy: the mask policy in full: which slices/voxels count, and for which metric.
        normalization: what is done to the intensities before the metrics.
        ssim: the SSIM implementation and window.
        aggregation: how per-slice/per-volume values become one number per case, and cases one number.
        evaluated_unit: what :attr:`ProtocolResult.evaluated` counts (``"slices"``, ``"voxels"``).
        parameters: the numeric settings (fractions, percentiles, window).
    """

    name: str
    title: str
    data_range: float
    mask: str
    mask_policy: str
    normalization: str
    ssim: str
    aggregation: str
    evaluated_unit: str
    parameters: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def description(self) -> str:
        """The protocol in one line: name, data range, mask policy, normalisation, SSIM, aggregation."""
        return (
            f"{self.title} ({self.name}): data range {self.data_range:g}; {self.normalization}; mask: {self.mask_policy}; "
            f"SSIM: {self.ssim}; {self.aggregation}"
        )


@dataclass(frozen=True)
class ProtocolResult:
    """One case's metrics under one :class:`Protocol`.

    Attributes:
        protocol: how they were computed.
        psnr_db: PSNR in dB (``inf`` where prediction and truth are equal on every evaluated voxel).
        ssim_pct: SSIM x 100.
        mae_x100: mean absolute error x 100.
        evaluated: number of evaluated slices (``"slice2d"``) or mask voxels (``"brasyn3d"``).
        per_slice: for ``"slice2d"``: ``"slice_index"`` and each metric per evaluated slice; else empty.
    """

    protocol: Protocol
    psnr_db: float
    ssim_pct: float
    mae_x100: float
    evaluated: int
    per_slice: dict[str, list[float]] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """``{"psnr_db": ..., "ssim_pct": ..., "mae_x100": ...}``."""
        return {name: getattr(self, name) for name in METRIC_NAMES}

    @property
    def num_slices(self) -> int | None:
        """The number of evaluated axial slices (protocol ``"slice2d"``), else None."""
        return self.evaluated if self.protocol.evaluated_unit == "slices" else None

    def protocol_description(self) -> str:
        """The protocol in one line, for logs and JSON files."""
        return self.protocol.description()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the protocol, the metrics, the evaluated count (per-slice values left out)."""
        return {"protocol": self.protocol.as_dict(), "metrics": self.metrics, "evaluated": self.evaluated}


# ------------------------------------------------------------------------------------------------ helpers


def _volume(array: Any, name: str) -> torch.Tensor:
    """(H, W, D) float32 CPU tensor from a tensor/array of shape (H, W, D) or (1, H, W, D)."""
    tensor = array.as_tensor() if hasattr(array, "as_tensor") else torch.as_tensor(np.asarray(array))
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected a volume (H, W, D) or (1, H, W, D)")
    return tensor.detach().to("cpu", torch.float32)


def _volumes(
    prediction: Any, target: Any, mask: Any | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    guess, truth = _volume(prediction, "prediction"), _volume(target, "target")
    inside = None if mask is None else _volume(mask, "mask") > 0
    for name, other in (("target", truth), ("mask", inside)):
        if other is not None and other.shape != guess.shape:
            raise ValueError(f"{name} has shape {tuple(other.shape)}, prediction {tuple(guess.shape)}; expected equal")
    if not torch.isfinite(guess).all() or not torch.isfinite(truth).all():
        raise ValueError("prediction or target holds NaN/Inf values; expected finite intensities")
    return guess, truth, inside


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small per-slice operations gain nothing from more threads and lose 10x when the cores are busy (measured
    by the demo on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ssim_metric(spatial_dims: int, data_range: float, win_size: int) -> SSIMMetric:
    return SSIMMetric(
        spatial_dims=spatial_dims, data_range=data_range, kernel_type="gaussian", win_size=win_size,
        kernel_sigma=SSIM_SIGMA,
    )


def _mean(metric: Any) -> float:
    return float(metric.aggregate())


def brain_mask(image: Any, threshold: float = 0.05) -> torch.Tensor:
    """The brain (skull-stripped data) or head mask of a case, from its inputs ``image`` (C, H, W, D) or (H, W, D):
    :func:`agi_monai.data.foreground.inputs_foreground`, the ``"mask"`` the bundles' preprocessing adds
    (``AddForegroundMaskd``), as a bool (H, W, D) tensor."""
    return torch.from_numpy(inputs_foreground(image, threshold))


def evaluated_slices(mask: Any, min_foreground_fraction: float = 0.05) -> torch.Tensor:
    """Indices of the axial slices (last axis) whose mask covers at least ``min_foreground_fraction`` of the
    slice and at least one voxel: the slices protocol ``"slice2d"`` evaluates."""
    inside = _volume(mask, "mask") > 0
    fractions = inside.float().mean(dim=(0, 1))
    return torch.nonzero((fractions >= min_foreground_fraction) & (fractions > 0)).flatten()


def _check_window(shape: Sequence[int], window: int) -> None:
    for axis, size in enumerate(shape):
        if size < window:
            raise ValueError(
                f"axis {axis} has {size} voxels, fewer than the SSIM window {window}; expected at least {window}"
            )


def mask_bounding_box(inside: torch.Tensor, minimum: int) -> tuple[slice, ...]:
    """The bounding box of a non-empty boolean mask (any number of axes), each side widened symmetrically
    (within the image) to at least ``minimum`` voxels, so that an SSIM window of that size fits."""
    if not bool(inside.any()):
        raise ValueError("the mask is empty; expected at least one voxel inside")
    _check_window(inside.shape, minimum)
    box = []
    for axis, size in enumerate(inside.shape):
        others = tuple(a for a in range(inside.ndim) if a != axis)
        occupied = torch.nonzero(inside.sum(dim=others) > 0).flatten() if others else torch.nonzero(inside).flatten()
        box.append(slice(*widened_span(int(occupied.min()), int(occupied.max()) + 1, size, minimum)))
    return tuple(box)


def percentile_normalize(
    volume: Any, reference: Any, mask: Any | None = None, percentiles: Sequence[float] = (0.5, 99.5)
) -> torch.Tensor:
    """``clip((volume - low) / (high - low), 0, 1)`` with ``low``, ``high`` the ``percentiles`` of ``reference``
    over the voxels inside ``mask`` (all voxels when None), linear interpolation between order statistics
    (numpy's default). The BraSyn normalisation, applied with the ground truth as ``reference`` to both the
    prediction and the ground truth. Returns (H, W, D) float32."""
    values, reference = _volume(volume, "volume"), _volume(reference, "reference")
    inside = None if mask is None else _volume(mask, "mask") > 0
    voxels = reference if inside is None else reference[inside]
    if voxels.numel() == 0:
        raise ValueError("the mask is empty; expected at least one voxel to take the percentiles from")
    low, high = (float(percentile(voxels, q)) for q in percentiles)
    if not high > low:
        raise ValueError(
            f"the reference's {percentiles[0]:g}th and {percentiles[1]:g}th percentiles are both {low:g} inside "
            "the mask; expected a non-constant ground truth"
        )
    return ((values - low) / (high - low)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------- protocols


def _slice_spec(
    masked: bool, min_foreground_fraction: float = 0.05, region: str = "mask", data_range: float = 1.0,
    win_size: int = SSIM_WINDOW, clip: bool = True,
) -> Protocol:
    """The :class:`Protocol` record of :func:`slice_protocol` with these settings."""
    if not masked:
        mask, policy = "none (whole slice)", "every axial slice, each metric over the whole slice"
    elif region == "mask":
        mask = "brain mask"
        policy = (
            f"axial slices whose brain mask covers >= {min_foreground_fraction:.0%} of the slice; PSNR and MAE over "
            f"the voxels inside the mask; SSIM over the mask's bounding box (widened to >= {win_size} px) with both "
            "images set to 0 outside the mask"
        )
    else:
        mask = "brain slices, whole slice"
        policy = (
            f"axial slices whose brain mask covers >= {min_foreground_fraction:.0%} of the slice; each metric over "
            "the whole slice"
        )
    clipped = f"prediction clipped to [0, {data_range:g}]; " if clip else ""
    return Protocol(
        name="slice2d",
        title="2D slice, the paper's",
        data_range=data_range,
        mask=mask,
        mask_policy=policy,
        normalization=f"{clipped}volumes already [0, 1]-normalised (x / 99.5th percentile, clipped) by the preprocessing",
        ssim=f"MONAI SSIMMetric, 2D, Gaussian window {win_size}x{win_size}, sigma {SSIM_SIGMA}, k1 0.01, k2 0.03",
        aggregation="mean over the evaluated slices of each case (PSNR averaged in dB), then over cases",
        evaluated_unit="slices",
        parameters={
            "min_foreground_fraction": min_foreground_fraction if masked else None,
            "region": region if masked else "slice", "win_size": win_size, "clip": clip,
        },
    )


def slice_protocol(
    prediction: Any,
    target: Any,
    mask: Any | None = None,
    min_foreground_fraction: float = 0.05,
    region: str = "mask",
    data_range: float = 1.0,
    win_size: int = SSIM_WINDOW,
    clip: bool = True,
) -> ProtocolResult:
    """Protocol A, the paper's "2D slice": PSNR, SSIM and MAE per axial slice, averaged over the slices.

    The volumes are expected in [0, ``data_range``] (the bundles' preprocessing: x / 99.5th percentile,
    clipped); ``clip`` clips the prediction to that range first (a generator has no output activation).

    Mask policy:
        - ``mask`` given, ``region="mask"`` (the default): the slices of :func:`evaluated_slices` (mask
          fraction >= ``min_foreground_fraction``); PSNR (peak ``data_range``) and MAE over the voxels inside
          the mask; SSIM (MONAI ``SSIMMetric``, Gaussian ``win_size`` window, sigma 1.5) over the mask's
          bounding box (:func:`mask_bounding_box`, widened to >= ``win_size``) with both images set to 0
          outside the mask.
        - ``mask`` given, ``region="slice"``: the same slices, every metric over the whole slice (closest to
          the paper's numbers, which include the background).
        - ``mask=None``: every slice, every metric over the whole slice.

    Runs on one thread over contiguous slice copies (fast on busy cores).

    Args:
        prediction: the synthesized volume, (H, W, D) or (1, H, W, D).
        target: the real volume, same shape.
        mask: the brain mask (nonzero inside), same shape, or None.
        min_foreground_fraction: share of a slice the mask must cover for the slice to be evaluated.
        region: ``"mask"`` or ``"slice"``, see above.
        data_range: value range of the volumes.
        win_size: SSIM window side (11, Wang et al.).
        clip: clip the prediction to [0, ``data_range``] first.

    Raises:
        ValueError: shapes differ, values are not finite, the target is not on the [0, ``data_range``] scale, or no
            slice qualifies.
    """
    if region not in ("mask", "slice"):
        raise ValueError(f"region={region!r}; expected 'mask' or 'slice'")
    guess, truth, inside = _volumes(prediction, target, mask)
    low, high = float(truth.min()), float(truth.max())
    if low < -1e-6 * data_range or high > (1.0 + 1e-6) * data_range:  # a raw volume would give PSNR -60 dB, no error
        raise ValueError(
            f"target values span [{low:g}, {high:g}]; expected [0, {data_range:g}] (each volume divided by its 99.5th "
            "percentile and clipped, as the bundles' preprocessing does)"
        )
    _check_window(guess.shape[:2], win_size)
    if clip:
        guess = guess.clamp(0.0, data_range)
    if inside is None:
        slices = torch.arange(guess.shape[-1])
    else:
        slices = evaluated_slices(inside, min_foreground_fraction)
        if len(slices) == 0:
            raise ValueError(
                f"no axial slice has a mask covering >= {min_foreground_fraction:.0%} of it; expected at least one"
            )
    protocol = _slice_spec(inside is not None, min_foreground_fraction, region, data_range, win_size, clip)
    psnr, mae, ssim = PSNRMetric(max_val=data_range), MAEMetric(), _ssim_metric(2, data_range, win_size)
    with _one_thread():
        # contiguous (S, H, W) copies: a slice of an (H, W, D) volume is strided, slow to convolve
        guesses, truths = (v[..., slices].permute(2, 0, 1).contiguous() for v in (guess, truth))
        if inside is None or region == "slice":
            pairs = (guesses[:, None], truths[:, None])
            psnr(*pairs), mae(*pairs), ssim(*pairs)
        else:
            insides = inside[..., slices].permute(2, 0, 1).contiguous()
            for one_guess, one_truth, one_inside in zip(guesses, truths, insides):
                voxels = (one_guess[one_inside].view(1, 1, -1), one_truth[one_inside].view(1, 1, -1))
                psnr(*voxels), mae(*voxels)
                box = mask_bounding_box(one_inside, win_size)
                ssim((one_guess * one_inside)[box][None, None], (one_truth * one_inside)[box][None, None])
    per_slice = {"slice_index": slices.tolist()}
    for name, metric, scale in (("psnr_db", psnr, 1.0), ("ssim_pct", ssim, 100.0), ("mae_x100", mae, 100.0)):
        per_slice[name] = [scale * float(v) for v in metric.get_buffer().flatten()]
    return ProtocolResult(
        protocol=protocol, psnr_db=_mean(psnr), ssim_pct=100.0 * _mean(ssim), mae_x100=100.0 * _mean(mae),
        evaluated=len(slices), per_slice=per_slice,
    )


def _brasyn_spec(masked: bool, percentiles: Sequence[float] = (0.5, 99.5), win_size: int = SSIM_WINDOW) -> Protocol:
    """The :class:`Protocol` record of :func:`brasyn_protocol` with these settings."""
    low, high = percentiles
    where = "inside the brain mask" if masked else "over the whole volume"
    if masked:
        policy = (
            "the voxels inside the brain mask: percentiles, PSNR and MAE over them; 3D SSIM over the mask's bounding "
            f"box (widened to >= {win_size} voxels per axis) with both volumes set to 0 outside the mask"
        )
    else:
        policy = "every voxel of the volume: percentiles, PSNR, MAE and 3D SSIM over the whole volume"
    return Protocol(
        name="brasyn3d",
        title="BraSyn 3D",
        data_range=1.0,
        mask="brain mask" if masked else "none (whole volume)",
        mask_policy=policy,
        normalization=(
            f"prediction and ground truth both mapped by the ground truth's {low:g}th and {high:g}th percentiles "
            f"({where}) to [0, 1]: (x - p{low:g}) / (p{high:g} - p{low:g}), then clipped to [0, 1]"
        ),
        ssim=f"MONAI SSIMMetric, 3D, Gaussian window {win_size}^3, sigma {SSIM_SIGMA}, k1 0.01, k2 0.03",
        aggregation="one value per volume (PSNR from the MSE over the evaluated voxels), then the mean over cases",
        evaluated_unit="voxels",
        parameters={"percentiles": list(percentiles), "win_size": win_size},
    )


def brasyn_protocol(
    prediction: Any,
    target: Any,
    mask: Any | None = None,
    percentiles: Sequence[float] = (0.5, 99.5),
    win_size: int = SSIM_WINDOW,
) -> ProtocolResult:
    """Protocol B, "BraSyn 3D": per volume, both volumes normalised by the ground truth's percentiles inside the
    brain mask (:func:`percentile_normalize`, clipped to [0, 1]), then, data range 1: PSNR and MAE over the
    voxels inside the mask, and 3D SSIM (MONAI ``SSIMMetric(spatial_dims=3)``, Gaussian ``win_size``^3
    window, sigma 1.5) over the mask's bounding box (widened to >= ``win_size``) with both volumes set to 0
    outside the mask. ``mask=None``: the whole volume for all of it.

    Args:
        prediction: the synthesized volume, (H, W, D) or (1, H, W, D), any intensity scale.
        target: the real volume, same shape.
        mask: the brain mask (nonzero inside), or None.
        percentiles: the ground truth's percentiles mapped to 0 and 1.
        win_size: SSIM window side.
    """
    guess, truth, inside = _volumes(prediction, target, mask)
    _check_window(guess.shape, win_size)
    guess = percentile_normalize(guess, truth, inside, percentiles)
    truth = percentile_normalize(truth, truth, inside, percentiles)
    protocol = _brasyn_spec(inside is not None, percentiles, win_size)
    if inside is None:
        inside = torch.ones_like(truth, dtype=torch.bool)
    voxels = (guess[inside].view(1, 1, -1), truth[inside].view(1, 1, -1))
    psnr, mae = PSNRMetric(max_val=1.0)(*voxels), MAEMetric()(*voxels)
    box = mask_bounding_box(inside, win_size)
    # one 3D convolution per moment over the whole box: many threads help here, unlike the 2D slices
    ssim = _ssim_metric(3, 1.0, win_size)((guess * inside)[box][None, None], (truth * inside)[box][None, None])
    return ProtocolResult(
        protocol=protocol, psnr_db=float(psnr), ssim_pct=100.0 * float(ssim), mae_x100=100.0 * float(mae),
        evaluated=int(inside.sum()),
    )


def protocol_record(
    name: str,
    masked: bool = True,
    min_foreground_fraction: float = 0.05,
    region: str = "mask",
    percentiles: Sequence[float] = (0.5, 99.5),
    win_size: int = SSIM_WINDOW,
) -> Protocol:
    """The :class:`Protocol` record that protocol ``name`` with these settings attaches to its results (to state
    a protocol where there are no results, e.g. when every case failed)."""
    if name == "slice2d":
        return _slice_spec(masked, min_foreground_fraction, region, win_size=win_size)
    if name == "brasyn3d":
        return _brasyn_spec(masked, percentiles, win_size)
    raise ValueError(f"protocol {name!r}; expected one of {list(PROTOCOL_NAMES)}")


def evaluate_volume(
    prediction: Any,
    target: Any,
    mask: Any | None = None,
    protocols: Sequence[str] = PROTOCOL_NAMES,
    min_foreground_fraction: float = 0.05,
    region: str = "mask",
    percentiles: Sequence[float] = (0.5, 99.5),
    win_size: int = SSIM_WINDOW,
) -> dict[str, ProtocolResult]:
    """Each of ``protocols`` (``"slice2d"``, ``"brasyn3d"``) on one case; arguments as for
    :func:`slice_protocol` and :func:`brasyn_protocol`. ``target`` may exceed 1 (the real volume divided by its
    99.5th percentile, unclipped, as :func:`~agi_monai.evaluation.volume_dataset` gives it): ``slice2d`` measures it clipped to
    [0, 1], as the paper's images are; ``brasyn3d`` normalises it by its own percentiles inside the mask."""
    unknown = [name for name in protocols if name not in PROTOCOL_NAMES]
    if unknown or not protocols:
        raise ValueError(f"protocols {list(protocols)}: expected a non-empty list of {list(PROTOCOL_NAMES)}")
    results = {}
    for name in protocols:
        if name == "slice2d":
            results[name] = slice_protocol(
                prediction, torch.as_tensor(target).clamp(0.0, 1.0), mask, min_foreground_fraction, region,
                win_size=win_size,
            )
        else:
            results[name] = brasyn_protocol(prediction, target, mask, percentiles, win_size)
    return results
