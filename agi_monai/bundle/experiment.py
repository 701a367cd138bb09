"""Running a scenario bundle's own recipe from Python at a chosen budget: the README demo, the equal-budget
comparison and the ablations train and evaluate through here, so that what they measure is what
``python -m monai.bundle run`` does.

The budget is a bundle config file of overrides merged over ``train.json`` (MONAI merges a list of config files),
written next to the run: ``<bundle_root>/overrides.json``, and the equivalent command is logged, so any run can
be repeated by hand. The same file, merged over ``train.json`` + ``evaluate.json``, evaluates the run
(:func:`evaluate_bundle`) and rebuilds its generator (:func:`load_generator`).

The shipped real data (``tests/data``) hold three 4-contrast cases; :func:`shipped_datalist` writes the one split
the demo, the comparison and the ablations use: train on the two BraTS 2023 cases, test on TCGA-FG-6692.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.utils import merge_kv

from agi_monai.data import discover_cases, write_json
from agi_monai.engines.checkpoint import expected_bundle_weights, load_weights
from agi_monai.evaluation.tables import SUMMARY_JSON

__all__ = [
    "CPU_CHANNELS",
    "PAPER_CHANNELS",
    "SHIPPED_TEST_CASE",
    "SHIPPED_TRAINING_CASES",
    "TrainingRun",
    "budget_overrides",
    "budget_widths",
    "check_budget",
    "bundle_network",
    "evaluate_bundle",
    "load_generator",
    "resolve_device",
    "seed_overrides",
    "shipped_datalist",
    "train_bundle",
]

#: The shipped 4-contrast cases trained on (folders under ``tests/data``).
SHIPPED_TRAINING_CASES = ("brats2023-gli/BraTS-GLI-00001-000", "brats2023-mets/aurora-example")
#: The held-out shipped case: folder under ``tests/data``, case name (its files are named ``OtherEXampleFromTCIA_*``).
SHIPPED_TEST_CASE = ("tcga-lgg/TCGA-FG-6692", "TCGA-FG-6692")
#: Generator widths of the budget runs on a CPU (AGI-Net 1.2 M parameters) and the paper's (19 M), with CUDA.
CPU_CHANNELS = (16, 32, 64, 128)
PAPER_CHANNELS = (64, 128, 256, 512)

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


def check_budget(iterations: int, batch_size: int, crop_size: int | None, learning_rate: float | None) -> None:
    """Refuses a budget no run can have, before any data is prepared (scripts call it first; :func:`budget_overrides`
    calls it too). Arguments as :func:`budget_overrides`'s.

    Raises:
        ValueError: naming the value and what is expected.
    """
    if int(iterations) < 1 or int(batch_size) < 1:
        raise ValueError(f"iterations {iterations}, batch size {batch_size}: expected positive numbers")
    if crop_size is not None and (int(crop_size) < 8 or int(crop_size) % 8):
        raise ValueError(f"crop size {crop_size}: expected a positive multiple of 8 (the networks halve it three "
                         "times), or none for whole slices")
    if learning_rate is not None and not float(learning_rate) > 0:
        raise ValueError(f"learning rate {learning_rate}: expected a positive number")


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

    Raises:
        ValueError: a budget no run can have (checked here, before any slice is built or network trained).
    """
    check_budget(iterations, batch_size, crop_size, learning_rate)
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


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``; when None, CUDA where available, else the CPU (the scripts' default)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def budget_widths(
    device: torch.device, channels: Sequence[int] | None = None, discriminator_channels: int | None = None
) -> tuple[list[int], int]:
    """Generator widths and PatchGAN width of a budget run: those given, else :data:`CPU_CHANNELS` and 16 on a
    CPU, the paper's :data:`PAPER_CHANNELS` and the bundle's 64 with CUDA."""
    on_cuda = torch.device(device).type == "cuda"
    widths = [int(c) for c in (channels or (PAPER_CHANNELS if on_cuda else CPU_CHANNELS))]
    return widths, int(discriminator_channels or (64 if on_cuda else 16))


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
    workflow = ConfigWorkflow(
        config_file=config_files[0], workflow_type="train", bundle_root=str(bundle_root),
        logging_file=str(bundle / "configs" / "logging.conf"),
    )
    _merge_config_file(workflow.parser, overrides_file)
    # after the workflow applied the bundle's logging.conf: before it, a first run's INFO line has no handler
    _logger.info("training: %s", command)
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


def shipped_datalist(data_dir: str | Path, contrasts: Sequence[str], path: str | Path) -> Path:
    """Write the shipped data's one split as a JSON datalist at ``path`` (absolute file paths, only ``contrasts``):
    ``"training"`` the two BraTS 2023 cases (:data:`SHIPPED_TRAINING_CASES`), ``"validation"`` and ``"test"`` the
    held-out TCGA-FG-6692 (:data:`SHIPPED_TEST_CASE`, under its TCIA name: discovery would name it after its file
    prefix, ``OtherEXampleFromTCIA``). There is no fourth case, so the validation list selects nothing: the
    budget runs validate once, after their last iteration.

    Raises:
        ValueError: a shipped case is missing or lacks one of ``contrasts`` (``data_dir`` is not ``tests/data``).
    """
    data_dir, contrasts = Path(data_dir), list(contrasts)

    def case(folder: str, name: str | None = None) -> dict[str, str]:
        found = discover_cases(data_dir / folder, required=contrasts).cases if (data_dir / folder).is_dir() else []
        if len(found) != 1:
            raise ValueError(
                f"{data_dir / folder}: expected one case with {contrasts} (the shipped samples, tests/data), found "
                f"{len(found)}"
            )
        return {"case_id": name or found[0]["case_id"], **{c: str(Path(found[0][c]).resolve()) for c in contrasts}}

    held_out = case(*SHIPPED_TEST_CASE)
    return write_json(
        {"training": [case(folder) for folder in SHIPPED_TRAINING_CASES], "validation": [held_out], "test": [held_out]},
        path,
    )


def seed_overrides(bundle: str | Path, seed: int) -> dict[str, int]:
    """The override of ``train.json``'s ``seed`` (weight initialisation, data order, augmentation: its
    ``set_determinism`` step), ``{"seed": seed}``.

    Raises:
        ValueError: ``train.json`` has no ``seed`` setting (a bundle from before it had one).
    """
    train_json = Path(bundle) / "configs" / "train.json"
    if "seed" not in json.loads(train_json.read_text(encoding="utf-8")):
        raise ValueError(f"{train_json}: expected a 'seed' setting (set_determinism(seed=@seed)), found none")
    return {"seed": int(seed)}


def _parser(bundle: Path, config_names: Sequence[str], overrides: Mapping[str, Any] | None) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in config_names])
    parser.update(dict(overrides or {}))
    return parser


def bundle_network(bundle: str | Path, overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The generator ``network_def`` of ``<bundle>/configs/train.json`` with ``overrides`` (e.g. a run's
    ``overrides.json`` content, or ``{"network_def#groups": 4}``), built by MONAI's config parser as a run would
    build it, on the CPU."""
    return _parser(Path(bundle), ["train.json"], overrides).get_parsed_content("network_def")


def _merge_config_file(parser: ConfigParser, path: Path) -> None:
    """Merges the config file ``path`` into ``parser`` as MONAI merges a later file of ``--config_file`` (``merge_kv``:
    IDs with ``#`` set nested values, ``+`` keys extend a dict or list). Given to ``ConfigWorkflow`` as a second
    config file instead, a file outside the bundle's ``configs/`` makes MONAI warn "Not all config files are in" at
    every run."""
    for key, value in _read_overrides(path).items():
        merge_kv(parser, key, value)


def _read_overrides(overrides: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    if overrides is None or isinstance(overrides, Mapping):
        return dict(overrides or {})
    path = Path(overrides)
    if not path.is_file():
        raise ValueError(f"{path}: no such overrides file (expected the JSON a training run wrote)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_generator(
    bundle: str | Path, weights: str | Path, overrides: str | Path | Mapping[str, Any] | None = None
) -> torch.nn.Module:
    """The bundle's generator (:func:`bundle_network` with ``overrides``: a mapping or a run's ``overrides.json``)
    with the state dict ``weights`` (a run's ``models/model.pt``) loaded by :func:`agi_monai.engines.load_weights`,
    on the CPU, in eval mode.

    Raises:
        agi_monai.data.DataError: ``weights`` is missing (also a ``FileNotFoundError``), unreadable, or does not fit
            the network these overrides describe (the file and the differing tensors named).
        ValueError: the ``overrides`` file is missing.
    """
    bundle, settings = Path(bundle), _read_overrides(overrides)
    network = bundle_network(bundle, settings)
    setting = str(overrides) if isinstance(overrides, (str, Path)) else "overrides"
    return load_weights(network, weights, "cpu", expected_bundle_weights(bundle.name, setting, settings)).eval()


def evaluate_bundle(
    bundle: str | Path, bundle_root: str | Path, overrides: Mapping[str, Any] | None = None
) -> Path:
    """Runs ``<bundle>/configs/train.json`` + ``evaluate.json`` merged with ``<bundle_root>/overrides.json`` (the
    training run's) and ``overrides``: the generator ``<bundle_root>/models/model.pt`` synthesizes every case of the
    ``test`` split, measured under the bundle's protocols. Returns the folder of ``metrics_per_case.csv``,
    ``metrics_summary.json`` and ``metrics_summary.md`` (``<bundle_root>/eval`` unless ``output_dir`` is
    overridden).

    Raises:
        RuntimeError: the run wrote no summary.
    """
    bundle, bundle_root = Path(bundle), Path(bundle_root)
    config_files = [str(bundle / "configs" / name) for name in ("train.json", "evaluate.json")]
    run_overrides = bundle_root / "overrides.json"
    workflow = ConfigWorkflow(
        config_file=config_files, workflow_type=None, bundle_root=str(bundle_root),
        logging_file=str(bundle / "configs" / "logging.conf"),
    )
    if run_overrides.is_file():
        _merge_config_file(workflow.parser, run_overrides)
    workflow.parser.update(dict(overrides or {}))  # as a command line's overrides, after the config files
    workflow.initialize()
    workflow.run()
    output = Path(workflow.parser.get_parsed_content("output_dir"))
    workflow.finalize()
    if not (output / SUMMARY_JSON).is_file():
        raise RuntimeError(f"the evaluation of {bundle_root} wrote no {SUMMARY_JSON} in {output}; see its log")
    return output
