"""The paper's ablations at one budget (by default Table 5's rows: no CAGR, GR only, GR + CA; also CA only, which
the paper does not have, n groups of Table 7 and the CAGR stages of Table 9): each one override of a bundle's
``train.json`` (:data:`agi_monai.evaluation.ablation.ABLATIONS`), trained with the bundle's own recipe
(:func:`agi_monai.bundle.experiment.train_bundle` with :func:`~agi_monai.bundle.experiment.budget_overrides`),
evaluated with its ``evaluate.json`` on the test split, and tabulated with each network's parameters and FLOPs
(counted as ``scripts/model_complexity.py`` counts them) beside the paper's where the paper gives them.

By default it runs on the shipped cases (train on the two BraTS 2023 cases, test on TCGA-FG-6692, as the demo and
``scripts/compare.py``); ``--dataset_dir`` takes a datalist with ``training``, ``validation`` and ``test`` splits (a
plain folder of cases is tested on its training cases: the tables then say it is a pipeline check, not a result).
Every argument (protocols, each ablation's network at the given widths) is checked before any work.

    python scripts/ablation.py --show                                     # the ablations and their overrides
    python scripts/ablation.py --ablations stages_none,gr_only,agi_net --iterations 300   # the default: Table 5
    python scripts/ablation.py --ablations all --bundle ixi_t1_t2_to_pd --dataset_dir /data/IXI/datalist.json \\
        --iterations 20000 --channels 64,128,256,512 --device cuda

Writes ``<output_dir>/ablation.csv``, ``ablation.md``, ``ablation.json`` and ``ablation_<protocol>_psnr_db.png`` (one
bar per ablation); each run in ``<output_dir>/<name>/``
(its ``overrides.json``, ``models/model.pt``, ``eval/``); a rerun into the same folder first removes the earlier
run's top-level tables and figures (before any weights are replaced: a failed rerun leaves none of them beside new
weights), and replaces the files the earlier run wrote in each run folder (``script_outputs.json``), and only those.
In 3D bundles the FLOPs are those of one training patch (the sliding window's ``patch_size``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agi_monai.bundle.experiment import (
    budget_overrides,
    check_budget,
    budget_widths,
    bundle_network,
    evaluate_bundle,
    load_generator,
    resolve_device,
    seed_overrides,
    shipped_datalist,
    train_bundle,
)
from agi_monai.bundle.registry import find_bundle
from agi_monai.bundle.run_folder import remove_earlier_outputs, replacing_earlier_run
from agi_monai.cli import run_script
from agi_monai.data import write_json
from agi_monai.data.errors import error_line, innermost_cause
from agi_monai.evaluation.ablation import ABLATIONS, TABLE5, Ablation, architecture, select_ablations
from agi_monai.evaluation.protocols import METRIC_NAMES
from agi_monai.evaluation.figures import ablation_plot
from agi_monai.evaluation.tables import (
    SUMMARY_JSON,
    cases_markdown,
    check_protocol_names,
    split_note,
    write_csv,
    write_text,
)

# scripts/ is not a package: the complexity counting and the paper's tables are reused from model_complexity.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_complexity import TABLE7, TABLE9, complexity  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def paper_complexity(ablation: Ablation) -> tuple[float, float] | None:
    """(params M, GFLOPs) of the paper's Table 7 or 9 row with this ablation's architecture, or None (GR only and
    CA only have no complexity row in the paper; Table 5 gives none)."""
    for _, arguments, params, gflops in TABLE7 + TABLE9:
        if architecture(arguments) == ablation.architecture():
            return params, gflops
    return None


def ablation_overview() -> str:
    """The ablations, their overrides and the paper's complexity rows, as a markdown table."""
    rows = []
    for ablation in ABLATIONS.values():
        paper = paper_complexity(ablation) if len(shape) == 2 else None  # the paper's counts are 2D
        rows.append({
            "ablation": ablation.name, "what": ablation.description, "override": f"`{ablation.override_text()}`",
            "paper params (M) / GFLOPs": f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "-",
        })
    return cases_markdown(rows)


def complexity_input(info: Any) -> tuple[int, ...]:
    """The spatial shape the complexity is counted on: one ``spatial_size`` slice of a 2D bundle; one
    ``patch_size`` patch (its training patch and sliding-window roi) of a 3D bundle."""
    if info.spatial_dims == 3:
        config = json.loads((info.config_dir / "train.json").read_text(encoding="utf-8"))
        return tuple(int(s) for s in config["patch_size"])
    return tuple(int(s) for s in info.spatial_size)


def check_networks(bundle: Path, chosen: Sequence[Ablation], widths: Sequence[int]) -> None:
    """Builds each ablation's generator at ``widths`` (cheap) and refuses, naming the ablation, one that cannot
    be built (e.g. ``groups_16`` with a width of 8): before any ablation is trained."""
    for ablation in chosen:
        try:
            bundle_network(bundle, {"network_def#channels": [int(c) for c in widths], **ablation.overrides})
        except Exception as error:  # MONAI wraps the network's ValueError; the innermost one says what is wrong
            raise ValueError(
                f"ablation {ablation.name} ({ablation.override_text()}) cannot be built with --channels "
                f"{','.join(map(str, widths))}: {error_line(innermost_cause(error))}"
            ) from error


def _metric_columns(summary: dict[str, Any]) -> dict[str, float]:
    return {
        f"{protocol}_{metric}": entry["metrics"][metric]["mean"]
        for protocol, entry in summary["protocols"].items() for metric in METRIC_NAMES
    }


def _display(row: dict[str, Any], protocols: Sequence[str]) -> dict[str, str]:
    """A CSV row as the markdown's strings (parameters as integers, FLOPs to 3 decimals, metrics to 2)."""
    shown = {
        "ablation": row["ablation"], "override": f"`{row['override']}`", "params": f"{row['params']:,}",
        "GFLOPs": f"{row['gflops']:.3f}", "params, paper widths (M)": f"{row['params_paper_widths'] / 1e6:.2f}",
        "paper (M / GFLOPs)": (
            f"{row['paper_params_m']:.2f} / {row['paper_gflops']:.2f}" if row["paper_params_m"] is not None else "-"
        ),
    }
    for protocol in protocols:
        shown[f"{protocol} PSNR / SSIM / MAE"] = " / ".join(
            f"{row[f'{protocol}_{metric}']:.2f}" for metric in METRIC_NAMES
        )
    shown["train (s)"] = f"{row['train_seconds']:.0f}"
    return shown


def main(
    ablations: str | Sequence[str] = ",".join(TABLE5),
    bundle: str = "brats_t1_t2_to_flair",
    output_dir: str = "outputs/ablation",
    dataset_dir: str | None = None,
    data_dir: str = str(REPO / "tests" / "data"),
    iterations: int = 300,
    batch_size: int = 8,
    crop_size: int = 128,
    learning_rate: float = 1e-3,
    channels: Sequence[int] | None = None,
    discriminator_channels: int | None = None,
    intensity_augmentation: float = 0.5,
    seed: int = 0,
    protocols: str | Sequence[str] = ("slice2d", "brasyn3d"),
    device: str | None = None,
    show: bool = False,
) -> None:
    """Train, evaluate and tabulate the chosen ablations at one budget.

    Args:
        ablations: names (comma-separated) from ``--show``, or ``all``; default the paper's Table 5 rows.
        bundle: the scenario bundle (name or folder).
        output_dir: where the runs and the tables go.
        dataset_dir: a datalist (``training``, ``validation``, ``test`` splits); default the shipped cases.
        data_dir: the shipped samples, for the default split.
        iterations: training iterations (batches) per ablation.
        batch_size: crops per iteration.
        crop_size: side of the random training crops; 0 for whole slices.
        learning_rate: Adam's learning rate.
        channels: generator widths; default (16, 32, 64, 128) on a CPU, the paper's with CUDA.
        discriminator_channels: PatchGAN width; default 16 on a CPU, 64 with CUDA.
        intensity_augmentation: each input channel scaled by a random factor in [1 - a, 1 + a] in training.
        seed: the runs' seed (the bundle's ``set_determinism``), the same for every ablation.
        protocols: the evaluation protocols (``slice2d``, ``brasyn3d``).
        device: ``cuda`` or ``cpu``; default CUDA when available.
        show: print the ablations, their overrides and the paper's complexity rows, and stop.
    """
    if show:
        print(ablation_overview())
        return
    started = time.perf_counter()
    check_budget(iterations, batch_size, crop_size or None, learning_rate)
    chosen = select_ablations(ablations)
    info = find_bundle(bundle)
    protocols = check_protocol_names(
        [p.strip() for p in protocols.split(",")] if isinstance(protocols, str) else [str(p) for p in protocols]
    )
    device = resolve_device(device)
    widths, discriminator_width = budget_widths(device, channels, discriminator_channels)
    check_networks(info.root, chosen, widths)
    if dataset_dir and not Path(dataset_dir).exists():
        raise ValueError(f"--dataset_dir {dataset_dir}: no such datalist or folder")
    note = split_note(dataset_dir)
    shape = complexity_input(info)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # the earlier run's tables would otherwise stand beside weights this run replaces, should it fail part way
    remove_earlier_outputs(
        output, ["ablation.csv", "ablation.md", "ablation.json", *sorted(p.name for p in output.glob("ablation_*_psnr_db.png"))],
        "ablation.py",
    )
    datalist = Path(dataset_dir) if dataset_dir else shipped_datalist(
        data_dir, [*info.inputs, info.target], output / "datalist.json"
    )
    in_channels = len(info.inputs)
    rows = []
    for ablation in chosen:
        overrides = budget_overrides(
            datalist, iterations, batch_size, crop_size or None, learning_rate, widths, discriminator_width,
            intensity_augmentation, device, cache_dir=str((output / "cache").resolve()),
            **seed_overrides(info.root, seed), **ablation.overrides,
        )
        print(f"{ablation.name}: {ablation.description}; override {ablation.override_text()}", flush=True)
        with replacing_earlier_run(output / ablation.name, "ablation.py"):
            run = train_bundle(info.root, output / ablation.name, overrides)
            evaluation = evaluate_bundle(info.root, run.bundle_root, {"protocols": protocols})
        summary = json.loads((evaluation / SUMMARY_JSON).read_text(encoding="utf-8"))
        network = load_generator(info.root, run.weights, run.overrides_file)
        params, gflops = complexity(network, in_channels, shape, len(shape))
        paper = paper_complexity(ablation) if len(shape) == 2 else None  # the paper's counts are 2D
        rows.append({
            "ablation": ablation.name, "override": ablation.override_text(),
            "params": sum(p.numel() for p in network.parameters()), "gflops": gflops,
            "params_paper_widths": sum(p.numel() for p in bundle_network(info.root, ablation.overrides).parameters()),
            "paper_params_m": paper[0] if paper else None, "paper_gflops": paper[1] if paper else None,
            **_metric_columns(summary), "cases": summary["cases"], "iterations": run.iterations,
            "train_seconds": run.seconds, "weights": str(run.weights),
        })
    write_csv(rows, output / "ablation.csv")
    for protocol in protocols:
        ablation_plot(rows, output / f"ablation_{protocol}_psnr_db.png", metric=f"{protocol}_psnr_db",
                      title=f"{info.name}: {protocol} PSNR, {iterations} iterations")
    size = "x".join(map(str, shape))
    unit = "slice" if len(shape) == 2 else "patch (the bundle's patch_size)"
    lines = [
        f"# Ablations: {info.name} ({', '.join(info.inputs)}) -> {info.target}", "",
        f"{iterations} iterations of batch {batch_size}"
        + (f" ({crop_size}x{crop_size} crops)" if crop_size else "")
        + f", lr {learning_rate:g}, widths {tuple(widths)}, discriminator {discriminator_width}, seed {seed}, "
        f"on {device}; test cases: {rows[0]['cases']} ({datalist}).", "",
        *([f"**{note}.**", ""] if note else []),
        cases_markdown([_display(row, protocols) for row in rows]),
        f"params / GFLOPs: the trained networks, one 1x{in_channels}x{size} {unit}, FLOPs = 2 x multiply-adds "
        "(torch.utils.flop_counter, as scripts/model_complexity.py). 'params, paper widths': the same override at "
        "widths (64, 128, 256, 512). 'paper': Table 7/9 of arXiv 2411.14684 (2 inputs, 256x256) where the "
        "architecture has a row. Metrics: mean over the test cases, PSNR dB / SSIM % / MAE x100; protocols in "
        "docs/evaluation.md.",
    ]
    text = "\n".join(lines) + "\n"
    write_text(text, output / "ablation.md")
    write_json({
        "bundle": info.name, "ablations": {a.name: dict(a.overrides) for a in chosen}, "rows": rows,
        "budget": {"iterations": iterations, "batch_size": batch_size, "crop_size": crop_size,
                   "learning_rate": learning_rate, "channels": widths, "discriminator_channels": discriminator_width,
                   "intensity_augmentation": intensity_augmentation, "seed": seed},
        "device": str(device), "dataset": str(datalist), "split_note": note, "seconds": round(time.perf_counter() - started, 1),
    }, output / "ablation.json")
    print(text)
    print(f"ablation: {len(rows)} runs in {output} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_script(main, "ablation.py")
