"""Markdown tables and PNG figures from evaluation outputs (``evaluate.json``'s ``metrics_per_case.csv`` and
``metrics_summary.json``), robustness-sweep CSVs and synthesized NIfTI volumes. Every file is written atomically;
every table is also printed.

    # runs side by side, one table per protocol (a run: NAME=PATH, PATH an evaluation folder or its summary JSON)
    python scripts/report.py compare AGI-Net=bundles/x/eval ResUNet=outputs/resunet/eval --output docs/quality.md
    # one run's per-case table
    python scripts/report.py cases bundles/x/eval --output cases.md
    # metric vs perturbation: a table per metric and robustness_<metric>.png (CSV columns network, perturbation,
    # and metric columns such as psnr_db, ssim_pct, mae_x100; several rows per cell are averaged)
    python scripts/report.py robustness sweep.csv --output_dir reports/ --title "IXI (T1, T2) -> PD"
    # the paper's Fig. 5 from volumes on one grid (inputs and target raw files, predictions in [0, 1])
    python scripts/report.py panel --target case-t2f.nii.gz --predictions "AGI-Net=a.nii.gz,ResUNet=b.nii.gz" \\
        --inputs "T1=case-t1n.nii.gz,T2=case-t2w.nii.gz" --target_name FLAIR --output panel.png
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Orientation
from monai.transforms.utils_pytorch_numpy_unification import percentile

from agi_monai.cli import run_script
from agi_monai.data import DataError, load_volume
from agi_monai.evaluation import brain_mask, slice_protocol, synthesis_panel
from agi_monai.evaluation.figures import robustness_plot
from agi_monai.evaluation.tables import (
    CASES_CSV,
    SUMMARY_JSON,
    cases_markdown,
    comparison_markdown,
    read_csv,
    sweep_markdown,
    write_text,
)

METRICS = ("psnr_db", "ssim_pct", "mae_x100")
#: how far a prediction's affine may differ from the target's (mm; NIfTI stores affines in float32)
GRID_TOLERANCE_MM = 1e-3
#: how far outside [0, 1] a prediction's values may lie (rounding of the bundles' clipped outputs when written)
PREDICTION_ROUNDING = 1e-3


def _pairs(value: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``"a=x,b=y"``, ``["a=x", "b=y"]`` or ``{"a": "x"}`` -> ``{"a": "x", "b": "y"}``."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    pairs = {}
    for item in items:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"{item!r}: expected NAME=PATH")
        pairs[name.strip()] = path.strip()
    return pairs


def _emit(text: str, output: str | None) -> str:
    print(text)
    if output:
        print(f"written to {write_text(text, output)}")
    return text


def _summary(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / SUMMARY_JSON if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file}: no such file (expected an evaluation folder or its {SUMMARY_JSON})")
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(file, f"is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}",
                        f"the {SUMMARY_JSON} an evaluation writes") from None
    except UnicodeDecodeError as error:
        raise DataError(file, f"is not UTF-8 text ({error.reason} at byte {error.start})",
                        f"the {SUMMARY_JSON} an evaluation writes") from None
    if not isinstance(summary, dict) or "protocols" not in summary:
        raise ValueError(f"{file}: not an evaluation summary (no 'protocols' entry)")
    return summary


def compare(*runs: str, output: str | None = None, protocol: str | None = None) -> str:
    """Runs side by side: one markdown table per protocol, one row per run (mean ± std (median) over cases).

    Args:
        runs: ``NAME=PATH`` (or a bare PATH, named after its folder), PATH an evaluation folder or its
            ``metrics_summary.json``.
        output: a markdown file to write.
        protocol: only this protocol (``slice2d`` or ``brasyn3d``).
    """
    if not runs:
        raise ValueError("no run given; expected NAME=PATH arguments")
    paths: dict[str, str] = {}
    for run in runs:
        name, separator, path = str(run).partition("=")
        if not separator:  # a bare path: named after its evaluation folder
            path = name
            name = (Path(path).parent if Path(path).is_file() else Path(path)).resolve().name
        if name in paths:  # (every bundle's evaluation folder is called "eval")
            raise ValueError(f"{path} and {paths[name]} are both named {name!r}; expected one name per run: "
                             "give NAME=PATH")
        paths[name] = path
    named = {name: _summary(path) for name, path in paths.items()}
    return _emit(comparison_markdown(named, protocol), output)


def cases(path: str, output: str | None = None) -> str:
    """One run's per-case metrics as a markdown table.

    Args:
        path: an evaluation folder or its ``metrics_per_case.csv``.
        output: a markdown file to write.
    """
    file = Path(path) / CASES_CSV if Path(path).is_dir() else Path(path)
    return _emit(cases_markdown(read_csv(file)), output)


def robustness(
    sweep: str,
    output_dir: str = ".",
    metrics: Sequence[str] | str = METRICS,
    group: str = "network",
    level: str = "perturbation",
    title: str | None = None,
    xlabel: str = "translation of one input (pixels)",
) -> str:
    """A robustness sweep's CSV -> ``<output_dir>/robustness.md`` (a table per metric) and
    ``<output_dir>/robustness_<metric>.png`` (metric vs level, a line per network; the paper's Fig. 3).

    Args:
        sweep: CSV with columns ``group``, ``level`` and the metrics (e.g. one row per case and level).
        output_dir: where the markdown and PNGs go.
        metrics: the metric columns to report (those absent from the CSV are skipped; none present is an error).
        group: the column naming the networks.
        level: the column of perturbation levels.
        title: the plots' title.
        xlabel: the x axis label.
    """
    wanted = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    rows = read_csv(sweep, numbers=[level, *wanted], text=[group])
    if not rows:
        raise ValueError(f"{sweep}: no rows")
    present = [m for m in wanted if m in rows[0]]
    if not present:
        raise ValueError(f"{sweep}: none of the metric columns {wanted}; its columns are {list(rows[0])}")
    output = Path(output_dir)
    sections = [f"# Robustness: {title}" if title else "# Robustness", ""]
    for metric in present:
        plot = robustness_plot(rows, output / f"robustness_{metric}.png", metric, group, level, title, xlabel)
        sections += [sweep_markdown(rows, metric, group, level), f"![{metric}]({plot.name})", ""]
    return _emit("\n".join(sections), str(output / "robustness.md"))


def panel(
    target: str,
    predictions: str | Sequence[str] | Mapping[str, str],
    output: str,
    inputs: str | Sequence[str] | Mapping[str, str] = (),
    target_name: str = "target",
    slice_index: int | None = None,
    title: str | None = None,
) -> str:
    """The synthesis panel (the paper's Fig. 5) of one axial slice, from volumes on one grid.

    Inputs and target are raw files, normalised here as the bundles do (x / the volume's 99.5th percentile,
    clipped to [0, 1]); predictions are the bundles' outputs, already in [0, 1]. A volume on another grid than the
    target's (shape, or affine in RAS) or a prediction outside [0, 1] is refused. The row labels carry each
    prediction's whole-volume metrics under the 2D protocol (:func:`agi_monai.evaluation.slice_protocol`, brain
    mask = the inputs' foreground, or the target's when no input is given).

    Args:
        target: the real volume (NIfTI or DICOM folder).
        predictions: ``NAME=PATH`` pairs, comma-separated, of synthesized volumes.
        output: the PNG to write.
        inputs: ``NAME=PATH`` pairs of the input contrasts (shown in the first row).
        target_name: the synthesized contrast's name.
        slice_index: the axial slice (last axis); default the one where the mask covers the most.
        title: the figure's title (default: the target file and slice).
    """
    real, grid = _normalised(target)
    synthesized = {name: _prediction(path, real.shape, grid) for name, path in _pairs(predictions).items()}
    sources = {}
    for name, path in (_pairs(inputs) if inputs else {}).items():
        sources[name], affine = _normalised(path)
        _check_grid(path, sources[name].shape, affine, real.shape, grid)
    mask = brain_mask(torch.stack(list(sources.values())) if sources else real)
    metrics = {name: slice_protocol(volume, real, mask).metrics for name, volume in synthesized.items()}
    z = int(mask.float().sum(dim=(0, 1)).argmax()) if slice_index is None else int(slice_index)
    path = synthesis_panel(
        inputs={name: v[..., z] for name, v in sources.items()},
        predictions={name: v[..., z] for name, v in synthesized.items()},
        target=real[..., z], path=output, target_name=target_name, metrics=metrics,
        title=title or f"{Path(target).name}, axial slice {z}; metrics: 2D protocol, brain mask, whole volume",
    )
    print(f"written to {path}")
    return str(path)


def _volume(path: str) -> tuple[torch.Tensor, np.ndarray]:
    """A NIfTI file or DICOM series as an (H, W, D) float tensor in RAS (the bundles' orientation), and its affine."""
    volume = Orientation(axcodes="RAS", labels=None)(load_volume(path))
    return volume.as_tensor()[0].float(), np.asarray(volume.affine, dtype=np.float64)


def _normalised(path: str) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`_volume` / its 99.5th percentile, clipped to [0, 1] (the bundles' intensity normalisation), and its
    affine."""
    volume, affine = _volume(path)
    upper = float(percentile(volume, 99.5))
    if upper <= 0:
        raise ValueError(f"{path}: its 99.5th intensity percentile is {upper:g}; expected a positive MR magnitude image")
    return (volume / upper).clamp(0.0, 1.0), affine


def _prediction(path: str, shape: Sequence[int], affine: np.ndarray) -> torch.Tensor:
    """A synthesized volume (:func:`_volume`) checked to lie on the target's grid and in [0, 1].

    The bundles clip their outputs to [0, 1], so a volume beyond it by more than rounding is not one of their
    predictions (a raw image, values in the hundreds, was accepted and gave a figure whose error map contradicted
    its metrics): it is refused rather than clipped, since clipping would hide that wrong file behind plausible
    numbers. The rounding that is accepted is clipped here, so the error map is drawn from the values the 2D
    protocol measures (it clips the prediction too)."""
    volume, grid = _volume(path)
    _check_grid(path, volume.shape, grid, shape, affine)
    low, high = float(volume.min()), float(volume.max())
    if not (-PREDICTION_ROUNDING <= low and high <= 1 + PREDICTION_ROUNDING):  # also NaN
        raise DataError(path, f"has intensities in [{low:g}, {high:g}]",
                        "a synthesized volume in [0, 1], as the bundles write it (not a raw image)")
    return volume.clamp(0.0, 1.0)


def _check_grid(path: str, shape: Sequence[int], affine: np.ndarray, expected_shape: Sequence[int],
                expected_affine: np.ndarray) -> None:
    """Raises :class:`DataError` when the volume at ``path`` (shape and affine in RAS) is not on the target's grid:
    another shape, or an affine differing by more than :data:`GRID_TOLERANCE_MM` (a volume of another subject or
    orientation can have the target's shape)."""
    if tuple(shape) != tuple(expected_shape) or not np.allclose(affine, expected_affine, atol=GRID_TOLERANCE_MM):
        raise DataError(path, f"is on another grid: shape {tuple(shape)}, affine in RAS {_affine_text(affine)}",
                        f"the target's grid: shape {tuple(expected_shape)}, affine in RAS {_affine_text(expected_affine)}")


def _affine_text(affine: np.ndarray) -> str:
    return np.array2string(affine[:3], precision=3, suppress_small=True, max_line_width=10**6).replace("\n", "")


if __name__ == "__main__":
    run_script({"compare": compare, "cases": cases, "robustness": robustness, "panel": panel}, "report.py")
