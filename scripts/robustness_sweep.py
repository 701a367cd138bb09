"""Robustness to a misaligned input (the paper's Fig. 3): an AGI-Net and a ResUNet generator of one bundle, on the
test cases of a dataset, with one input contrast moved by 0, 0.5, ..., 3 pixels in a random in-plane direction
(``translation``) and, in 3D, rotated by 0 ... 3 degrees and translated by 0 ... 3 mm (``rigid``); the motion is
drawn from a fixed seed, the same for both networks and, up to its length, for every level
(:mod:`agi_monai.evaluation.robustness`).

Writes into ``output_dir``: ``<kind>_<protocol>.csv`` (network, perturbation, case, the applied motion, metrics),
``<kind>_<protocol>_<metric>.png`` (metric vs perturbation, a line per network) and ``robustness.md``.

    # checkpoints from training runs (folders holding overrides.json and models/model.pt, e.g. scripts/compare.py's)
    python scripts/robustness_sweep.py --bundle brats_t1_t2_to_flair --dataset_dir outputs/compare/brats_t1_t2_to_flair/datalist.json \\
        --agi_net outputs/compare/brats_t1_t2_to_flair/agi_net --resunet outputs/compare/brats_t1_t2_to_flair/resunet
    # bare state dicts (the bundle's network_def, widths given here), BraSyn 3D as well, only the T2 moved
    python scripts/robustness_sweep.py --bundle brats_t1_t2_to_flair --dataset_dir /data/BraTS2023 --agi_net agi.pt \\
        --resunet res.pt --channels 64,128,256,512 --protocols slice2d,brasyn3d --moved_input T2
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from agi_monai.bundle import load_split
from agi_monai.bundle.experiment import default_slices_per_batch, load_generator, resolve_device
from agi_monai.bundle.registry import find_bundle
from agi_monai.cli import run_script
from agi_monai.evaluation import volume_dataset
from agi_monai.evaluation.robustness import PERTURBATIONS, perturbation_levels, robustness_sweep, write_sweep

#: name -> the bundle's network_def class, for bare weight files
NETWORK_TARGETS = {"AGI-Net": "agi_monai.networks.AGINet", "ResUNet": "agi_monai.networks.ResUNet"}


def _names(value: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``."""
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]


def checkpoint_generator(
    bundle: str | Path, checkpoint: str | Path, network: str, channels: Sequence[int] | None = None
) -> torch.nn.Module:
    """A generator of ``bundle`` from ``checkpoint``: a training run's folder (its ``overrides.json`` describe the
    network, ``models/model.pt`` holds the weights) or a bare state dict (the bundle's ``network_def`` with
    ``network``'s class and ``channels``).

    Raises:
        ValueError: neither a run folder nor a file.
    """
    path = Path(checkpoint)
    if path.is_dir():
        return load_generator(bundle, path / "models" / "model.pt", path / "overrides.json")
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint (expected a training run's folder or a model.pt state dict)")
    overrides: dict[str, Any] = {"network_def#_target_": NETWORK_TARGETS[network]}
    if channels is not None:
        overrides["network_def#channels"] = [int(c) for c in (_names(channels) if isinstance(channels, str) else channels)]
    return load_generator(bundle, path, overrides)


def main(
    bundle: str,
    dataset_dir: str,
    agi_net: str,
    resunet: str,
    output_dir: str = "outputs/robustness",
    split: str = "test",
    kinds: str | Sequence[str] = ("translation", "rigid"),
    maximum: float = 3.0,
    step: float = 0.5,
    moved_input: str | None = None,
    seed: int = 0,
    protocols: str | Sequence[str] = ("slice2d",),
    metrics: str | Sequence[str] = ("psnr_db", "ssim_pct"),
    channels: str | Sequence[int] | None = None,
    device: str | None = None,
    slices_per_batch: int | None = None,
    slice_step: int = 1,
    progress: bool = True,
) -> None:
    """Sweep both generators over the perturbation levels; write CSVs, plots and markdown.

    Args:
        bundle: a bundle name (``bundles/<name>``) or folder: the scenario (inputs, target, slice size, network_def).
        dataset_dir: a JSON datalist or a folder of cases (the bundle's ``dataset_dir``).
        agi_net: the AGI-Net checkpoint: a training run's folder or a state dict.
        resunet: the ResUNet checkpoint, likewise.
        output_dir: where the files go.
        split: the datalist split evaluated.
        kinds: ``translation`` (pixels, in-plane) and/or ``rigid`` (degrees and mm, 3D).
        maximum: the largest level; levels are 0, step, ..., maximum.
        step: the level spacing.
        moved_input: the input contrast moved (e.g. ``T2``); default one drawn per case from the seed.
        seed: the motion's seed (case i uses seed + i).
        protocols: ``slice2d`` and/or ``brasyn3d`` (about 10 s more per synthesis on a CPU core).
        metrics: the metrics plotted.
        channels: generator widths, for bare state dicts (run folders carry their own).
        device: ``cuda`` or ``cpu``; default CUDA when available.
        slices_per_batch: axial slices per forward pass; default 2 on a CPU, 16 with CUDA.
        slice_step: measure every slice_step-th of the evaluated axial slices (a cheaper sweep; slice2d only).
        progress: show a progress bar.
    """
    started = time.perf_counter()
    info = find_bundle(bundle)
    kinds, protocols, metrics = _names(kinds), _names(protocols), _names(metrics)
    for kind in kinds:
        if kind not in PERTURBATIONS:
            raise ValueError(f"--kinds {kind}: expected some of {list(PERTURBATIONS)}")
    device = resolve_device(device)
    slices_per_batch = slices_per_batch or default_slices_per_batch(device)
    networks = {
        "AGI-Net": checkpoint_generator(info.root, agi_net, "AGI-Net", channels),
        "ResUNet": checkpoint_generator(info.root, resunet, "ResUNet", channels),
    }
    cases = load_split(dataset_dir, split, [*info.inputs, info.target])
    if not cases:
        raise ValueError(f"{dataset_dir}: no case of split {split!r} has {[*info.inputs, info.target]}")
    dataset = volume_dataset(cases, info.inputs, info.target, info.spatial_size)
    items = [dataset[i] for i in range(len(dataset))]
    levels = perturbation_levels(maximum, step)
    rows = []
    for kind in kinds:
        rows += robustness_sweep(
            networks, items, kind, levels, info.inputs, moved_input, seed, protocols, device, slices_per_batch,
            slice_step, progress=progress,
        )
    title = f"({', '.join(info.inputs)}) -> {info.target}"  # short: the plots' title is one line
    written = write_sweep(rows, output_dir, metrics, title)
    print(Path(written["robustness"]).read_text(encoding="utf-8"))
    print(f"robustness sweep: {len(rows)} rows, {len(written)} files in {output_dir} in "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_script(main, "robustness_sweep.py")
