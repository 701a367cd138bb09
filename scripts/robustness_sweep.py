"""Robustness to a misaligned input (the paper's Fig. 3): an AGI-Net and a ResUNet generator of one bundle, on the
test cases of a dataset, with one input contrast moved by 0, 0.5, ..., 3 pixels in a random in-plane direction
(``translation``) and, in 3D, rotated by 0 ... 3 degrees and translated by 0 ... 3 mm (``rigid``); the motion is
drawn from a fixed seed, the same for both networks and, up to its length, for every level
(:mod:`agi_monai.evaluation.robustness`).

Writes into ``output_dir``: ``<kind>_<protocol>.csv`` (network, perturbation, case, the applied motion, metrics),
``<kind>_<protocol>_<metric>.png`` (metric vs perturbation, a line per network), ``robustness.md`` and
``robustness.json`` (what was measured: both checkpoints, bundle, dataset, split, cases, kinds, levels, the command
line; the markdown states it too). The arguments are checked first; then the files an earlier sweep wrote into
``output_dir`` (any kind) are removed, before the new sweep, so that none stands beside the new ``robustness.md``.
A plain folder as ``--dataset_dir`` is every split: the outputs then say the test cases are the training cases.

    # checkpoints from training runs (folders holding overrides.json and models/model.pt, e.g. scripts/compare.py's)
    python scripts/robustness_sweep.py --bundle brats_t1_t2_to_flair --dataset_dir outputs/compare/brats_t1_t2_to_flair/datalist.json \\
        --agi_net outputs/compare/brats_t1_t2_to_flair/agi_net --resunet outputs/compare/brats_t1_t2_to_flair/resunet
    # bare state dicts (the bundle's network_def, widths given here), BraSyn 3D as well, only the T2 moved
    python scripts/robustness_sweep.py --bundle brats_t1_t2_to_flair --dataset_dir /data/BraTS2023 --agi_net agi.pt \\
        --resunet res.pt --channels 64,128,256,512 --protocols slice2d,brasyn3d --moved_input T2
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from agi_monai.bundle import load_split
from agi_monai.bundle.experiment import load_generator, resolve_device
from agi_monai.bundle.registry import find_bundle
from agi_monai.cli import run_script
from agi_monai.evaluation import volume_dataset
from agi_monai.data import write_json
from agi_monai.engines.inference import default_slices_per_batch
from agi_monai.evaluation.robustness import check_sweep, earlier_sweep_files, robustness_sweep, write_sweep
from agi_monai.bundle.run_folder import remove_earlier_outputs
from agi_monai.evaluation.tables import split_note

#: name -> the bundle's network_def class, for bare weight files
NETWORK_TARGETS = {"AGI-Net": "agi_monai.networks.AGINet", "ResUNet": "agi_monai.networks.ResUNet"}


def _names(value: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``."""
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]


def checkpoint_weights(checkpoint: str | Path) -> Path:
    """The weights file a checkpoint argument names: a run folder's ``models/model.pt``, or the file itself."""
    path = Path(checkpoint)
    return (path / "models" / "model.pt" if path.is_dir() else path).resolve()


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
        return load_generator(bundle, checkpoint_weights(path), path / "overrides.json")
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
    levels = check_sweep(kinds, protocols, maximum, step, slice_step, metrics, moved_input, info.inputs)
    device = resolve_device(device)
    slices_per_batch = slices_per_batch or default_slices_per_batch(device)
    networks = {
        "AGI-Net": checkpoint_generator(info.root, agi_net, "AGI-Net", channels),
        "ResUNet": checkpoint_generator(info.root, resunet, "ResUNet", channels),
    }
    cases = load_split(dataset_dir, split, [*info.inputs, info.target])
    if not cases:
        raise ValueError(f"{dataset_dir}: no case of split {split!r} has {[*info.inputs, info.target]}")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # an earlier sweep's CSVs and plots (of other kinds too) would stand beside this sweep's robustness.md
    remove_earlier_outputs(output, earlier_sweep_files(output), "robustness_sweep.py")
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    note = split_note(dataset_dir)
    settings = {
        "command": threads + "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "bundle": str(info.root), "dataset": str(Path(dataset_dir).resolve()), "split": split, "split_note": note,
        "checkpoints": {"AGI-Net": str(checkpoint_weights(agi_net)), "ResUNet": str(checkpoint_weights(resunet))},
        "cases": [str(case.get("case_id", i)) for i, case in enumerate(cases)],
        "kinds": kinds, "levels": levels, "moved_input": moved_input, "seed": seed, "protocols": protocols,
        "metrics": metrics, "channels": channels if channels is None or isinstance(channels, str) else list(channels),
        "slice_step": slice_step, "device": str(device),
    }
    dataset = volume_dataset(cases, info.inputs, info.target, info.spatial_size)
    items = [dataset[i] for i in range(len(dataset))]
    rows = []
    for kind in kinds:
        rows += robustness_sweep(
            networks, items, kind, levels, info.inputs, moved_input, seed, protocols, device, slices_per_batch,
            slice_step, progress=progress,
        )
    title = f"({', '.join(info.inputs)}) -> {info.target}"  # short: the plots' title is one line
    preamble = [
        f"Bundle `{settings['bundle']}`; dataset `{settings['dataset']}`, split `{split}` "
        f"({len(settings['cases'])} case(s))" + (f": **{note}**" if note else "") + ".",
        f"Checkpoints: AGI-Net `{settings['checkpoints']['AGI-Net']}`, ResUNet `{settings['checkpoints']['ResUNet']}`.",
        f"Kinds {', '.join(kinds)}; levels {', '.join(f'{v:g}' for v in levels)}; moved input "
        f"{moved_input or 'drawn per case'}; seed {seed}; every {slice_step} evaluated slice(s).",
        f"Command: `{settings['command']}` (settings: `robustness.json`).",
    ]
    written = write_sweep(rows, output, metrics, title, preamble=preamble)
    settings["files"] = sorted(path.name for path in written.values())
    written["robustness.json"] = write_json({**settings, "seconds": round(time.perf_counter() - started, 1)},
                                            output / "robustness.json")
    print(Path(written["robustness"]).read_text(encoding="utf-8"))
    print(f"robustness sweep: {len(rows)} rows, {len(written)} files in {output_dir} in "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_script(main, "robustness_sweep.py")
