"""The per-case evaluator of the bundles' ``evaluate.json``: every test case synthesized whole, slice by slice,
then measured under the chosen metric protocols; one row per case.

A MONAI ``Evaluator`` (an Ignite engine): one iteration is one case (load and preprocess, ``SliceInferer``,
clip to [0, 1], :func:`agi_monai.evaluation.evaluate_volume`). A case that fails anywhere (unreadable file,
out of memory...) is logged with its reason and listed in the summary; the others continue (MONAI's
``SupervisedEvaluator`` would stop at the first exception, so loading happens inside the iteration, behind a
dataset wrapper that returns the failure instead of raising). At the end of the epoch the per-case CSV, the
summary JSON and the markdown table are written atomically (:func:`agi_monai.evaluation.tables.write_evaluation`)
and the means go into ``engine.state.metrics`` as ``<protocol>_<metric>`` for ``StatsHandler``.

MONAI's ``MetricsSaver`` is not used for the CSV: it writes one file per metric, non-atomically, and its
summary cannot carry the protocol (data range, mask policy) that every number here must state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import Dataset
from monai.data.utils import no_collation
from monai.engines import Evaluator
from monai.inferers import Inferer
from torch.utils.data import DataLoader

from agi_monai.engines.inference import infer_case
from agi_monai.data import Failure, build_volume_dataset, failure_reason, preprocessing_transforms
from agi_monai.data.datasets import FailureReportingDataset
from agi_monai.evaluation.protocols import (
    METRIC_NAMES,
    PROTOCOL_NAMES,
    ProtocolResult,
    evaluate_volume,
    protocol_record,
)
from agi_monai.evaluation.tables import case_row, write_evaluation

__all__ = ["CaseEvaluator", "VolumeEvaluator", "volume_dataset"]

_logger = logging.getLogger(__name__)


def volume_dataset(
    data: Sequence[Mapping[str, Any]],
    inputs: Sequence[str],
    target: str,
    spatial_size: Sequence[int],
    **preprocessing_options: Any,
) -> Dataset:
    """Preprocessed whole volumes (``"image"``, ``"target"``, ``"mask"``, ``"case_id"``) of datalist items, for
    :class:`VolumeEvaluator`: the bundles' chain (:func:`agi_monai.data.preprocessing_transforms`) without a
    cache, each case read once. Named ``data`` like :func:`agi_monai.data.slice_dataset`, so that
    ``validate#dataset#data`` stays the id a caller replaces.

    The target is divided by its 99.5th percentile like the inputs but not clipped (``clip_target=False``):
    :func:`~agi_monai.evaluation.evaluate_volume` clips it for ``slice2d`` (the paper's [0, 1] images) and
    gives it whole to ``brasyn3d``, whose percentiles inside the brain must come from the real intensities (on
    BraTS the volume's 99.5th percentile is about the brain's 97th, so clipping at it flattened the top 3 % of
    the brain, the enhancing tumour of a T1Gd among them, before BraSyn's normalisation).

    The mask keeps only the voxels every contrast covers (``coverage="voxels"``,
    :class:`agi_monai.data.transforms.RestrictToCoveraged`): a contrast resampled onto the reference grid is zero
    outside its field of view, and the zeros of a target (or the guesses from a zero-filled input) there would be
    scored as if they were the case's anatomy. Each case with voxels left out gets a
    warning counting them and naming the contrast. Unmasked protocols (``mask_key=None``) still measure whole
    slices or volumes, those voxels included."""
    options = {"clip_target": False, "coverage": "voxels", **preprocessing_options}
    return build_volume_dataset(data, preprocessing_transforms(inputs, target, spatial_size, **options))


class CaseEvaluator(Evaluator):
    """A MONAI ``Evaluator`` (Ignite engine) whose iteration is one whole case: loaded (behind a wrapper that turns
    a loading error into a :class:`Failure`), then :meth:`evaluate_case`. A case that fails anywhere is logged
    with its reason and kept in :attr:`failures`; the others go on (MONAI's ``SupervisedEvaluator`` would stop at
    the first exception). :meth:`record` keeps a measured case's rows in :attr:`rows`; :meth:`write` runs at the
    end of the epoch, after which ``val_handlers`` (e.g. ``StatsHandler``) see its ``engine.state.metrics``.

    Args:
        device: where the network runs.
        dataset: whole preprocessed cases whose ``data`` items carry ``"case_id"``.
        output_dir: where :meth:`write` writes.
        description: written at the top of the summary (scenario, network, checkpoint...).
        val_handlers: Ignite/MONAI handlers, attached after the evaluator's own end-of-epoch writer.
        amp: autocast the network on CUDA.
        num_workers: processes loading and preprocessing cases ahead of the network.
    """

    def __init__(
        self,
        device: str | torch.device,
        dataset: Dataset,
        output_dir: str | Path,
        description: Mapping[str, Any] | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        num_workers: int = 0,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset holds no case to evaluate (is the split empty?)")
        device = torch.device(device)
        # any exception, not only a DataError as when slice datasets are built: an evaluation must end with every
        # readable case measured and every other one named
        loader = DataLoader(FailureReportingDataset(dataset, catch=Exception), batch_size=None,
                            collate_fn=no_collation, num_workers=num_workers)
        super().__init__(device=device, val_data_loader=loader, epoch_length=len(dataset), decollate=False,
                         amp=amp and device.type == "cuda")
        self.output_dir = Path(output_dir)
        self.description = dict(description or {})
        self.rows: list[dict[str, Any]] = []
        self.failures: list[Failure] = []
        self.add_event_handler(Events.EPOCH_STARTED, self._reset)
        self.add_event_handler(Events.EPOCH_COMPLETED, self.write)
        if val_handlers:
            self._register_handlers(val_handlers)

    def evaluate_case(self, item: Mapping[str, Any]) -> Any:
        """Measures one loaded case; raises on failure."""
        raise NotImplementedError

    def record(self, case_id: str, measured: Any) -> dict[str, Any]:
        """Keeps what :meth:`evaluate_case` measured (in :attr:`rows`...); returns the iteration's output."""
        raise NotImplementedError

    def write(self, engine: Engine) -> None:
        """Writes the per-case table and summary, and puts the means into ``engine.state.metrics``."""
        raise NotImplementedError

    def _iteration(self, engine: Engine, item: Any) -> dict[str, Any]:  # type: ignore[override]
        if isinstance(item, Failure):
            return self._failed(item)
        case_id = str(item.get("case_id", f"case_{engine.state.iteration}"))
        try:
            measured = self.evaluate_case(item)
        except Exception as error:  # one bad case must not stop the others; the reason is reported
            return self._failed(Failure(case_id, failure_reason(error)))
        return {"case_id": case_id, **self.record(case_id, measured)}

    def _failed(self, failure: Failure) -> dict[str, Any]:
        _logger.error("%s", failure)
        self.failures.append(failure)
        return {"case_id": failure.case_id, "failure": failure}

    def _reset(self, engine: Engine) -> None:
        self.rows, self.failures = [], []

    def _print_summary(self, cases: int, table: Path) -> None:
        """The one-line summary, then each failed case."""
        lines = [f"evaluated {cases} of {cases + len(self.failures)} cases into {table}, {len(self.failures)} failed"]
        print("\n".join(lines + [f"  - {failure}" for failure in self.failures]), flush=True)


class VolumeEvaluator(CaseEvaluator):
    """Synthesize each case of ``dataset`` whole and measure it under ``protocols``; write per-case rows.

    The bundles' ``evaluate.json`` wires it as ``validate#evaluator``::

        "validate#evaluator": {"_target_": "agi_monai.evaluation.VolumeEvaluator", "device": "@device",
            "dataset": "@validate#dataset", "network": "@network", "inferer": "@validate#inferer",
            "output_dir": "@output_dir", "protocols": "@protocols", "val_handlers": "@validate#handlers"}

    Writes into ``output_dir`` (see :mod:`agi_monai.evaluation.tables`): ``metrics_per_case.csv``,
    ``metrics_summary.json``, ``metrics_summary.md``. ``engine.state.output`` of an iteration is
    ``{"case_id", "results": {protocol: ProtocolResult}}`` or ``{"case_id", "failure": Failure}``; after the run
    :attr:`rows`, :attr:`results` and :attr:`failures` hold every case.

    Args:
        device: where the network runs.
        dataset: whole preprocessed volumes whose ``data`` items carry ``"case_id"`` (:func:`volume_dataset`).
        network: the generator (weights loaded, e.g. by a ``CheckpointLoader`` in ``val_handlers``).
        inferer: maps (1, C, H, W, D) to (1, 1, H, W, D), e.g. ``SliceInferer(roi_size, spatial_dim=2)``.
        output_dir: where the CSV, JSON and markdown go.
        protocols: any of ``"slice2d"`` (the paper's 2D per-slice) and ``"brasyn3d"`` (BraSyn 3D).
        mask_key: the item key of the brain mask; None evaluates whole slices/volumes.
        min_foreground_fraction: ``"slice2d"``: slices whose mask covers less are not evaluated.
        region: ``"slice2d"``: ``"mask"`` (metrics inside the mask) or ``"slice"`` (whole slices).
        percentiles: ``"brasyn3d"``: the ground truth's percentiles mapped to 0 and 1.
        image_key: item key of the stacked inputs (C, H, W, D).
        target_key: item key of the real contrast (1, H, W, D).
        description: written at the top of the summary (scenario, network, checkpoint...).
        val_handlers: Ignite/MONAI handlers, attached after the evaluator's own end-of-epoch writer (so that
            ``StatsHandler`` sees the means).
        amp: autocast the network on CUDA.
        num_workers: processes loading and preprocessing cases ahead of the network.
    """

    def __init__(
        self,
        device: str | torch.device,
        dataset: Dataset,
        network: torch.nn.Module,
        inferer: Inferer,
        output_dir: str | Path,
        protocols: Sequence[str] = PROTOCOL_NAMES,
        mask_key: str | None = "mask",
        min_foreground_fraction: float = 0.05,
        region: str = "mask",
        percentiles: Sequence[float] = (0.5, 99.5),
        image_key: str = "image",
        target_key: str = "target",
        description: Mapping[str, Any] | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        num_workers: int = 0,
    ) -> None:
        if not protocols or any(name not in PROTOCOL_NAMES for name in protocols):
            raise ValueError(f"protocols {list(protocols)}: expected a non-empty list of {list(PROTOCOL_NAMES)}")
        super().__init__(device, dataset, output_dir, description, val_handlers, amp, num_workers)
        self.network = network
        self.inferer = inferer
        self.protocols = list(protocols)
        self.protocol_options = {
            "min_foreground_fraction": min_foreground_fraction, "region": region, "percentiles": tuple(percentiles),
        }
        self.mask_key = mask_key
        self.image_key = image_key
        self.target_key = target_key
        self.results: dict[str, dict[str, ProtocolResult]] = {}

    def record(self, case_id: str, measured: dict[str, ProtocolResult]) -> dict[str, Any]:
        self.results[case_id] = measured
        self.rows.append(case_row(case_id, measured))
        _logger.info("%s: %s", case_id, "; ".join(
            f"{name} " + " / ".join(f"{value:.3f}" for value in result.metrics.values())
            for name, result in measured.items()
        ))
        return {"results": measured}

    def evaluate_case(self, item: Mapping[str, Any]) -> dict[str, ProtocolResult]:
        prediction = infer_case(self.network, self.inferer, item[self.image_key], self.state.device, self.amp)
        # clipped as inference.json writes it: the generator has no output activation
        prediction = prediction.clamp(0.0, 1.0)
        mask = item[self.mask_key] if self.mask_key is not None else None
        return evaluate_volume(prediction, item[self.target_key], mask, self.protocols, **self.protocol_options)

    def _reset(self, engine: Engine) -> None:
        super()._reset(engine)
        self.results = {}

    def write(self, engine: Engine) -> None:
        protocols = {}
        for results in self.results.values():
            protocols.update({name: result.protocol for name, result in results.items()})
        if not protocols:  # every case failed: state the protocols as configured (no metrics to compute)
            protocols = {name: protocol_record(name, self.mask_key is not None, **self.protocol_options)
                         for name in self.protocols}
        paths = write_evaluation(self.rows, protocols, self.output_dir, self.failures, self.description)
        for name in protocols:
            for metric in METRIC_NAMES:
                values = [row[f"{name}_{metric}"] for row in self.rows]
                engine.state.metrics[f"{name}_{metric}"] = sum(values) / len(values) if values else float("nan")
        self._print_summary(len(self.rows), paths["cases"])

