"""Running a scenario bundle's own recipe from Python at a chosen budget: the README demo, the equal-budget
comparison and the ablations train through here, so that what they measure is what ``python -m monai.bundle run``
does.

The budget is a bundle config file of overrides merged over ``train.json`` (MONAI merges a list of config files),
written next to the run: ``<bundle_root>/overrides.json``, and the equivalent command is logged, so any run can
be repeated by hand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.inferers import SliceInferer

from agi_monai.data import write_json

__all__ = ["TrainingRun", "budget_overrides", "synthesize_volume", "train_bundle"]

_logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What :func:`train_bundle` did: where the weights are, and how long it took."""

    bundle_root: Path
    weights: Path
    overrides_file: Path
    command: str
    iterations: int
    seconds: float
    last_losses: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle_root": str(self.bundle_root), "weights": str(self.weights), "overrides": str(self.overrides_file),
            "command": self.command, "iterations": self.iterations, "seconds": round(self.seconds, 1),
            "last_losses": {k: round(v, 4) for k, v in self.last_losses.items()},
        }


def budget_overrides(
    dataset_dir: str | Path,
    iterations: int,
    batch_size: int = 8,
    crop_size: int | None = 128,
    learning_rate: float | None = None,
    channels: Sequence[int] | None = None,
    discriminator_channels: int | None = None,
    intensity_augmentation: float = 0.0,
    device: str | torch.device | None = None,
    network: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """``train.json`` overrides for a short run: one epoch of ``iterations`` batches, so the bundle validates
    once, after the last iteration (``models/model.pt`` is then the final generator), no worker processes.

    Args:
        dataset_dir: a datalist JSON or folder (the bundle's ``dataset_dir``).
        iterations: training iterations (batches).
        batch_size: items per batch.
        crop_size: random square training crops of this side (MONAI ``RandSpatialCropd``); None for whole slices.
        learning_rate: Adam's learning rate of both networks; None keeps the bundle's (the paper's 1e-4).
        channels: generator widths (``network_def#channels``); None keeps the bundle's.
        discriminator_channels: PatchGAN width; None keeps the bundle's.
        intensity_augmentation: each input channel scaled by a random factor in [1 - a, 1 + a]
            (``RandScaleIntensityd``); 0 for none.
        device: e.g. ``"cpu"``; None keeps the bundle's choice (CUDA when available).
        network: generator class (``network_def#_target_``), e.g. ``"agi_monai.networks.ResUNet"``.
        extra: further overrides, by config id (``"network_def#groups": 4``...).
    """
    overrides: dict[str, Any] = {
        "dataset_dir": str(dataset_dir),
        "epochs": 1,
        "val_interval": int(iterations),
        "batch_size": int(batch_size),
        "num_workers": 0,
    }
    if device is not None:
        overrides["device"] = f"$torch.device('{device}')"
    if network is not None:
        overrides["network_def#_target_"] = network
    if channels is not None:
        overrides["network_def#channels"] = [int(c) for c in channels]
    if discriminator_channels is not None:
        overrides["discriminator_def#channels"] = int(discriminator_channels)
    if learning_rate is not None:
        overrides["learning_rate"] = float(learning_rate)
    augmentation = []
    if crop_size is not None:
        augmentation.append({"_target_": "RandSpatialCropd", "keys": ["image", "target", "mask"],
                             "roi_size": [int(crop_size)] * 2, "random_size": False})
    if intensity_augmentation > 0:
        augmentation.append({"_target_": "RandScaleIntensityd", "keys": "image", "factors": intensity_augmentation,
                             "prob": 1.0, "channel_wise": True})
    if augmentation:
        overrides["train#dataset#transform"] = {"_target_": "Compose", "transforms": augmentation}
    overrides.update(extra)
    return overrides


def train_bundle(bundle: str | Path, bundle_root: str | Path, overrides: Mapping[str, Any]) -> TrainingRun:
    """Runs ``<bundle>/configs/train.json`` merged with ``overrides`` (written to ``<bundle_root>/overrides.json``)
    in ``bundle_root`` (its ``models/`` and logs go there; the bundle folder is only read).

    Raises:
        RuntimeError: when the run wrote no ``models/model.pt``.
    """
    bundle, bundle_root = Path(bundle), Path(bundle_root)
    bundle_root.mkdir(parents=True, exist_ok=True)
    overrides_file = write_json(dict(overrides), bundle_root / "overrides.json")
    config_files = [str(bundle / "configs" / "train.json"), str(overrides_file)]
    command = (
        "python -m monai.bundle run --config_file \"['" + "','".join(config_files) + "']\" "
        f"--bundle_root {bundle_root} --logging_file {bundle / 'configs' / 'logging.conf'}"
    )
    _logger.info("training: %s", command)
    workflow = ConfigWorkflow(
        config_file=config_files, workflow_type="train", bundle_root=str(bundle_root),
        logging_file=str(bundle / "configs" / "logging.conf"),
    )
    workflow.initialize()
    start = time.perf_counter()
    workflow.run()
    seconds = time.perf_counter() - start
    trainer = workflow.parser.get_parsed_content("train#trainer")
    output = trainer.state.output
    last = output if isinstance(output, Mapping) else (output[0] if output else {})
    iterations = int(trainer.state.iteration)
    workflow.finalize()
    weights = bundle_root / "models" / "model.pt"
    if not weights.is_file():
        raise RuntimeError(f"the training run in {bundle_root} wrote no {weights.name}; see its log")
    return TrainingRun(
        bundle_root=bundle_root, weights=weights, overrides_file=overrides_file, command=command,
        iterations=iterations, seconds=seconds,
        last_losses={k: float(v) for k, v in last.items() if k.endswith("_loss")},
    )


@torch.no_grad()
def synthesize_volume(
    network: torch.nn.Module,
    volume: torch.Tensor,
    device: str | torch.device = "cpu",
    slices_per_batch: int = 16,
) -> torch.Tensor:
    """Axial slice-by-slice synthesis of a preprocessed (C, H, W, D) volume, as the bundles' ``inference.json``
    (MONAI ``SliceInferer``, no overlap): the (1, H, W, D) prediction clipped to [0, 1], float32 on the CPU."""
    network.eval()
    plain = volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(volume)
    inferer = SliceInferer(roi_size=plain.shape[1:3], sw_batch_size=slices_per_batch, spatial_dim=2, overlap=0.0)
    prediction = inferer(plain[None].to(device), network)
    if isinstance(prediction, MetaTensor):
        prediction = prediction.as_tensor()
    return prediction[0].clamp(0.0, 1.0).float().cpu()
