"""Datalist splits and slice datasets as the bundle configs need them (``train#dataset#data`` is a list of
datalist items, the id MONAI Label overrides)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agi_monai.data import SliceDataset, build_volume_dataset, discover_cases, preprocessing_transforms

__all__ = ["DATALIST_NAME", "load_split", "slice_dataset"]

_logger = logging.getLogger(__name__)

#: The datalist ``scripts/prepare_ixi.py`` / ``prepare_brats.py`` write, looked for inside ``dataset_dir``.
DATALIST_NAME = "datalist.json"


def load_split(source: str | Path, split: str, contrasts: Sequence[str]) -> list[dict[str, Any]]:
    """The cases of one split having every contrast in ``contrasts``.

    ``source`` is a JSON datalist, a folder holding ``datalist.json`` (read as the datalist), or a plain folder
    of cases: then there is no split, and every split is the whole folder (a warning says so; use
    ``scripts/prepare_*.py`` to write a datalist with held-out cases). Skipped cases are logged by name
    (by :func:`agi_monai.data.discover_cases`).

    Args:
        source: JSON datalist or folder (``dataset_dir`` in the configs).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        contrasts: contrasts each case needs (the inputs, plus the target for training and evaluation).
    """
    source = Path(source)
    if source.is_dir() and (source / DATALIST_NAME).is_file():
        source = source / DATALIST_NAME
    if source.is_dir():
        discovery = discover_cases(source, required=contrasts)
        _logger.warning(
            "%s has no %s: its %d cases serve as the %r split (and as every other split)",
            source, DATALIST_NAME, len(discovery.cases), split,
        )
    else:
        discovery = discover_cases(source, required=contrasts, split=split)
    return discovery.cases  # discovery has logged each skipped case


def slice_dataset(
    data: Sequence[Mapping[str, Any]],
    inputs: Sequence[str],
    target: str,
    spatial_size: Sequence[int],
    cache_dir: str | Path | None = None,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    min_foreground_fraction: float = 0.05,
    num_workers: int = 0,
    progress: bool = True,
) -> SliceDataset:
    """2D axial training/validation items from datalist items: the bundles' preprocessing
    (:func:`agi_monai.data.preprocessing_transforms`, cached per volume in ``cache_dir``) then
    :class:`agi_monai.data.SliceDataset`. Like :func:`agi_monai.data.build_slice_dataset`, but from items
    rather than a folder, so that ``train#dataset#data`` can be replaced by a caller (MONAI Label).

    The volumes are cached in a subfolder of ``cache_dir`` named after the scenario and size (e.g.
    ``T1_T2_to_PD_256x256``): MONAI's ``PersistentDataset`` keys its cache by the items only, so one folder
    must never serve two preprocessing configurations.
    """
    preprocessing = preprocessing_transforms(inputs, target, spatial_size)
    if cache_dir is not None:
        cache_dir = Path(cache_dir) / f"{'_'.join(inputs)}_to_{target}_{'x'.join(str(s) for s in spatial_size)}"
    return SliceDataset(
        build_volume_dataset(data, preprocessing, cache_dir),
        min_foreground_fraction=min_foreground_fraction,
        transform=transform,
        num_workers=num_workers,
        progress=progress,
    )
