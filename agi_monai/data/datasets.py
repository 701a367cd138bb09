"""Datasets: preprocessed 3D volumes (inference, evaluation, caching) and 2D axial slices (training).

Volumes come from :func:`agi_monai.data.preprocessing_transforms`; with a ``cache_dir`` they are computed
once (loading, registration, normalization) and kept on disk by MONAI's ``PersistentDataset``. The slice
dataset then holds the axial slices with enough foreground in memory, so an epoch is only indexing.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import Dataset, PersistentDataset
from monai.transforms import Compose
from torch.utils.data import DataLoader
from tqdm import tqdm

from agi_monai.data.discovery import discover_cases
from agi_monai.data.errors import DataError, Failure, format_failures
from agi_monai.data.transforms import preprocessing_transforms

__all__ = ["build_volume_dataset", "SliceDataset", "slice_dataset", "build_slice_dataset", "build_inference_dataset"]

_logger = logging.getLogger(__name__)


def build_volume_dataset(
    cases: Sequence[Mapping[str, Any]], preprocessing: Compose, cache_dir: str | Path | None = None
) -> Dataset:
    """A dataset of preprocessed volumes.

    Without ``cache_dir`` the items are ``MetaTensor`` volumes whose geometry ``Invertd`` can restore (use
    this for inference: :func:`agi_monai.data.restore_geometry_transforms`). With ``cache_dir`` they are
    computed once and stored by MONAI's ``PersistentDataset`` as plain tensors, the cheap way to feed
    :class:`SliceDataset` again and again. The cache is keyed by each case's files: use one ``cache_dir``
    per preprocessing configuration (scenario and spatial size).

    Args:
        cases: datalist items (:func:`agi_monai.data.discover_cases`).
        preprocessing: :func:`agi_monai.data.preprocessing_transforms`.
        cache_dir: where to keep preprocessed volumes; None to compute on every access.
    """
    if cache_dir is None:
        return Dataset(list(cases), transform=preprocessing)
    return PersistentDataset(list(cases), transform=preprocessing, cache_dir=Path(cache_dir))


def slice_dataset(
    data: Sequence[Mapping[str, Any]],
    inputs: Sequence[str],
    target: str,
    spatial_size: Sequence[int] = (256, 256),
    cache_dir: str | Path | None = None,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    min_foreground_fraction: float = 0.05,
    num_workers: int = 0,
    progress: bool = True,
    **preprocessing_options: Any,
) -> SliceDataset:
    """2D axial training/validation items from datalist items (``train#dataset`` of the bundles, whose
    ``data`` MONAI Label replaces): :func:`agi_monai.data.preprocessing_transforms`, cached per volume, then
    :class:`SliceDataset`. Cases whose preprocessing fails are skipped and listed in the result's ``failures``;
    when no slice is left, a :class:`DataError` lists them.

    The volumes are cached in a subfolder of ``cache_dir`` named after the scenario and size (e.g.
    ``T1_T2_to_PD_256x256``): MONAI's ``PersistentDataset`` keys its cache by the items only, so one folder
    must never serve two preprocessing configurations.

    Args:
        data: datalist items, each with the ``inputs`` and ``target`` contrasts (:func:`discover_cases`).
        inputs: input contrasts in scenario order.
        target: the contrast to synthesize.
        spatial_size: in-plane size, (256, 256) for IXI, (240, 240) for BraTS.
        cache_dir: where preprocessed volumes are kept; None to keep nothing on disk.
        transform: random 2D transforms applied on access (e.g. :class:`agi_monai.data.RandShiftChanneld`).
        min_foreground_fraction: see :class:`SliceDataset`.
        num_workers: processes preprocessing volumes while building.
        progress: show a progress bar.
        preprocessing_options: further arguments of :func:`agi_monai.data.preprocessing_transforms`
            (``reference``, ``registration``, ``labels``, ``registration_options``...).
    """
    labels = list(preprocessing_options.get("labels", ()))
    preprocessing = preprocessing_transforms(inputs, target, spatial_size, **preprocessing_options)
    if cache_dir is not None:
        cache_dir = Path(cache_dir) / f"{'_'.join(inputs)}_to_{target}_{'x'.join(str(s) for s in spatial_size)}"
    dataset = SliceDataset(
        build_volume_dataset(data, preprocessing, cache_dir),
        keys=["image", "target", "mask", *labels],
        min_foreground_fraction=min_foreground_fraction,
        transform=transform,
        num_workers=num_workers,
        progress=progress,
    )
    if not len(dataset):  # else the bundle's DataLoader fails on "num_samples=0", naming nothing
        cases = ", ".join(str(item.get("case_id", index)) for index, item in enumerate(data))
        skipped = "".join(f"; skipped {failure}" for failure in dataset.failures)
        raise DataError(
            f"datalist [{cases}]", f"no usable slice{skipped}",
            f"at least one readable case with slices of at least {min_foreground_fraction:.0%} foreground",
        )
    return dataset


def build_slice_dataset(
    source: str | Path,
    inputs: Sequence[str],
    target: str,
    spatial_size: Sequence[int] = (256, 256),
    split: str | None = None,
    **options: Any,
) -> SliceDataset:
    """One call from a folder (NIfTI or DICOM, co-registered or not) or a JSON datalist to 2D training items:
    :func:`agi_monai.data.discover_cases` (the cases having ``inputs``, ``target`` and any ``labels``), then
    :func:`slice_dataset`. Cases skipped at discovery or preprocessing are in the result's ``failures``.

    Args:
        source: a folder or a JSON datalist.
        inputs, target, spatial_size: as for :func:`slice_dataset`.
        split: the datalist split to read (``"training"``...), for a JSON ``source``.
        options: the other arguments of :func:`slice_dataset` (``cache_dir``, ``transform``, ``labels``...).
    """
    labels = list(options.get("labels", ()))
    discovery = discover_cases(source, required=[*inputs, target, *labels], split=split)
    dataset = slice_dataset(discovery.cases, inputs, target, spatial_size, **options)
    dataset.failures[:0] = discovery.failures
    return dataset


def build_inference_dataset(
    source: str | Path,
    inputs: Sequence[str],
    spatial_size: Sequence[int] = (256, 256),
    target: str | None = None,
    split: str | None = None,
    **preprocessing_options: Any,
) -> Dataset:
    """One call from a folder or a JSON datalist to preprocessed 3D inference items (``"image"``, ``"mask"``,
    and ``"target"`` when given, for evaluation), whose geometry
    ``restore_geometry_transforms(dataset.transform, ...)`` restores. Cases lacking an input are skipped
    (logged). Arguments as for :func:`build_slice_dataset`.
    """
    required = [*inputs, *([target] if target else []), *preprocessing_options.get("labels", ())]
    cases = discover_cases(source, required=required, split=split).cases
    return build_volume_dataset(cases, preprocessing_transforms(inputs, target, spatial_size, **preprocessing_options))


class SliceDataset(torch.utils.data.Dataset):
    """Axial 2D slices of preprocessed volumes, kept in memory; slices without enough foreground dropped.

    Items: ``"image"`` (C, H, W) the inputs in scenario order, ``"target"`` (1, H, W), ``"mask"``
    (1, H, W), any other ``keys``, plus ``"case_id"`` and ``"slice_index"`` (the slice's index in the
    preprocessed volume). ``transform`` (e.g. :class:`agi_monai.data.RandShiftChanneld`) is applied to each
    item on access.

    A case whose preprocessing raises a :class:`DataError` is skipped and listed in :attr:`failures`.

    Args:
        volumes: preprocessed volumes, e.g. :func:`build_volume_dataset`.
        keys: the keys to slice, each (C, H, W, D).
        mask_key: key of the foreground mask deciding which slices to keep.
        min_foreground_fraction: keep slices whose foreground covers at least this share of the slice.
        transform: applied to each 2D item.
        storage_dtype: dtype the slices are held in (``torch.float16`` halves the memory: about
            18 GB instead of 37 GB for the paper's BraTS 3-to-1 training set); items are float32.
        num_workers: processes that preprocess volumes while the dataset is built.
        progress: show a progress bar while building.
    """

    def __init__(
        self,
        volumes: Dataset | Sequence[Mapping[str, Any]],
        keys: Sequence[str] = ("image", "target", "mask"),
        mask_key: str = "mask",
        min_foreground_fraction: float = 0.05,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        storage_dtype: torch.dtype = torch.float32,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        self.keys = list(keys)
        self.transform = transform
        self.failures: list[Failure] = []
        self._stacks: list[torch.Tensor] = []  # per volume: (kept slices, channels of all keys, H, W)
        self._slice_indices: list[list[int]] = []
        self._case_ids: list[str] = []
        self._channels: list[int] = []
        loader = DataLoader(_ReportingDataset(volumes), batch_size=None, num_workers=num_workers, collate_fn=_identity)
        for item in tqdm(loader, desc="slicing volumes", unit="volume", disable=not progress):
            if isinstance(item, Failure):
                self.failures.append(item)
                continue
            fractions = torch.as_tensor(item[mask_key]).float().mean(dim=(0, 1, 2))
            kept = torch.nonzero(fractions >= min_foreground_fraction).flatten()
            if not self._channels:
                self._channels = [int(item[key].shape[0]) for key in self.keys]
            stack = torch.cat([torch.as_tensor(item[key]).float() for key in self.keys], dim=0)
            self._stacks.append(stack[..., kept].permute(3, 0, 1, 2).to(storage_dtype).contiguous())
            self._slice_indices.append(kept.tolist())
            self._case_ids.append(str(item.get("case_id", len(self._case_ids))))
        self._ends = list(torch.cumsum(torch.tensor([len(s) for s in self._slice_indices] or [0]), 0).tolist())
        summary = f"{len(self)} slices from {len(self._stacks)} volumes, {len(self.failures)} volumes skipped"
        if self.failures:
            _logger.warning("%s\n%s", summary, format_failures(self.failures, "volumes"))
        else:
            _logger.info(summary)

    @property
    def case_ids(self) -> list[str]:
        """The case of each held volume, in order."""
        return list(self._case_ids)

    def __len__(self) -> int:
        return self._ends[-1] if self._stacks else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"slice {index} out of range for {len(self)} slices")
        volume = bisect.bisect_right(self._ends, index)
        position = index - (self._ends[volume - 1] if volume else 0)
        planes = torch.split(self._stacks[volume][position].float(), self._channels, dim=0)
        item: dict[str, Any] = dict(zip(self.keys, planes))
        item["case_id"] = self._case_ids[volume]
        item["slice_index"] = self._slice_indices[volume][position]
        return self.transform(item) if self.transform is not None else item


class _ReportingDataset(torch.utils.data.Dataset):
    """Returns a :class:`Failure` instead of raising when a case's preprocessing hits a :class:`DataError`
    (MONAI's ``Compose`` wraps it in a ``RuntimeError``), so one bad case does not stop the others."""

    def __init__(self, volumes: Dataset | Sequence[Mapping[str, Any]]) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.volumes[index]
        except Exception as error:
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, DataError):
                cause = cause.__cause__
            if cause is None:
                raise
            case = getattr(self.volumes, "data", None)
            case_id = str(case[index].get("case_id", index)) if case is not None else str(index)
            return Failure(case_id, str(cause))


def _identity(item: Any) -> Any:
    return item
