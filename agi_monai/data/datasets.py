"""Datasets: preprocessed 3D volumes (inference, evaluation, caching) and 2D axial slices (training).

Volumes come from :func:`agi_monai.data.preprocessing_transforms`; with a ``cache_dir`` they are computed
once (loading, registration, normalization) and kept on disk by MONAI's ``PersistentDataset``. The slice
dataset then holds the axial slices with enough foreground, in memory or (with a ``cache_dir``) in
memory-mapped files (``storage_dir``), so an epoch is only indexing and a restart reads no volume again.

Both caches are named by each case's datalist item (its file paths) and checked against the files: an entry records
the resolved path, size, modification time (``st_mtime_ns``) and SHA-256 of every file its case names (a DICOM
series' files one by one), and is used only while they still match; a file replaced under the same name (skull
stripping or registration run again in place) makes its case be built again, with one log line saying why.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, PersistentDataset
from monai.data.utils import SUPPORTED_PICKLE_MOD, no_collation, pickle_hashing
from monai.transforms import Compose
from monai.utils import convert_to_tensor, look_up_option
from torch.utils.data import DataLoader
from tqdm import tqdm

from agi_monai.data.contrasts import CONTRASTS, LABELS
from agi_monai.data.discovery import discover_cases
from agi_monai.data.errors import DataError, Failure, cause_chain, failure_reason, format_failures
from agi_monai.data.files import atomic_output, file_sha256, free_space, write_json
from agi_monai.data.transforms import PREPROCESSING_VERSION, preprocessing_transforms
from agi_monai.data.volumes import source_paths

__all__ = [
    "FailureReportingDataset", "SliceDataset", "build_inference_dataset", "build_slice_dataset", "build_volume_dataset",
    "slice_dataset",
]

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# What a cache entry was built from. An entry is named by its datalist item (file paths) as before, so an entry of an
# earlier version is found, has no record of its files and is built again; a record lists, per contrast or label the
# item names, each file it reads as [resolved path, size, st_mtime_ns, sha256]. Checking an entry costs one stat (and
# a realpath) per file; the SHA-256 is read only when a file's size and path are the same but its times differ (a
# `touch`, a copy, a deterministic step run again): same content, the entry is kept and its record refreshed.


def _source_files(source: Any) -> list[str]:
    """The files a volume source reads, resolved: a NIfTI file, a DICOM series' files, the files directly in a series
    folder (what GDCM reads there), an echo's files."""
    files: list[str] = []
    for name in source_paths(source):
        if os.path.isdir(name):
            folder = os.path.realpath(name)
            with os.scandir(folder) as entries:
                files.extend(sorted(os.path.join(folder, entry.name) for entry in entries if entry.is_file()))
        else:
            files.append(os.path.realpath(name))
    return files


def _file_state(path: str) -> list[Any]:
    """[path, size, st_mtime_ns] of a file; [path, None, None] when it is missing."""
    try:
        status = os.stat(path)
    except OSError:
        return [path, None, None]
    return [path, status.st_size, status.st_mtime_ns]


def _source_state(item: Mapping[str, Any]) -> dict[str, list[list[Any]] | None]:
    """The state of every file each contrast or label of a datalist item names (None: a source that names no file,
    which never matches)."""
    state: dict[str, list[list[Any]] | None] = {}
    for key, source in item.items():
        if key not in CONTRASTS + LABELS:
            continue
        try:
            state[key] = [_file_state(path) for path in _source_files(source)]
        except (DataError, OSError, TypeError):  # a malformed echo selection, a folder removed meanwhile
            state[key] = None
    return state


def _source_record(item: Mapping[str, Any]) -> dict[str, Any]:
    """What an entry built from ``item`` now records: each file's state and content hash, taken before the files are
    read (a file replaced while it is read then shows as changed at the next check)."""
    state = _source_state(item)
    return {key: None if files is None else [[*entry, file_sha256(entry[0]) if entry[1] is not None else None]
                                             for entry in files]
            for key, files in state.items()}


def _check_sources(record: Mapping[str, Any], item: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """(Why an entry with ``record`` no longer matches ``item``'s files or this version's preprocessing, None when it
    does; a refreshed ``sources`` to write when only times changed and the content is the same, else None)."""
    recorded = record.get("sources")
    if not isinstance(recorded, dict):
        return "cached without a record of its files (by an earlier version)", None
    version = record.get("preprocessing_version", 1)
    if version != PREPROCESSING_VERSION:
        return f"built by an earlier preprocessing (version {version}, now {PREPROCESSING_VERSION})", None
    try:
        return _compare_sources(recorded, _source_state(item))
    except (IndexError, TypeError, ValueError):  # a record edited or damaged by hand
        return "its record of the files it was built from cannot be read", None


def _compare_sources(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    refreshed: dict[str, Any] = {}
    touched = False
    for key in sorted(set(recorded) | set(current), key=str):
        old, new = recorded.get(key), current.get(key)
        if key not in current:
            return f"{key} was cached but the case no longer names it", None
        if key not in recorded or old is None or new is None:
            return f"{key} changed since it was cached (another source)", None
        if [entry[0] for entry in old] != [entry[0] for entry in new]:
            return f"{key} changed since it was cached (other files: {_files_changed(old, new)})", None
        kept = []
        for was, now in zip(old, new):
            if now[1] is None:
                return f"{key} changed since it was cached ({now[0]} is missing)", None
            if was[1] != now[1]:
                return f"{key} changed since it was cached ({now[0]}: size {was[1]} -> {now[1]} bytes)", None
            if was[2] != now[2]:
                if was[3] is None or file_sha256(now[0]) != was[3]:
                    return f"{key} changed since it was cached ({now[0]}: modified, other content)", None
                touched = True
            kept.append([*now, was[3]])
        refreshed[key] = kept
    return None, refreshed if touched else None


def _files_changed(old: list[list[Any]], new: list[list[Any]]) -> str:
    before, after = {entry[0] for entry in old}, {entry[0] for entry in new}
    if len(before) == len(after) == 1:
        return f"{next(iter(before))} -> {next(iter(after))}"
    return f"{len(after - before)} added, {len(before - after)} gone"


def _case_name(item: Mapping[str, Any]) -> str:
    if "case_id" in item:
        return str(item["case_id"])
    return next((str(value) for key, value in item.items() if key in CONTRASTS + LABELS), "a case")


class _SourceCheckedPersistentDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` whose entries are used only while the files they were built from are unchanged.

    The entry is still named by MONAI's ``hash_func`` of the item (its paths), not by a ``hash_func`` that hashes the
    files' states too: with the states in the name, a changed file would be a silent cache miss (no line saying which
    case was built again, nor why), the stale ``.pt`` would stay on disk for ever, and a mere ``touch`` would rebuild
    the case. Instead each entry ``<hash>.pt`` has a record ``<hash>.sources.json`` (:func:`_source_record`), checked
    before the entry is read; a stale entry is built again and replaced atomically (``atomic_output``; MONAI's own
    write does not replace an existing file), its record written after it.
    """

    def _cachecheck(self, item_transformed: Any) -> Any:
        if self.cache_dir is None or not isinstance(item_transformed, Mapping):
            return super()._cachecheck(item_transformed)
        name = f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}"
        entry, record_file = self.cache_dir / f"{name}.pt", self.cache_dir / f"{name}.sources.json"
        if entry.is_file():
            reason, refreshed = _check_sources(_read_record(record_file), item_transformed)
            if reason is None:
                if refreshed is not None:
                    write_json({"case_id": _case_name(item_transformed), "sources": refreshed,
                                "preprocessing_version": PREPROCESSING_VERSION}, record_file)
                return super()._cachecheck(item_transformed)  # MONAI reads the entry (and rebuilds a corrupt one)
            _logger.info("%s: %s; its preprocessed volume in %s is built again", _case_name(item_transformed), reason,
                         self.cache_dir)
        sources = _source_record(item_transformed)
        record_file.unlink(missing_ok=True)  # no record claims the entry while it is replaced
        volume = self._pre_transform(deepcopy(item_transformed))
        with atomic_output(entry) as temporary:
            torch.save(
                convert_to_tensor(volume, convert_numeric=False, track_meta=self.track_meta), temporary,
                pickle_module=look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD),
                pickle_protocol=self.pickle_protocol,
            )
        write_json({"case_id": _case_name(item_transformed), "sources": sources,
                    "preprocessing_version": PREPROCESSING_VERSION}, record_file)
        return volume


def _read_record(path: Path) -> dict[str, Any]:
    """A cache entry's JSON record; {} when there is none or it cannot be read (the entry is then built again)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def build_volume_dataset(
    cases: Sequence[Mapping[str, Any]], preprocessing: Compose, cache_dir: str | Path | None = None
) -> Dataset:
    """A dataset of preprocessed volumes.

    Without ``cache_dir`` the items are ``MetaTensor`` volumes whose geometry ``Invertd`` can restore (use
    this for inference: :func:`agi_monai.data.restore_geometry_transforms`). With ``cache_dir`` they are
    computed once and stored by MONAI's ``PersistentDataset`` as plain tensors, the cheap way to feed
    :class:`SliceDataset` again and again. An entry is named by the case's datalist item (its file paths) and used
    only while every file the case names has the resolved path, size and modification time it had when the entry
    was built (or, its times changed, the same SHA-256); otherwise the case is preprocessed again, the entry replaced
    atomically and one line logged saying which file changed. The preprocessing itself is not in the name: use one
    ``cache_dir`` per preprocessing configuration (scenario and spatial size).

    Args:
        cases: datalist items (:func:`agi_monai.data.discover_cases`).
        preprocessing: :func:`agi_monai.data.preprocessing_transforms`.
        cache_dir: where to keep preprocessed volumes; None to compute on every access.
    """
    if cache_dir is None:
        return Dataset(list(cases), transform=preprocessing)
    return _SourceCheckedPersistentDataset(list(cases), transform=preprocessing, cache_dir=Path(cache_dir))


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
    its slices from its file as long as the case's files are unchanged (:class:`SliceDataset`), else build it
    again. The volumes themselves are not kept: at the paper's scale they would take more
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
    (logged). Arguments as for :func:`build_slice_dataset`; with a ``target`` the mask keeps only the voxels every
    contrast covers (``coverage="voxels"``, as :func:`agi_monai.evaluation.volume_dataset`: these items are measured,
    so a partly covered slice keeps its covered voxels), unless ``coverage`` is given.
    """
    required = [*inputs, *([target] if target else []), *preprocessing_options.get("labels", ())]
    cases = discover_cases(source, required=required, split=split).cases
    options = {"coverage": "voxels" if target else "warn", **preprocessing_options}
    return build_volume_dataset(cases, preprocessing_transforms(inputs, target, spatial_size, **options))


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
    (a resumed training run, or a fresh one with the same ``cache_dir``) reads the slices of every stored volume
    without loading the volume, provided the volume's files are those it was built from: each record lists every
    file the case's datalist item names (a DICOM series' files one by one) with its resolved path, size,
    modification time (``st_mtime_ns``) and SHA-256, taken before the volume was read. An image replaced under the
    same name (skull stripping or registration run again in place), moved behind a link, or missing makes that
    volume be built again and its files replaced atomically, with one log line naming the case and the file; a file
    only touched or copied again (same size and content, other times) keeps its slices, and the record is
    refreshed. Checking costs one ``stat`` per file (the hash is read only when the times differ). A record
    without this list (written by an earlier version), or of another ``PREPROCESSING_VERSION`` (what the
    preprocessing code makes of the files), counts as stale. The preprocessing settings are in the folder's name
    (:func:`slice_dataset`).

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
        stale = self._read_stored(range(len(files)), files, volumes, built)
        stored = len(built)
        pending = [index for index in range(len(volumes)) if index not in built]
        ranks = _cache_sharing_ranks() if self.storage_dir is not None else None
        if ranks is not None:
            # Several processes of one distributed run (multi_gpu_train.json) build the same dataset into one
            # cache: each preprocesses only the volumes whose index it owns (index mod world size, so that ranks
            # that saw the cache at different moments still agree), waits for the others, then reads theirs.
            # Without this every rank would preprocess every volume. A volume another rank could not build (a bad
            # case) is tried here as well, so that every rank lists the same failures.
            rank, world = ranks
            mine = [index for index in pending if index % world == rank]
            self._build(volumes, mine, files, built, mask_key, min_foreground_fraction, storage_dtype, num_workers,
                        progress)
            _wait_for_all_ranks()
            others = [index for index in pending if index % world != rank]  # (its own failures are not retried)
            before = len(built)
            self._read_stored(others, files, volumes, built)  # (its stale count: counted in the first reading)
            stored += len(built) - before
            pending = [index for index in others if index not in built]
        self._build(volumes, pending, files, built, mask_key, min_foreground_fraction, storage_dtype, num_workers,
                    progress)
        self._volumes = [built[index] for index in sorted(built)]
        self._ends = list(torch.cumsum(torch.tensor([len(v.slice_indices) for v in self._volumes] or [0]), 0).tolist())
        summary = (
            f"{len(self)} slices from {len(self._volumes)} volumes"
            f"{f' ({stored} read from {self.storage_dir})' if stored else ''}"
            f"{f', {stale} stale volumes built again' if stale else ''}, {len(self.failures)} volumes skipped"
        )
        if self.failures:
            _logger.warning("%s\n%s", summary, format_failures(self.failures, "volumes"))
        else:
            _logger.info(summary)

    def _build(
        self, volumes: Any, pending: list[int], files: list[Path | None], built: dict[int, _SlicedVolume],
        mask_key: str, min_foreground_fraction: float, storage_dtype: torch.dtype, num_workers: int, progress: bool,
    ) -> None:
        """Preprocesses the volumes ``pending`` into ``built`` (stored where ``files`` says), failures into
        :attr:`failures`."""
        loader = DataLoader(
            _VolumesAndSources(volumes, pending, record_sources=self.storage_dir is not None), batch_size=None,
            num_workers=num_workers, collate_fn=no_collation,
        )
        # (tqdm first: zip then asks it once more, and the bar counts the last volume); no bar when every volume is
        # stored already
        bar = tqdm(loader, desc="preprocessing volumes", unit="volume", disable=not progress or not pending)
        for loaded, index in zip(bar, pending):
            if isinstance(loaded, Failure):
                self.failures.append(loaded)
                continue
            item, sources = loaded
            fractions = torch.as_tensor(item[mask_key]).float().mean(dim=(0, 1, 2))
            kept = torch.nonzero(fractions >= min_foreground_fraction).flatten()
            if not self._channels:
                self._channels = [int(item[key].shape[0]) for key in self.keys]
            stack = torch.cat([torch.as_tensor(item[key]).float() for key in self.keys], dim=0)
            stack = stack[..., kept].permute(3, 0, 1, 2).to(storage_dtype).contiguous()
            box = _foreground_box(torch.as_tensor(item[mask_key])[0] > 0)
            volume = _SlicedVolume(str(item.get("case_id", index)), kept.tolist(), box, stack=stack)
            built[index] = volume if files[index] is None else self._store(volume, files[index], sources)

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

    def _store(self, volume: _SlicedVolume, path: Path, sources: dict[str, Any]) -> _SlicedVolume:
        """Writes a volume's slices (the ``.npy``, then the ``.json`` that marks it complete and lists the files it was
        built from, ``sources``: :func:`_source_record`), each replacing an earlier one atomically, and forgets the
        tensor. An earlier record is removed first, so that no record ever describes another ``.npy``."""
        record_file = path.with_suffix(".json")
        record_file.unlink(missing_ok=True)
        try:
            with atomic_output(path) as temporary:
                np.save(temporary, volume.stack.numpy())
        except OSError as error:  # numpy says "N requested and M written" for a full disk
            size = volume.stack.numel() * volume.stack.element_size() / 1e6
            raise DataError(
                path, f"could not be written ({type(error).__name__}: {error}; {free_space(path.parent)})",
                f"room for {volume.case_id}'s preprocessed slices ({size:.0f} MB) in the cache folder (cache_dir)",
            ) from error
        write_json({"case_id": volume.case_id, "slice_indices": volume.slice_indices, "channels": self._channels,
                    "foreground_box": volume.foreground_box, "sources": sources,
                    "preprocessing_version": PREPROCESSING_VERSION}, record_file)
        return _SlicedVolume(volume.case_id, volume.slice_indices, volume.foreground_box, path=path)

    def _read_stored(
        self, indices: Sequence[int], files: list[Path | None], volumes: Any, built: dict[int, _SlicedVolume]
    ) -> int:
        """Puts into ``built`` the volumes among ``indices`` stored complete and up to date; returns how many were
        stored stale (built from other files than their case's now: logged, to be built again)."""
        stale = 0
        for index in indices:
            if files[index] is None:
                continue
            volume, is_stale = self._stored(files[index], volumes.data[index])
            stale += is_stale
            if volume is not None:
                built[index] = volume
        return stale

    def _stored(self, path: Path, item: Mapping[str, Any]) -> tuple[_SlicedVolume | None, bool]:
        """The volume a complete record describes, or None when there is none, it is of an earlier version (without
        ``foreground_box`` or ``sources``), or the files of ``item`` (its datalist item) are no longer those it was
        built from (logged, naming the case and the file: the volume is then built again, in place); and whether it
        was that last, stale."""
        record_file = path.with_suffix(".json")
        if not record_file.is_file():
            return None, False
        record = _read_record(record_file)
        if "foreground_box" not in record:
            return None, False
        reason, refreshed = _check_sources(record, item)
        if reason is not None:
            _logger.info("%s: %s; its slices in %s are built again", record.get("case_id", _case_name(item)), reason,
                         self.storage_dir)
            return None, True
        if refreshed is not None:
            write_json({**record, "sources": refreshed}, record_file)
        self._channels = self._channels or list(record["channels"])
        box = [(int(low), int(high)) for low, high in record["foreground_box"]]
        return _SlicedVolume(str(record["case_id"]), list(record["slice_indices"]), box, path=path), False

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


def _cache_sharing_ranks() -> tuple[int, int] | None:
    """(rank, world size) when this process is one of several of an initialised ``torch.distributed`` run, else
    None."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() < 2:
        return None
    return distributed.get_rank(), distributed.get_world_size()


#: How long a rank waits for the others to preprocess their share of a dataset. The run's own process group keeps
#: its timeout (NCCL's 10 minutes by default), which a large dataset's preprocessing would exceed; a rank that fails
#: meanwhile ends the others through torchrun, not through this timeout.
CACHE_WAIT_TIMEOUT = timedelta(hours=24)


def _wait_for_all_ranks() -> None:
    """A barrier of every rank with :data:`CACHE_WAIT_TIMEOUT`, on a CPU (gloo) group of its own: one that any
    backend of the run's group can hold, made and destroyed here."""
    distributed = torch.distributed
    group = distributed.new_group(backend="gloo", timeout=CACHE_WAIT_TIMEOUT)
    try:
        distributed.barrier(group=group)
    finally:
        distributed.destroy_process_group(group)


class FailureReportingDataset(torch.utils.data.Dataset):
    """``dataset[i]`` for each ``i`` of ``indices``, or a :class:`Failure` naming the case (its datalist item's
    ``"case_id"``) and why (:func:`agi_monai.data.failure_reason`) when loading raises an error with one of ``catch``
    in its chain of causes (MONAI's ``Compose`` wraps a transform's error in a ``RuntimeError``); any other error is
    raised. One bad case then does not stop the others.

    Args:
        dataset: the cases, e.g. a MONAI ``Dataset`` of datalist items.
        catch: the errors reported as a case's failure instead of raised: :class:`DataError` where any other error
            is a defect; ``Exception`` where every readable case must be measured and every other one named.
        indices: the items of ``dataset`` to load, in order; all of them by default.
    """

    def __init__(
        self,
        dataset: Dataset | Sequence[Any],
        catch: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.dataset = dataset
        self.catch = catch
        self.indices = list(range(len(dataset)) if indices is None else indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Any:
        index = self.indices[position]
        try:
            return self.load(index)
        except Exception as error:
            if not any(isinstance(cause, self.catch) for cause in cause_chain(error)):
                raise
            cases = getattr(self.dataset, "data", None)
            case_id = str(cases[index].get("case_id", index)) if cases is not None else str(index)
            return Failure(case_id, failure_reason(error))

    def load(self, index: int) -> Any:
        """Item ``index`` of the dataset; a subclass may return more with it."""
        return self.dataset[index]


class _VolumesAndSources(FailureReportingDataset):
    """(A preprocessed volume, the files it is read from when ``record_sources``, else None), or the
    :class:`Failure` of a volume whose preprocessing hits a :class:`DataError`."""

    def __init__(self, volumes: Dataset | Sequence[Mapping[str, Any]], indices: Sequence[int],
                 record_sources: bool) -> None:
        super().__init__(volumes, DataError, indices)
        self.record_sources = record_sources  # each volume's datalist item's files (_source_record) with it

    def load(self, index: int) -> tuple[Any, dict[str, Any] | None]:
        # the files' state is taken before they are read: one replaced meanwhile shows as changed at the next build
        sources = _source_record(self.dataset.data[index]) if self.record_sources else None
        return self.dataset[index], sources


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
