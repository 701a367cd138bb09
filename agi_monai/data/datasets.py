"""Datasets: preprocessed 3D volumes (inference, evaluation, caching) and 2D axial slices (training).

Volumes come from :func:`agi_monai.data.preprocessing_transforms`; with a ``cache_dir`` they are computed
once (loading, registration, normalization) and kept on disk by MONAI's ``PersistentDataset``. The slice
dataset then holds the axial slices with enough foreground, in memory or (with a ``cache_dir``) in
memory-mapped files (``storage_dir``), so an epoch is only indexing and a restart reads no volume again.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose
from torch.utils.data import DataLoader
from tqdm import tqdm

from agi_monai.data.discovery import discover_cases
from agi_monai.data.errors import DataError, Failure, format_failures
from agi_monai.data.files import atomic_output, write_json
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
    storage_dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    progress: bool = True,
    **preprocessing_options: Any,
) -> SliceDataset:
    """2D axial training/validation items from datalist items (``train#dataset`` of the bundles, whose
    ``data`` MONAI Label replaces): :func:`agi_monai.data.preprocessing_transforms`, cached per volume, then
    :class:`SliceDataset`. Cases whose preprocessing fails are skipped and listed in the result's ``failures``;
    when no slice is left, a :class:`DataError` lists them.

    With ``cache_dir``, the kept slices go to memory-mapped files (:class:`SliceDataset` ``storage_dir``; the
    paper's training sets do not fit in memory) in a subfolder named after the scenario and size, e.g.
    ``T1_T2_to_PD_256x256/slices`` (``slices-<hash>`` when ``preprocessing_options`` are given: the files are
    keyed by the items, so one folder must never serve two preprocessing configurations). Each volume is
    preprocessed once, by the first build; later builds (a resumed run, the next network of a comparison) read
    its slices from its file. The volumes themselves are not kept: at the paper's scale they would take more
    disk than the slices (89 GB for 500 BraTS 3-to-1 cases in float32).

    Args:
        data: datalist items, each with the ``inputs`` and ``target`` contrasts (:func:`discover_cases`).
        inputs: input contrasts in scenario order.
        target: the contrast to synthesize.
        spatial_size: in-plane size, (256, 256) for IXI, (240, 240) for BraTS.
        cache_dir: where the slices are kept; None to keep nothing on disk (the slices are then held in memory).
        transform: random 2D transforms applied on access (e.g. :class:`agi_monai.data.RandShiftChanneld`).
        min_foreground_fraction, storage_dtype: see :class:`SliceDataset`.
        num_workers: processes preprocessing volumes while building.
        progress: show a progress bar.
        preprocessing_options: further arguments of :func:`agi_monai.data.preprocessing_transforms`
            (``reference``, ``registration``, ``labels``, ``registration_options``...).
    """
    labels = list(preprocessing_options.get("labels", ()))
    preprocessing = preprocessing_transforms(inputs, target, spatial_size, **preprocessing_options)
    storage_dir = None
    if cache_dir is not None:
        scenario = f"{'_'.join(inputs)}_to_{target}_{'x'.join(str(s) for s in spatial_size)}"
        options = f"-{pickle_hashing(preprocessing_options).decode()[:16]}" if preprocessing_options else ""
        storage_dir = Path(cache_dir) / scenario / f"slices{options}"
    dataset = SliceDataset(
        build_volume_dataset(data, preprocessing),
        keys=["image", "target", "mask", *labels],
        min_foreground_fraction=min_foreground_fraction,
        transform=transform,
        storage_dtype=storage_dtype,
        storage_dir=storage_dir,
        num_workers=num_workers,
        progress=progress,
    )
    if not len(dataset):  # else the bundle's DataLoader fails on "num_samples=0", naming nothing
        cases = ", ".join(str(item.get("case_id", index)) for index, item in enumerate(data))
        raise DataError(
            f"datalist [{cases}]", "no usable slice",
            f"at least one readable case with slices of at least {min_foreground_fraction:.0%} foreground",
            "; ".join(f"skipped {failure}" for failure in dataset.failures),
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


@dataclass
class _SlicedVolume:
    """The kept slices of one volume: in memory (``stack``) or in a ``.npy`` file mapped on first access."""

    case_id: str
    slice_indices: list[int]
    foreground_box: list[tuple[int, int]]  # (first, last) index of the mask's foreground along H, W, D
    stack: torch.Tensor | None = None  # (kept slices, channels of all keys, H, W)
    path: Path | None = None


class SliceDataset(torch.utils.data.Dataset):
    """Axial 2D slices of preprocessed volumes; slices without enough foreground dropped.

    Items: ``"image"`` (C, H, W) the inputs in scenario order, ``"target"`` (1, H, W), ``"mask"``
    (1, H, W), any other ``keys``, plus ``"case_id"`` and ``"slice_index"`` (the slice's index in the
    preprocessed volume). ``transform`` (e.g. :class:`agi_monai.data.RandShiftChanneld`) is applied to each
    item on access.

    The kept slices are held in memory, or with ``storage_dir`` in one memory-mapped ``.npy`` file per volume
    (written atomically, named by a hash of the volume's datalist item and of ``keys``, the foreground
    threshold and ``storage_dtype``, as MONAI's ``PersistentDataset`` names its files). The paper's training sets
    need that: 500 BraTS cases keep about 120 slices each, 5 channels of 240² for a 3-to-1 scenario (inputs,
    target, mask), about 69 GB in float32 (35 GB in float16); on disk the operating system's page cache holds
    what fits, and the data-loading processes share it. A dataset built again with the same ``storage_dir``
    (a resumed training run) reads the slices of every stored volume without loading the volume. Like
    ``PersistentDataset``'s, the files are keyed by the items (file paths), not by the files' contents: use
    a fresh folder when the images change.

    A case whose preprocessing raises a :class:`DataError` is skipped and listed in :attr:`failures` (and
    tried again by the next build).

    Args:
        volumes: preprocessed volumes, e.g. :func:`build_volume_dataset`; with ``storage_dir``, a MONAI
            ``Dataset`` (its ``data`` items name the stored files).
        keys: the keys to slice, each (C, H, W, D).
        mask_key: key of the foreground mask deciding which slices to keep.
        min_foreground_fraction: keep slices whose foreground covers at least this share of the slice.
        transform: applied to each 2D item.
        storage_dtype: dtype the slices are held in (``torch.float16`` halves the memory or disk); items are
            float32.
        storage_dir: where the slices are kept as memory-mapped files; None to hold them in memory.
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
        storage_dir: str | Path | None = None,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        self.keys = list(keys)
        self.min_foreground_fraction = min_foreground_fraction  # named by check_batches' advice
        self.transform = transform
        self.failures: list[Failure] = []
        self.storage_dir = None if storage_dir is None else Path(storage_dir)
        self._channels: list[int] = []
        self._mapped: dict[int, np.ndarray] = {}  # this process's memory maps, by volume
        files = self._storage_files(volumes, mask_key, min_foreground_fraction, storage_dtype)
        built: dict[int, _SlicedVolume] = {}
        for index, path in enumerate(files):
            record = None if path is None else self._stored(path)
            if record is not None:
                built[index] = record
        stored = len(built)
        pending = [index for index in range(len(volumes)) if index not in built]
        loader = DataLoader(
            _ReportingDataset(volumes, pending), batch_size=None, num_workers=num_workers, collate_fn=_identity
        )
        # (tqdm first: zip then asks it once more, and the bar counts the last volume); no bar when every volume is
        # stored already
        bar = tqdm(loader, desc="preprocessing volumes", unit="volume", disable=not progress or not pending)
        for item, index in zip(bar, pending):
            if isinstance(item, Failure):
                self.failures.append(item)
                continue
            fractions = torch.as_tensor(item[mask_key]).float().mean(dim=(0, 1, 2))
            kept = torch.nonzero(fractions >= min_foreground_fraction).flatten()
            if not self._channels:
                self._channels = [int(item[key].shape[0]) for key in self.keys]
            stack = torch.cat([torch.as_tensor(item[key]).float() for key in self.keys], dim=0)
            stack = stack[..., kept].permute(3, 0, 1, 2).to(storage_dtype).contiguous()
            box = _foreground_box(torch.as_tensor(item[mask_key])[0] > 0)
            volume = _SlicedVolume(str(item.get("case_id", index)), kept.tolist(), box, stack=stack)
            built[index] = volume if files[index] is None else self._store(volume, files[index])
        self._volumes = [built[index] for index in sorted(built)]
        self._ends = list(torch.cumsum(torch.tensor([len(v.slice_indices) for v in self._volumes] or [0]), 0).tolist())
        summary = (
            f"{len(self)} slices from {len(self._volumes)} volumes"
            f"{f' ({stored} read from {self.storage_dir})' if stored else ''}, {len(self.failures)} volumes skipped"
        )
        if self.failures:
            _logger.warning("%s\n%s", summary, format_failures(self.failures, "volumes"))
        else:
            _logger.info(summary)

    def _storage_files(
        self, volumes: Any, mask_key: str, min_foreground_fraction: float, storage_dtype: torch.dtype
    ) -> list[Path | None]:
        """Each volume's slice file (None: held in memory)."""
        if self.storage_dir is None:
            return [None] * len(volumes)
        items = getattr(volumes, "data", None)
        if items is None:
            raise ValueError(
                f"SliceDataset: storage_dir={self.storage_dir} needs a MONAI Dataset of datalist items to name its "
                f"files (build_volume_dataset); got {type(volumes).__name__}"
            )
        if storage_dtype not in (torch.float32, torch.float16):
            raise ValueError(
                f"SliceDataset: storage_dtype {storage_dtype} cannot be stored in a file (expected float32 or float16)"
            )
        settings = {"keys": self.keys, "mask_key": mask_key, "min_foreground_fraction": min_foreground_fraction,
                    "storage_dtype": str(storage_dtype)}
        return [self.storage_dir / f"{pickle_hashing({'item': item, **settings}).decode()}.npy" for item in items]

    def _store(self, volume: _SlicedVolume, path: Path) -> _SlicedVolume:
        """Writes a volume's slices (the ``.npy``, then the ``.json`` that marks it complete) and forgets the tensor."""
        with atomic_output(path) as temporary:
            np.save(temporary, volume.stack.numpy())
        write_json({"case_id": volume.case_id, "slice_indices": volume.slice_indices, "channels": self._channels,
                    "foreground_box": volume.foreground_box}, path.with_suffix(".json"))
        return _SlicedVolume(volume.case_id, volume.slice_indices, volume.foreground_box, path=path)

    def _stored(self, path: Path) -> _SlicedVolume | None:
        """The volume a complete record describes; None when there is none, or it is of an earlier version (without
        ``foreground_box``): the volume is then built again, in place."""
        record_file = path.with_suffix(".json")
        if not record_file.is_file():
            return None
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if "foreground_box" not in record:
            return None
        self._channels = self._channels or list(record["channels"])
        box = [(int(low), int(high)) for low, high in record["foreground_box"]]
        return _SlicedVolume(str(record["case_id"]), list(record["slice_indices"]), box, path=path)

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are reopened by each process (spawned DataLoader workers), never pickled as arrays
        return {**self.__dict__, "_mapped": {}}

    @property
    def case_ids(self) -> list[str]:
        """The case of each held volume, in order."""
        return [volume.case_id for volume in self._volumes]

    def foreground_box(self, number: int) -> list[tuple[int, int]]:
        """(first, last) index of held volume ``number``'s foreground (its ``mask_key``) along H, W and D of the
        preprocessed volume; the whole extent when it has none. Found as the volume is built, so reading it costs
        no I/O (:class:`agi_monai.data.PatchDataset` places patches in it)."""
        return self._volumes[number].foreground_box

    @property
    def channels(self) -> dict[str, int]:
        """The channels of each key, in the order of :meth:`volume_slices`' second axis."""
        return dict(zip(self.keys, self._channels))

    def volume_slices(self, number: int) -> torch.Tensor | np.ndarray:
        """The kept slices of held volume ``number``, (slices, channels of all keys, H, W) in the storage dtype:
        the tensor held in memory, or the file's memory map (opened once per process; index it to read)."""
        volume = self._volumes[number]
        if volume.stack is not None:
            return volume.stack
        if number not in self._mapped:
            self._mapped[number] = np.load(volume.path, mmap_mode="r")
        return self._mapped[number]

    def __len__(self) -> int:
        return self._ends[-1] if self._volumes else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"slice {index} out of range for {len(self)} slices")
        number = bisect.bisect_right(self._ends, index)
        position = index - (self._ends[number - 1] if number else 0)
        volume = self._volumes[number]
        planes = as_float_tensor(self.volume_slices(number)[position])
        item: dict[str, Any] = dict(zip(self.keys, torch.split(planes, self._channels, dim=0)))
        item["case_id"] = volume.case_id
        item["slice_index"] = volume.slice_indices[position]
        return self.transform(item) if self.transform is not None else item


class _ReportingDataset(torch.utils.data.Dataset):
    """Returns a :class:`Failure` instead of raising when a case's preprocessing hits a :class:`DataError`
    (MONAI's ``Compose`` wraps it in a ``RuntimeError``), so one bad case does not stop the others."""

    def __init__(self, volumes: Dataset | Sequence[Mapping[str, Any]], indices: Sequence[int]) -> None:
        self.volumes = volumes
        self.indices = list(indices)  # the volumes to load (those without a slice file)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Any:
        index = self.indices[position]
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


def _foreground_box(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(first, last) index of ``mask``'s true voxels along each axis; the whole extent along an axis without any."""
    box = []
    for axis in range(mask.dim()):
        present = torch.nonzero(mask.any(dim=tuple(a for a in range(mask.dim()) if a != axis))).flatten()
        box.append((int(present[0]), int(present[-1])) if len(present) else (0, mask.shape[axis] - 1))
    return box


def as_float_tensor(planes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A float32 copy of held slices (a tensor of any storage dtype) or of a memory map's region (read here)."""
    if isinstance(planes, torch.Tensor):
        return planes.float()
    return torch.from_numpy(np.array(planes, dtype=np.float32))
