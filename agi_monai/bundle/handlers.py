"""Adapters between engine outputs/batches and MONAI handlers (``output_transform``, ``batch_transform``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai.utils import ImageMetaKey

__all__ = ["loss_terms", "slice_names"]


def loss_terms(output: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The scalar ``*_loss`` entries of a trainer's ``state.output`` (a dict, or its decollated list of
    dicts, where each item repeats the batch's losses), for ``StatsHandler``/``TensorBoardStatsHandler``:
    they would otherwise warn about every image tensor in the output."""
    first = output if isinstance(output, Mapping) else output[0]
    return {key: float(value) for key, value in first.items() if key.endswith("_loss")}


def slice_names(batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Names ``<case_id>#<slice_index>`` for the rows of ``MetricsSaver``'s per-image CSV, from slice items
    (:class:`agi_monai.data.SliceDataset` has no image metadata to take file names from)."""
    if isinstance(batch, Mapping):
        items = [{"case_id": c, "slice_index": s} for c, s in zip(batch["case_id"], batch["slice_index"])]
    else:
        items = list(batch)
    return [{ImageMetaKey.FILENAME_OR_OBJ: f"{item['case_id']}#{int(item['slice_index'])}"} for item in items]
