"""The equal-budget comparison on real data (issue #6, item 6): AGI-Net vs the ResUNet baseline, each trained with a
scenario bundle's own recipe at the same budget and seed on the shipped 4-contrast cases, measured on the held-out
case under both protocols, and swept over misalignments of one input.

Scenarios (default): ``brats_t1_t2_to_flair`` ((T1, T2) -> FLAIR) and ``brats_t1_t2_flair_to_t1gd``
((T1, T2, FLAIR) -> T1Gd). Split (the demo's, :func:`agi_monai.bundle.experiment.shipped_datalist`): train on
BraTS-GLI-00001-000 and aurora-example, test on TCGA-FG-6692; or ``--dataset_dir``, a datalist with ``training``,
``validation`` and ``test`` splits (a budget run validates once, after its last iteration: the final generator
is compared).

Per scenario, in ``<output_dir>/<scenario>/``:

1. **Train** AGI-Net and ResUNet with ``bundles/<scenario>/configs/train.json`` (pix2pix) merged with the same
   budget overrides (:func:`~agi_monai.bundle.experiment.budget_overrides`: iterations, batch, crops, lr, widths,
   intensity augmentation; the seed of the bundle's ``set_determinism``); only ``network_def#_target_`` differs.
   Each run lives in ``agi_net/`` / ``resunet/`` (``overrides.json``, ``models/model.pt``, logs); a rerun into the
   same folder replaces the files the earlier run wrote there (``script_outputs.json``), and only those.
2. **Evaluate** each with the bundle's ``evaluate.json`` (``<network>/eval/metrics_*``: protocols ``slice2d`` and
   ``brasyn3d``), beside the input contrasts used as the guess (no network); ``quality.md``.
3. **Sweep** one input's misalignment (translation 0-3 px in-plane; rigid 0-3 degrees and mm) for both networks
   (:mod:`agi_monai.evaluation.robustness`): ``robustness/`` CSVs, PNGs, markdown.
4. **Panel**: inputs | synthesized | real | error, both networks, one axial slice (``panel.png``).

Then ``<output_dir>/results.md`` (every table) and ``<output_dir>/compare.json`` (the command, machine, budget,
wall times, training losses, the sweeps' unperturbed level checked against ``evaluate.json``).

    OMP_NUM_THREADS=1 python scripts/compare.py --iterations 300 --output_dir outputs/compare
    # on a GPU (the paper's widths by default), on a prepared BraTS 2023 split
    python scripts/compare.py --dataset_dir /data/BraTS2023/datalist.json --iterations 20000 --device cuda
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.utils import convert_to_tensor

from agi_monai.bundle import load_split
from agi_monai.bundle.experiment import (
    budget_overrides,
    bundle_network,
    check_budget,
    budget_widths,
    evaluate_bundle,
    load_generator,
    resolve_device,
    seed_overrides,
    shipped_datalist,
    train_bundle,
)
from agi_monai.bundle.registry import BundleInfo, find_bundle
from agi_monai.bundle.run_folder import remove_earlier_outputs, replacing_earlier_run
from agi_monai.cli import run_script
from agi_monai.data import write_json
from agi_monai.data.errors import error_line, innermost_cause
from agi_monai.engines.inference import default_slices_per_batch, synthesize_volume
from agi_monai.evaluation import evaluate_volume, synthesis_panel, volume_dataset
from agi_monai.evaluation.robustness import (
    check_sweep, earlier_sweep_files, perturbation_levels, robustness_sweep, write_sweep,
)
from agi_monai.evaluation.tables import (
    CASES_CSV,
    SUMMARY_JSON,
    case_row,
    check_protocol_names,
    comparison_markdown,
    read_csv,
    split_note,
    summarize,
    sweep_markdown,
    sweep_statistics,
    write_text,
)

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("brats_t1_t2_to_flair", "brats_t1_t2_flair_to_t1gd")
#: name -> (the bundle's network_def class, run folder)
NETWORKS = {"AGI-Net": ("agi_monai.networks.AGINet", "agi_net"), "ResUNet": ("agi_monai.networks.ResUNet", "resunet")}
#: the largest difference (dB) allowed between the sweep's unperturbed level and evaluate.json on the same slices
CONSISTENCY_DB = 0.01


def _names(value: str | Sequence[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [str(v) for v in value]


@dataclass
class ScenarioResult:
    """One scenario's outcome: its ``compare.json`` entry, its quality tables (markdown) and its sweep rows."""

    record: dict[str, Any]
    quality_markdown: str
    sweep_rows: list[dict[str, Any]]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = models[0] if models else cpu
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
    }


def _baselines(items: Sequence[Mapping[str, Any]], info: BundleInfo, protocols: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each input contrast used as the synthesized one (no network), summarised like evaluate.json."""
    summaries = {}
    for channel, contrast in enumerate(info.inputs):
        rows, records = [], {}
        for item in items:
            results = evaluate_volume(item["image"][channel : channel + 1], item["target"], item["mask"], protocols)
            rows.append(case_row(str(item["case_id"]), results))
            records = {name: result.protocol for name, result in results.items()}
        # the target is checked against the networks' runs in one table; "inputs" is left out: one contrast guesses
        description = {"guess": contrast, "target": info.target}
        summaries[f"{contrast} as {info.target}"] = summarize(rows, records, description=description)
    return summaries


def _check_unperturbed(rows: Sequence[Mapping[str, Any]], evaluations: Mapping[str, Path]) -> float:
    """The largest |PSNR| difference between the sweep's level 0 (protocol slice2d, every slice) and
    evaluate.json's per-case values: the two paths must measure the same synthesis."""
    worst = 0.0
    for name, folder in evaluations.items():
        table = read_csv(folder / CASES_CSV, numbers=["slice2d_psnr_db"])
        expected = {row["case_id"]: row["slice2d_psnr_db"] for row in table}
        for row in rows:
            if row["network"] == name and row["perturbation"] == 0 and row["protocol"] == "slice2d":
                worst = max(worst, abs(float(row["psnr_db"]) - expected[str(row["case_id"])]))
    if worst > CONSISTENCY_DB:
        raise RuntimeError(f"the sweep's unperturbed synthesis differs from evaluate.json's by {worst:.4f} dB")
    return worst


def _panel(
    item: Mapping[str, Any], info: BundleInfo, networks: Mapping[str, torch.nn.Module],
    summaries: Mapping[str, Mapping[str, Any]], path: Path, device: torch.device, slices_per_batch: int,
) -> tuple[Path, int]:
    """The axial slice where the brain mask is largest: inputs | synthesized | real | error, one row per network,
    labelled with the network's whole-case slice2d metrics."""
    image = convert_to_tensor(item["image"], track_meta=False)
    z = int(torch.as_tensor(item["mask"])[0].float().sum(dim=(0, 1)).argmax())
    plane = image[..., z : z + 1]
    predictions = {name: synthesize_volume(net, plane, device, slices_per_batch)[0, ..., 0] for name, net in networks.items()}
    metrics = {
        name: {m: summaries[name]["protocols"]["slice2d"]["metrics"][m]["mean"] for m in ("psnr_db", "ssim_pct", "mae_x100")}
        for name in networks if "slice2d" in summaries[name]["protocols"]
    }
    panel = synthesis_panel(
        inputs={c: image[i, ..., z].numpy() for i, c in enumerate(info.inputs)},
        predictions={name: p.numpy() for name, p in predictions.items()},
        # clipped to [0, 1] as slice2d clips it (volume_dataset leaves it unclipped): the error maps show what the
        # row labels' metrics measure
        target=torch.as_tensor(item["target"])[0, ..., z].float().clamp(0.0, 1.0).numpy(), path=path,
        target_name=info.target,
        metrics=metrics or None,
        title=f"{item['case_id']} (held out), axial slice {z} (largest brain area); metrics: slice2d, whole case",
    )
    return panel, z


def run_scenario(
    scenario: str, output: Path, data_dir: Path, budget: Mapping[str, Any], seed: int, protocols: Sequence[str],
    sweep: Mapping[str, Any], device: torch.device, slices_per_batch: int, progress: bool,
    dataset_dir: Path | None = None,
) -> ScenarioResult:
    """Train, evaluate, sweep and draw one scenario (on ``dataset_dir``'s splits, else the shipped split)."""
    started = time.perf_counter()
    info = find_bundle(scenario)
    folder = output / info.name
    folder.mkdir(parents=True, exist_ok=True)
    contrasts = [*info.inputs, info.target]
    datalist = dataset_dir or shipped_datalist(data_dir, contrasts, folder / "datalist.json")
    note = split_note(dataset_dir)

    networks: dict[str, torch.nn.Module] = {}
    evaluations: dict[str, Path] = {}
    summaries: dict[str, dict[str, Any]] = {}
    training: dict[str, dict[str, Any]] = {}
    for name, (target_class, run_folder) in NETWORKS.items():
        overrides = budget_overrides(
            datalist, device=device, network=target_class, cache_dir=str((folder / "cache").resolve()),
            **budget, **seed_overrides(info.root, seed),
        )
        print(f"{info.name}: training {name} ({budget['iterations']} iterations)", flush=True)
        with replacing_earlier_run(folder / run_folder, "compare.py"):
            run = train_bundle(info.root, folder / run_folder, overrides)
            print(f"{info.name}: evaluating {name} with evaluate.json", flush=True)
            evaluations[name] = evaluate_bundle(info.root, run.bundle_root, {"protocols": list(protocols)})
        summaries[name] = json.loads((evaluations[name] / SUMMARY_JSON).read_text(encoding="utf-8"))
        networks[name] = load_generator(info.root, run.weights, run.overrides_file)
        training[name] = {**run.as_dict(), "parameters": sum(p.numel() for p in networks[name].parameters())}

    test = volume_dataset(load_split(datalist, "test", contrasts), info.inputs, info.target, info.spatial_size)
    items = [test[i] for i in range(len(test))]
    summaries.update(_baselines(items, info, protocols))
    quality = (f"**{note}.**\n\n" if note else "") + comparison_markdown(summaries)
    write_text(f"# {info.name}: ({', '.join(info.inputs)}) -> {info.target}\n\n{quality}", folder / "quality.md")

    sweep_rows = []
    levels = perturbation_levels(sweep["maximum"], sweep["step"])
    for kind in sweep["kinds"]:
        print(f"{info.name}: {kind} sweep, levels {levels}", flush=True)
        sweep_rows += robustness_sweep(
            networks, items, kind, levels, info.inputs, sweep["moved_input"], seed, sweep["protocols"], device,
            slices_per_batch, sweep["slice_step"], progress=progress,
        )
    title = f"({', '.join(info.inputs)}) -> {info.target}"  # short: the plots' title is one line
    sweep_files = write_sweep(sweep_rows, folder / "robustness", ("psnr_db", "ssim_pct", "mae_x100"), title) if sweep_rows else {}
    unperturbed = None
    if sweep_rows and sweep["slice_step"] == 1 and "slice2d" in sweep["protocols"] and "slice2d" in protocols:
        unperturbed = _check_unperturbed(sweep_rows, evaluations)

    panel, z = _panel(items[0], info, networks, summaries, folder / "panel.png", device, slices_per_batch)
    record = {
        "bundle": info.name, "inputs": list(info.inputs), "target": info.target, "datalist": str(datalist),
        "test_cases": [str(item["case_id"]) for item in items], "split_note": note, "training": training,
        "quality": {name: {p: {m: v["mean"] for m, v in entry["metrics"].items()} for p, entry in s["protocols"].items()}
                    for name, s in summaries.items()},
        "evaluations": {name: str(path) for name, path in evaluations.items()},
        "sweep": {"levels": levels, "kinds": list(sweep["kinds"]), "rows": len(sweep_rows),
                  "files": {k: str(v) for k, v in sweep_files.items()},
                  "unperturbed_vs_evaluate_json_db": unperturbed},
        "panel": {"path": str(panel), "slice": z},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return ScenarioResult(record, quality, sweep_rows)


def _check_scenario(info: BundleInfo, widths: Sequence[int], moved_input: str | None) -> None:
    """Refuses, before any work, a scenario whose networks cannot be built at ``widths`` or whose inputs lack
    ``moved_input`` (the sweep's)."""
    if moved_input is not None and moved_input not in info.inputs:
        raise ValueError(f"--moved_input {moved_input}: not an input of {info.name} ({', '.join(info.inputs)})")
    for name, (target_class, _) in NETWORKS.items():
        try:
            bundle_network(info.root, {"network_def#_target_": target_class, "network_def#channels": list(widths)})
        except Exception as error:  # MONAI wraps the network's own error
            raise ValueError(
                f"{info.name}: {name} cannot be built with --channels {','.join(map(str, widths))}: "
                f"{error_line(innermost_cause(error))}"
            ) from error


def _remove_earlier_outputs(output: Path, infos: Sequence[BundleInfo]) -> None:
    """Removes, before any network is trained, what the earlier run wrote that this one writes again from the new
    weights (results.md, compare.json; per scenario quality.md, panel.png and the sweep's files): a rerun that
    fails part way leaves no earlier table beside weights it has replaced."""
    remove_earlier_outputs(output, ["results.md", "compare.json"], "compare.py")
    for info in infos:
        folder = output / info.name
        remove_earlier_outputs(folder, ["quality.md", "panel.png"], "compare.py")
        remove_earlier_outputs(folder / "robustness", earlier_sweep_files(folder / "robustness"), "compare.py")


def _degradation(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line: each network's change of PSNR and SSIM from the unperturbed level to the largest (the paper's claim
    is that AGI-Net degrades more slowly)."""
    parts = []
    psnr, ssim = sweep_statistics(rows, "psnr_db"), sweep_statistics(rows, "ssim_pct")
    for name, by_level in psnr.items():
        first, last = min(by_level), max(by_level)
        parts.append(
            f"{name} {by_level[last]['mean'] - by_level[first]['mean']:+.2f} dB / "
            f"{ssim[name][last]['mean'] - ssim[name][first]['mean']:+.2f} % SSIM"
        )
    levels = sorted({float(row["perturbation"]) for row in rows})
    return f"Change from {levels[0]:g} to {levels[-1]:g}: " + "; ".join(parts) + "."


def _results_markdown(results: Sequence[ScenarioResult], summary: Mapping[str, Any]) -> str:
    budget = summary["budget"]
    lines = [
        "# Equal-budget comparison: AGI-Net vs ResUNet on the shipped cases", "",
        f"Command: `{summary['command']}`", "",
        f"Machine: {summary['machine']['cpu']}, {summary['machine']['cpu_count']} cores, torch "
        f"{summary['machine']['torch']} with {summary['machine']['torch_threads']} thread(s)"
        + (f", GPU {summary['machine']['gpu']}" if summary["machine"]["gpu"] else "")
        + f"; wall time {summary['seconds'] / 60:.1f} min.", "",
        f"Budget (both networks, every scenario): {budget['iterations']} iterations of batch {budget['batch_size']}"
        + (f", {budget['crop_size']}x{budget['crop_size']} crops" if budget["crop_size"] else "")
        + f", lr {budget['learning_rate']:g}, generator widths {tuple(budget['channels'])}, discriminator "
        f"{budget['discriminator_channels']}, intensity augmentation {budget['intensity_augmentation']:g}, seed "
        f"{summary['seed']}.", "",
    ]
    for scenario in results:
        result = scenario.record
        lines += [f"## {result['bundle']}: ({', '.join(result['inputs'])}) -> {result['target']}", ""]
        lines += [f"Test case(s): {', '.join(result['test_cases'])}"
                  + (f" (**{result['split_note']}**)" if result.get("split_note") else "") + ". Training:", ""]
        for name, run in result["training"].items():
            losses = ", ".join(f"{k} {v:.3f}" for k, v in run["last_losses"].items())
            lines.append(f"- {name}: {run['parameters']:,} parameters, {run['iterations']} iterations in "
                         f"{run['seconds']:.0f} s; last losses {losses}")
        lines += ["", scenario.quality_markdown]
        rows = scenario.sweep_rows
        for kind in result["sweep"]["kinds"]:
            kind_rows = [r for r in rows if r["kind"] == kind and r["protocol"] == "slice2d"]
            if kind_rows:
                step = int(kind_rows[0]["slice_step"])
                subset = f", every {step}th evaluated axial slice" if step > 1 else ""
                lines += [f"### Misalignment sweep: {kind} (slice2d{subset}, moved input: "
                          f"{', '.join(sorted({str(r['moved_input']) for r in kind_rows}))})", ""]
                lines += [sweep_markdown(kind_rows, "psnr_db"), sweep_markdown(kind_rows, "ssim_pct")]
                lines += [_degradation(kind_rows), ""]
        lines.append("")
    return "\n".join(lines)


def main(
    output_dir: str = "outputs/compare",
    scenarios: str | Sequence[str] = SCENARIOS,
    data_dir: str = str(REPO / "tests" / "data"),
    dataset_dir: str | None = None,
    iterations: int = 300,
    batch_size: int = 8,
    crop_size: int = 128,
    learning_rate: float = 1e-3,
    channels: Sequence[int] | None = None,
    discriminator_channels: int | None = None,
    intensity_augmentation: float = 0.5,
    seed: int = 0,
    protocols: str | Sequence[str] = ("slice2d", "brasyn3d"),
    sweep_kinds: str | Sequence[str] = ("translation", "rigid"),
    sweep_maximum: float = 3.0,
    sweep_step: float = 0.5,
    sweep_protocols: str | Sequence[str] = ("slice2d",),
    sweep_slice_step: int = 1,
    moved_input: str | None = None,
    device: str | None = None,
    slices_per_batch: int | None = None,
    progress: bool = True,
) -> None:
    """Run the comparison for each scenario and write the results.

    Args:
        output_dir: where everything goes.
        scenarios: bundle names (comma-separated), default both.
        data_dir: the shipped samples (``tests/data``), for the default split.
        dataset_dir: instead, a datalist (or a folder holding ``datalist.json``) with ``training``, ``validation``
            and ``test`` splits, e.g. from ``scripts/prepare_brats.py``.
        iterations: training iterations (batches), the same for both networks.
        batch_size: crops per iteration.
        crop_size: side of the random training crops; 0 for whole 240x240 slices.
        learning_rate: Adam's learning rate of both networks (generator and discriminator).
        channels: generator widths; default (16, 32, 64, 128) on a CPU, the paper's (64, 128, 256, 512) with CUDA.
        discriminator_channels: PatchGAN width; default 16 on a CPU, 64 with CUDA.
        intensity_augmentation: each training input channel scaled by a random factor in [1 - a, 1 + a].
        seed: the seed of both runs (the bundle's set_determinism) and of the sweeps' motions.
        protocols: evaluate.json's protocols.
        sweep_kinds: ``translation`` and/or ``rigid``; empty for no sweep.
        sweep_maximum: the largest misalignment (pixels; degrees and mm).
        sweep_step: the level spacing.
        sweep_protocols: the sweep's protocols (``slice2d``; ``brasyn3d`` needs ``sweep_slice_step`` 1).
        sweep_slice_step: the sweep measures every n-th evaluated axial slice (cheaper on a CPU); 1 for all, which
            also checks the unperturbed level against evaluate.json.
        moved_input: the input contrast the sweep moves; default one drawn per case from the seed.
        device: ``cuda`` or ``cpu``; default CUDA when available.
        slices_per_batch: axial slices per forward pass at synthesis; default 2 on a CPU, 16 with CUDA.
        progress: progress bars for the sweeps.
    """
    started = time.perf_counter()
    check_budget(iterations, batch_size, int(crop_size) or None, learning_rate)
    device = resolve_device(device)
    slices_per_batch = slices_per_batch or default_slices_per_batch(device)
    widths, discriminator_width = budget_widths(device, channels, discriminator_channels)
    budget = {
        "iterations": int(iterations), "batch_size": int(batch_size), "crop_size": int(crop_size) or None,
        "learning_rate": float(learning_rate), "channels": widths, "discriminator_channels": discriminator_width,
        "intensity_augmentation": float(intensity_augmentation),
    }
    sweep = {
        "kinds": _names(sweep_kinds) if sweep_kinds else [], "maximum": float(sweep_maximum), "step": float(sweep_step),
        "protocols": _names(sweep_protocols), "slice_step": int(sweep_slice_step), "moved_input": moved_input,
    }
    protocols = check_protocol_names(_names(protocols))
    scenario_names = _names(scenarios)
    infos = [find_bundle(name) for name in scenario_names]
    if sweep["kinds"]:
        check_sweep(sweep["kinds"], sweep["protocols"], sweep["maximum"], sweep["step"], sweep["slice_step"],
                    option="--sweep_kinds")
    for info in infos:
        _check_scenario(info, widths, moved_input if sweep["kinds"] else None)
    if dataset_dir and not Path(dataset_dir).exists():
        raise ValueError(f"--dataset_dir {dataset_dir}: no such datalist or folder")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    _remove_earlier_outputs(output, infos)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + "python " + " ".join(shlex.quote(a) for a in sys.argv)
    results = [
        run_scenario(name, output, Path(data_dir), budget, seed, protocols, sweep, device, slices_per_batch,
                     progress, Path(dataset_dir).resolve() if dataset_dir else None)
        for name in scenario_names
    ]
    summary = {
        "command": command,
        "machine": machine(), "device": str(device), "budget": budget, "seed": seed, "sweep": sweep,
        "scenarios": {r.record["bundle"]: r.record for r in results},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(summary, output / "compare.json")
    text = _results_markdown(results, summary)
    write_text(text, output / "results.md")
    print(text)
    print(f"compare: {len(results)} scenario(s) in {output} in {summary['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    run_script(main, "compare.py")
