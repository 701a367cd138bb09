"""Datalist splits as the bundle configs need them (``train#datalist``; ``train#dataset#data``, the id MONAI
Label overrides, is a list of datalist items fed to :func:`agi_monai.data.slice_dataset`), and the checks
``train.json``'s ``initialize`` runs before any work: every split read and checked before any slice is built
(:func:`check_splits`), slice sizes the network takes (:func:`check_spatial_size`), and a training set that makes at
least one batch (:func:`check_batches`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from agi_monai.data import DataError, Discovery, Failure, PatchDataset, canonical_contrast, discover_cases
from agi_monai.data.volumes import missing_file_error, source_paths

__all__ = [
    "DATALIST_NAME", "check_batches", "check_networks", "check_segmentation_sizes", "check_spatial_size", "check_splits",
    "check_training_length", "discover_split", "discovery_source", "load_split",
]

_logger = logging.getLogger(__name__)

#: The datalist ``scripts/prepare_ixi.py`` / ``prepare_brats.py`` write, looked for inside ``dataset_dir``.
DATALIST_NAME = "datalist.json"


def load_split(
    source: str | Path,
    split: str,
    contrasts: Sequence[str],
    allow_empty: bool = True,
    require_files: bool = False,
) -> list[dict[str, Any]]:
    """The cases of one split having every contrast in ``contrasts``.

    ``source`` is a JSON datalist, a folder holding ``datalist.json`` (read as the datalist), or a plain folder
    of cases: then there is no split, and every split is the whole folder (a warning says so; use
    ``scripts/prepare_*.py`` to write a datalist with held-out cases). Skipped cases are logged by name
    (by :func:`agi_monai.data.discover_cases`, and here for ``require_files``).

    Args:
        source: JSON datalist or folder (``dataset_dir`` in the configs).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        contrasts: contrasts each case needs (the inputs, plus the target for training and evaluation).
        allow_empty: return an empty list when no case qualifies; False (``train.json``: training and validation
            need a case) raises instead, naming ``source`` and listing the skipped cases.
        require_files: also skip the cases whose files of ``contrasts`` do not exist (``train.json``: a missing
            file is then reported when the datalist is read, not minutes later while the slices are built). Only
            existence is checked: reading every volume would cost as much as preprocessing it, so an unreadable
            file is still reported (and its case skipped) by the preprocessing.

    Raises:
        DataError: ``source`` does not exist or is not a datalist with ``split``; or, with ``allow_empty=False``,
            no case of the split has every contrast (and, with ``require_files``, its files).
    """
    discovery = discover_split(source, split, contrasts)
    source = discovery_source(source)
    cases, failures = discovery.cases, list(discovery.failures)  # discovery has logged its skipped cases
    if require_files:
        cases = []
        for case in discovery.cases:
            missing = _missing_file(case, contrasts)
            if missing is None:
                cases.append(case)
            else:
                failures.append(Failure(case["case_id"], str(missing)))
                _logger.warning("skipped %s", failures[-1])
    if not cases and not allow_empty:
        raise DataError(
            source, f"no case of the {split!r} split has {', '.join(contrasts)}",
            f"at least one case with each of {', '.join(contrasts)}",
            "; ".join(f"skipped {failure}" for failure in failures),
        )
    return cases


def discovery_source(source: str | Path) -> Path:
    """What ``dataset_dir`` names: a JSON datalist, the ``datalist.json`` of a folder holding one, or a plain folder."""
    source = Path(source)
    return source / DATALIST_NAME if source.is_dir() and (source / DATALIST_NAME).is_file() else source


def discover_split(source: str | Path, split: str, contrasts: Sequence[str]) -> Discovery:
    """The cases of one split that have every contrast of ``contrasts``, and those left out with the reason
    (``failures``): :func:`load_split` keeps the cases; the segmentation bundle's ``evaluate.json`` gives the failures
    to its evaluator, whose summary lists them (a labelled case without ``seg`` disappeared from it unreported).
    ``source`` as for :func:`load_split`; a plain folder's cases serve as every split, with a warning.

    Raises:
        DataError: ``source`` does not exist or is not a datalist with ``split``.
    """
    source = discovery_source(source)
    if not source.is_dir():
        return discover_cases(source, required=contrasts, split=split)
    discovery = discover_cases(source, required=contrasts)
    if discovery.cases:  # (none: the callers say so)
        _logger.warning("%s has no %s: its %d cases serve as the %r split (and as every other split)",
                        source, DATALIST_NAME, len(discovery.cases), split)
    return discovery


def check_segmentation_sizes(
    network: torch.nn.Module,
    roi_size: Sequence[int] | None = None,
    sw_roi_size: Sequence[int] | None = None,
    spatial_size: Sequence[int] | None = None,
) -> None:
    """Raises unless the sizes the segmenter is fed fit it: an ``initialize`` step of the segmentation bundle's
    ``train.json`` (``roi_size``, ``sw_roi_size``, ``spatial_size``), ``evaluate.json`` and ``inference.json``
    (``sw_roi_size``), before any case is read. SegResNet halves a patch ``len(blocks_down) - 1`` times and adds the
    skip connections back, so every side of a patch must be a multiple of ``2 ** (len(blocks_down) - 1)`` (8 for the
    zoo's ``[1, 2, 2, 4]``): before, ``--roi_size [60,60,30]`` failed at the first iteration, after the
    preprocessing, on "The size of tensor a (16) must match the size of tensor b (15)". The training patch is the
    random crop of ``roi_size`` from the preprocessed volume, whose in-plane sides are ``spatial_size``: where
    ``roi_size`` is larger, the crop is ``spatial_size``, which must then be a multiple too. (A volume of fewer axial
    slices than ``roi_size[2]`` gives a crop of its own depth, unknown before it is read.) The sliding window pads a
    smaller volume up to ``sw_roi_size``, so only that size matters there.

    Args:
        network: the segmenter (its ``blocks_down`` sets the multiple; another network: positive sizes only).
        roi_size: the random training crop (three sides); None: not checked.
        sw_roi_size: the validation/evaluation/inference sliding window (three sides); None: not checked.
        spatial_size: the in-plane pad/crop (two sides); None: not checked.

    Raises:
        ValueError: naming the setting, its value and the multiple.
    """
    blocks = getattr(network, "blocks_down", None)
    multiple = 2 ** (len(blocks) - 1) if isinstance(blocks, Sequence) and len(blocks) else 1
    why = (f", multiples of {multiple}: {type(network).__name__} halves each side {len(blocks) - 1} times"
           if multiple > 1 else "")

    def sides(name: str, value: Any, count: int) -> list[int]:
        values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else []
        if len(values) != count or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"--{name} {value!r}: expected {count} positive whole sizes")
        return values

    plane = sides("spatial_size", spatial_size, 2) if spatial_size is not None else None
    for name, value in (("roi_size", roi_size), ("sw_roi_size", sw_roi_size)):
        if value is None:
            continue
        size = sides(name, value, 3)
        if any(side % multiple for side in size):
            raise ValueError(f"--{name} {value!r}: expected three patch sides{why} (e.g. [224, 224, 144])")
        if name == "roi_size" and plane is not None:
            crop = [min(r, p) for r, p in zip(size[:2], plane)]
            if any(side % multiple for side in crop):
                raise ValueError(
                    f"--spatial_size {spatial_size!r} with --roi_size {roi_size!r}: the training crop is {crop} "
                    f"in-plane, the smaller of the two; expected sides{why} (a --spatial_size that is, or a "
                    "--roi_size no larger than it)"
                )


def _missing_file(case: Mapping[str, Any], contrasts: Sequence[str]) -> DataError | None:
    """The first file of ``contrasts`` that ``case`` lists but that does not exist, as the error to report."""
    for contrast in map(canonical_contrast, contrasts):
        source = case[contrast]
        if isinstance(source, (str, Path)):  # a NIfTI file, or a DICOM series folder
            missing = missing_file_error(source)
            if missing is not None:
                return missing
        else:  # the files of a DICOM series, or of one echo of multi-frame files
            files = source_paths(source)
            gone = [name for name in files if not Path(name).exists()]
            if gone:
                return DataError(gone[0], f"file not found ({len(gone)} of the {len(files)} files of the "
                                 f"{contrast} DICOM series are missing)", "every file of the series")
    return None


def check_splits(**splits: Sequence[Mapping[str, Any]]) -> None:
    """Logs how many cases each split holds; raises when one holds none.

    An ``initialize`` step of ``train.json``, given ``@train#dataset#data`` and ``@validate#dataset#data``: resolving
    them there reads (and checks, :func:`load_split`) every split before any dataset is built. Without it MONAI
    resolves ``train#trainer`` depth-first, so the training slices (minutes at the paper's scale) were built before
    the validation split was even read. It raises itself for a list given directly (MONAI Label overrides
    ``train#dataset#data`` and ``validate#dataset#data``), where :func:`load_split` never ran.

    Args:
        splits: split name (``training``, ``validation``) -> its datalist items.

    Raises:
        DataError: a split holds no case.
    """
    for name, items in splits.items():
        if not len(items):
            raise DataError(f"the {name!r} split", "holds no case", "at least one case")
    _logger.info("datalist: %s", ", ".join(f"{len(items)} {name} cases" for name, items in splits.items()))


def check_spatial_size(spatial_size: Any, spatial_dims: int) -> None:
    """Raises unless ``spatial_size`` (``--spatial_size``, the in-plane pad/crop of every slice) is two positive sizes,
    multiples of :attr:`agi_monai.networks.ResUNet.SIZE_MULTIPLE` for a 2D network (which takes the slices whole; the
    3D bundle's network takes ``--patch_size`` patches, checked by :class:`agi_monai.data.PatchDataset`). An
    ``initialize`` step of ``train.json`` and ``inference.json``, before any dataset is built: before, a size the
    network cannot take failed at the first iteration, after the preprocessing, and a malformed one inside a MONAI
    transform ("Sequence must have length 3, got 2")."""
    from agi_monai.networks import ResUNet

    multiple = ResUNet.SIZE_MULTIPLE if spatial_dims == 2 else 1
    sizes = list(spatial_size) if isinstance(spatial_size, Sequence) and not isinstance(spatial_size, str) else []
    if len(sizes) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 and n % multiple == 0
                                  for n in sizes):
        network = f", multiples of {multiple}: the network halves them three times" if multiple > 1 else ""
        raise ValueError(
            f"--spatial_size {spatial_size!r}: expected two positive in-plane sizes (h, w){network} (e.g. [240, 240])"
        )


def check_training_length(epochs: Any, val_interval: Any, learning_rate: Any = None) -> None:
    """Raises unless ``--epochs`` and ``--val_interval`` (the iterations of an epoch: validation and checkpoint come
    after each) are positive whole numbers, and ``--learning_rate`` (when given) a positive finite number.
    An ``initialize`` step of ``train.json``, before any dataset is built: before, ``--val_interval 0`` exited 0 having
    trained nothing, ``-1`` made an epoch one pass over the data, ``1.5`` trained without end and never validated or
    checkpointed, ``--epochs 1.5`` ran two epochs reported as "of 1.5", ``--learning_rate -1`` failed in torch
    ("Invalid learning rate: -1", naming no setting) and ``0`` trained nothing on a fresh start but was refused on a
    resume, after the preprocessing."""
    meanings = {"epochs": "epochs to train", "val_interval": "training iterations per epoch (each epoch ends with a "
                "validation and a checkpoint)"}
    for name, value in (("epochs", epochs), ("val_interval", val_interval)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name} {value!r}: expected a positive whole number of {meanings[name]}")
    if learning_rate is not None and not (
        isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool)
        and math.isfinite(learning_rate) and learning_rate > 0
    ):
        raise ValueError(f"--learning_rate {learning_rate!r}: expected a positive number (the paper's is 1e-4)")


def check_networks(*networks: Any) -> None:
    """``train.json``'s step before the datasets: resolving it builds the config's networks, so that a setting they
    refuse (``--network_def#channels`` not a multiple of ``groups``, a stage name...) fails before the preprocessing
    (hours at the paper's scale) rather than when the trainer is built after it. Raises unless each is a
    ``torch.nn.Module``."""
    for network in networks:
        if not isinstance(network, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module from the config's network settings, got {type(network).__name__}")


def check_batches(dataloader: DataLoader, split: str) -> None:
    """Raises when an epoch of ``dataloader`` has no batch (``train.json``'s ``initialize``, after the dataset is
    built, before training).

    With ``drop_last`` (the training loader) and fewer usable slices than ``batch_size`` per process, an epoch has
    no batch: the run "trains" its epochs without one iteration, validates the untrained generator and saves it as
    the best model, and its summary says "nothing to train" as if the epochs were done. Raising, rather than
    dropping ``drop_last`` for so small a set, keeps the configured batch size (the recipe's, and the PatchGAN's
    batch-norm statistics): a training set smaller than one batch is a mistake to fix (a wrong datalist, a
    ``--batch_size`` meant for another set), not a run to go on with. Under DDP a process without a validation
    batch would leave the others waiting in the metric's all-reduce, so ``multi_gpu_train.json`` checks validation
    too.

    Args:
        dataloader: the split's loader (``@train#dataloader``), its dataset built.
        split: the split's name, for the message.

    Raises:
        DataError: naming the split, its usable slices (per process under DDP), the batch size and what to change.
    """
    if len(dataloader):
        return
    dataset, sampler, batch_size = dataloader.dataset, dataloader.sampler, dataloader.batch_size
    patches = isinstance(dataset, PatchDataset)  # the 3D bundle's: patches (training) or whole volumes (validation)
    whole_volumes = patches and dataset.patch_size is None
    singular, plural = ("volume", "volumes") if whole_volumes else ("patch", "patches") if patches else ("slice", "slices")

    def unit(count: int) -> str:
        return singular if count == 1 else plural

    items = f"{len(dataset)} usable {unit(len(dataset))}"
    if hasattr(dataset, "case_ids") and not whole_volumes:  # an agi_monai.data.SliceDataset or PatchDataset
        items += f" from {len(dataset.case_ids)} volume{'s' if len(dataset.case_ids) != 1 else ''}"
    per_process = ""
    if isinstance(sampler, DistributedSampler):
        items += f", {len(sampler)} of them for this process of {sampler.num_replicas}"
        per_process = " per process"
    if whole_volumes:  # one volume a batch: only more cases (or fewer processes) help
        remedies = f"more {split} cases or fewer processes"
    elif patches:
        remedies = (
            f"a smaller --batch_size, more {split} cases, or a larger --samples_per_volume, to draw more patches per "
            "volume"
        )
    else:
        config_id = {"training": "train", "validation": "validate"}.get(split, split)
        option = f"--{config_id}#dataset#min_foreground_fraction"
        fraction = getattr(dataset, "min_foreground_fraction", None)  # a SliceDataset's: the override, or the default
        lower = f"a {option} below {fraction:g} (the value used)" if fraction is not None else f"a lower {option}"
        remedies = f"a smaller --batch_size, more {split} cases, or {lower}, to keep more slices per volume"
    raise DataError(
        f"the {split!r} split",
        f"{items} make{'s' if len(dataset) == 1 else ''} no batch of batch_size {batch_size}"
        f"{' with drop_last' if dataloader.drop_last else ''}, so an epoch would have no iteration",
        f"at least {batch_size} {unit(batch_size)}{per_process}: {remedies}",
    )
