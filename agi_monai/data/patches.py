"""3D training items for the 3D pix2pix bundle: random patches (training) and whole volumes (validation) of
preprocessed volumes.

The volumes are kept by a :class:`agi_monai.data.SliceDataset` that keeps every axial slice
(``min_foreground_fraction=0``): the same one-time preprocessing, failure reporting, progress bar and
memory-mapped files as the 2D bundles', so a patch reads only its own region from disk and a resumed run
preprocesses nothing again. (MONAI's ``RandCropByPosNegLabeld`` over a ``PersistentDataset`` would load the
whole cached volume, 180 MB for a BraTS 3-to-1 case, for every patch.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agi_monai.data.datasets import SliceDataset, as_float_tensor, slice_dataset

__all__ = ["PatchDataset", "patch_dataset"]


class PatchDataset(torch.utils.data.Dataset):
    """Random 3D patches, or whole volumes, of the volumes a :class:`SliceDataset` holds whole.

    Items: each key of ``slices`` (``"image"`` (C, h, w, d), ``"target"`` (1, h, w, d), ``"mask"``...),
    ``"case_id"`` and ``"patch_origin"`` (the patch's first voxel (h, w, d) in the volume). With ``patch_size``,
    item ``i`` is a random patch of volume ``i // samples_per_volume`` placed by the bounding box of the
    volume's foreground (:meth:`SliceDataset.foreground_box`, the brain mask's, which leaves out what some contrast
    does not cover): along each axis the patch lies inside the box, or, where the box is shorter than the patch,
    holds all of it, so patches hold brain, not the air around it or zero-filled slices; an axis of the volume
    shorter than the patch is zero-padded at its end. Positions come from torch's random
    generator: ``monai.utils.set_determinism`` makes them repeatable, and each DataLoader worker draws
    its own. Without ``patch_size``, item ``i`` is volume ``i`` whole (for a sliding-window validation).

    Args:
        slices: a :class:`SliceDataset` built with ``min_foreground_fraction=0`` (every slice kept).
        patch_size: (h, w, d) of a patch; None for whole volumes.
        samples_per_volume: patches per volume in an epoch (the dataset's length is volumes x this).
    """

    def __init__(
        self,
        slices: SliceDataset,
        patch_size: Sequence[int] | None = (96, 96, 96),
        samples_per_volume: int = 4,
    ) -> None:
        if slices.min_foreground_fraction > 0:
            raise ValueError(
                f"PatchDataset: the SliceDataset keeps only slices with {slices.min_foreground_fraction:.0%} "
                "foreground, so its volumes have gaps (expected min_foreground_fraction=0: every slice kept)"
            )
        if patch_size is not None and (len(patch_size) != 3 or min(patch_size) < 1):
            raise ValueError(f"PatchDataset: patch_size {list(patch_size)} (expected three positive sizes (h, w, d))")
        if samples_per_volume < 1:
            raise ValueError(f"PatchDataset: samples_per_volume {samples_per_volume} (expected at least 1)")
        self.slices = slices
        self.patch_size = None if patch_size is None else tuple(int(s) for s in patch_size)
        self.samples_per_volume = 1 if patch_size is None else int(samples_per_volume)

    @property
    def case_ids(self) -> list[str]:
        return self.slices.case_ids

    @property
    def failures(self) -> list[Any]:
        return self.slices.failures

    def __len__(self) -> int:
        return len(self.slices.case_ids) * self.samples_per_volume

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        number = index // self.samples_per_volume
        stored = self.slices.volume_slices(number)  # (D, channels, H, W)
        if self.patch_size is None:
            volume, origin = as_float_tensor(stored[:]), (0, 0, 0)
        else:
            volume, origin = self._patch(self.slices.foreground_box(number), stored)
        volume = volume.permute(1, 2, 3, 0)  # (channels, H, W, D), the volumes' layout
        item: dict[str, Any] = dict(zip(self.slices.channels, torch.split(volume, list(self.slices.channels.values()))))
        item["case_id"] = self.slices.case_ids[number]
        item["patch_origin"] = torch.tensor(origin)
        return item

    def _patch(
        self, box: Sequence[tuple[int, int]], stored: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        depth, _, height, width = stored.shape
        sizes = (height, width, depth)
        starts = []
        for (low, high), size, patch in zip(box, sizes, self.patch_size):
            # A patch lies inside the box along an axis where the box is at least as long, and holds the whole box
            # along one where it is shorter: so a patch never reaches past the foreground into what the mask left
            # out (slices a contrast does not cover, zero-filled by the resampling) unless the box is smaller than
            # a patch. Either way the start is drawn uniformly among those positions.
            first, last = sorted((low, high - patch + 1))
            start = int(torch.randint(first, last + 1, ()).item())
            starts.append(min(max(start, 0), max(size - patch, 0)))
        (h0, w0, d0), (ph, pw, pd) = starts, self.patch_size
        region = as_float_tensor(stored[d0 : d0 + pd, :, h0 : h0 + ph, w0 : w0 + pw])
        short = [patch - got for patch, got in zip((pw, ph, pd), (region.shape[3], region.shape[2], region.shape[0]))]
        if any(short):  # (W, H, D) from the last axis, as F.pad takes them; the channel axis is not padded
            region = torch.nn.functional.pad(region, (0, short[0], 0, short[1], 0, 0, 0, short[2]))
        return region, (h0, w0, d0)


def patch_dataset(
    data: Sequence[Mapping[str, Any]],
    inputs: Sequence[str],
    target: str,
    spatial_size: Sequence[int] = (240, 240),
    patch_size: Sequence[int] | None = (96, 96, 96),
    samples_per_volume: int = 4,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
    **preprocessing_options: Any,
) -> PatchDataset:
    """3D training/validation items from datalist items (``train#dataset`` / ``validate#dataset`` of the 3D bundle,
    whose ``data`` MONAI Label replaces): :func:`agi_monai.data.slice_dataset` keeping every slice (preprocessed
    once, kept in ``cache_dir``; bad cases skipped and listed in ``failures``), then :class:`PatchDataset`.

    Args:
        data: datalist items, each with the ``inputs`` and ``target`` contrasts.
        inputs, target: the scenario's contrasts.
        spatial_size: in-plane pad/crop of the preprocessing, (240, 240) for BraTS.
        patch_size: (h, w, d) of the random training patches; None for whole volumes (validation).
        samples_per_volume: patches drawn from each volume per epoch.
        cache_dir, num_workers, progress, preprocessing_options: as for :func:`agi_monai.data.slice_dataset`.
    """
    slices = slice_dataset(
        data, inputs, target, spatial_size, cache_dir=cache_dir, min_foreground_fraction=0.0,
        num_workers=num_workers, progress=progress, **preprocessing_options,
    )
    return PatchDataset(slices, patch_size, samples_per_volume)
