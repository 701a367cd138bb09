"""Datalist splits as the bundle configs need them (``train#datalist``; ``train#dataset#data``, the id MONAI
Label overrides, is a list of datalist items fed to :func:`agi_monai.data.slice_dataset`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agi_monai.data import DataError, discover_cases

__all__ = ["DATALIST_NAME", "load_split"]

_logger = logging.getLogger(__name__)

#: The datalist ``scripts/prepare_ixi.py`` / ``prepare_brats.py`` write, looked for inside ``dataset_dir``.
DATALIST_NAME = "datalist.json"


def load_split(
    source: str | Path, split: str, contrasts: Sequence[str], allow_empty: bool = True
) -> list[dict[str, Any]]:
    """The cases of one split having every contrast in ``contrasts``.

    ``source`` is a JSON datalist, a folder holding ``datalist.json`` (read as the datalist), or a plain folder
    of cases: then there is no split, and every split is the whole folder (a warning says so; use
    ``scripts/prepare_*.py`` to write a datalist with held-out cases). Skipped cases are logged by name
    (by :func:`agi_monai.data.discover_cases`).

    Args:
        source: JSON datalist or folder (``dataset_dir`` in the configs).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        contrasts: contrasts each case needs (the inputs, plus the target for training and evaluation).
        allow_empty: return an empty list when no case qualifies; False (``train.json``: training and validation
            need a case) raises instead, naming ``source`` and listing the skipped cases.

    Raises:
        DataError: ``source`` does not exist or is not a datalist with ``split``; or, with ``allow_empty=False``,
            no case of the split has every contrast.
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
    if not discovery.cases and not allow_empty:
        skipped = "".join(f"; skipped {failure}" for failure in discovery.failures)
        raise DataError(
            source, f"no case of the {split!r} split has {', '.join(contrasts)}{skipped}",
            f"at least one case with each of {', '.join(contrasts)}",
        )
    return discovery.cases  # discovery has logged each skipped case
