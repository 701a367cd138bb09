"""Figures of an evaluation, drawn with matplotlib's Agg canvas (no display, no pyplot state) and written
atomically as PNG:

- :func:`synthesis_panel`: inputs | synthesized | real | absolute error | zoomed region, one row per network
  (the paper's Fig. 5);
- :func:`robustness_plot`: a metric against the perturbation level, one line per network (the paper's Fig. 3).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from agi_monai.data import atomic_output
from agi_monai.evaluation.tables import METRIC_LABELS, read_csv, sweep_statistics

__all__ = ["largest_error_box", "robustness_plot", "synthesis_panel"]

_UNITS = {"psnr_db": ("PSNR ", " dB"), "ssim_pct": ("SSIM ", " %"), "mae_x100": ("MAE ", "")}


def _plane(array: Any, name: str) -> np.ndarray:
    values = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    values = np.squeeze(values).astype(np.float32)
    if values.ndim != 2:
        raise ValueError(f"{name} has shape {np.shape(array)}; expected a 2D slice")
    return values


def largest_error_box(errors: Sequence[np.ndarray], size: int) -> tuple[slice, slice]:
    """The ``size`` x ``size`` box (within the image) with the largest summed absolute error, averaged over
    ``errors`` (one map per prediction), found with a summed-area table."""
    mean = np.mean(np.stack(errors), axis=0, dtype=np.float64)
    size = min(size, *mean.shape)
    table = np.pad(mean.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]
    row, column = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return slice(int(row), int(row) + size), slice(int(column), int(column) + size)


def _label(name: str, values: Mapping[str, float] | None) -> str:
    if not values:
        return name
    parts = []
    for key, value in values.items():
        prefix, suffix = _UNITS.get(key, (f"{key} ", ""))
        parts.append(f"{prefix}{value:.2f}{suffix}")
    return "\n".join([name, *parts])


def _title(figure: Figure, title: str, width_inches: float, fontsize: float = 10.0) -> None:
    """``title`` above the whole figure, wrapped to lines that fit its width (an axes' one-line title was cut at
    the figure's edge: "... 2 iteratio")."""
    # about 0.6 em per character in matplotlib's default sans-serif font; 10 % margin
    characters = max(10, int(0.9 * width_inches * 72 / (0.6 * fontsize)))
    figure.suptitle(textwrap.fill(title, characters, break_on_hyphens=False), fontsize=fontsize)


def _save(figure: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    FigureCanvasAgg(figure)
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    return path


def synthesis_panel(
    inputs: Mapping[str, Any],
    predictions: Mapping[str, Any],
    target: Any,
    path: str | Path,
    target_name: str,
    roi: tuple[slice, slice] | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    title: str | None = None,
    roi_size: int | None = None,
    error_max: float | None = None,
    ras: bool = True,
    cell_inches: float = 2.0,
    dpi: int = 100,
) -> Path:
    """The paper's Fig. 5 for one axial slice: a PNG with one row per prediction.

    Columns: each input (first row only) | synthesized | real ``target_name`` | absolute error map | the region
    of interest zoomed, synthesized | the same region zoomed, real. Synthesized and real share one grey scale
    (0 to the real slice's 99.5th percentile; inputs each their own); every error map shares one colour scale
    (0 to ``error_max``, default the 99.5th percentile of all the rows' errors) with one colour bar. The region
    is outlined on the synthesized, real and error panels. Each row is labelled with its name and, when
    ``metrics`` has it, its metrics (e.g. ``{"psnr_db": 25.1, "ssim_pct": 90.2, "mae_x100": 2.1}``).

    Args:
        inputs: input contrast name -> 2D slice.
        predictions: network name -> 2D synthesized slice (e.g. ``{"AGI-Net": ..., "ResUNet": ...}``).
        target: the real 2D slice.
        path: the PNG to write (atomically).
        target_name: the synthesized contrast, for the column titles.
        roi: the region as (slice along axis 0, slice along axis 1) of the arrays; None chooses the
            ``roi_size`` box of largest absolute error averaged over the predictions
            (:func:`largest_error_box`), and the title says so.
        metrics: network name -> metric name -> value, shown in the row labels.
        title: the figure's title.
        roi_size: side of the automatic region; default a quarter of the shorter side, at least 16.
        error_max: top of the error colour scale.
        ras: the arrays are slices ``[x, y]`` of RAS volumes (the preprocessed items): drawn with ``x``
            across and anterior up. False draws them as images (row 0 at the top).
        cell_inches: size of one panel.
        dpi: resolution: the PNG is about ``(2 + len(inputs) + 3) * cell_inches * dpi`` pixels wide and
            ``len(predictions) * cell_inches * dpi`` (+ title) high.

    Returns:
        ``path``.
    """
    if not predictions:
        raise ValueError("predictions is empty; expected at least one synthesized slice")
    real = _plane(target, "target")
    synthesized = {name: _plane(value, f"prediction {name!r}") for name, value in predictions.items()}
    sources = {name: _plane(value, f"input {name!r}") for name, value in inputs.items()}
    labelled = {**{f"prediction {n!r}": p for n, p in synthesized.items()}, **{f"input {n!r}": p for n, p in sources.items()}}
    for name, plane in labelled.items():
        if plane.shape != real.shape:
            raise ValueError(f"{name} has shape {plane.shape}, the target {real.shape}; expected equal")
    errors = {name: np.abs(plane - real) for name, plane in synthesized.items()}
    automatic = roi is None
    if automatic:
        size = roi_size or max(16, min(real.shape) // 4)
        roi = largest_error_box(list(errors.values()), size)
    error_top = error_max or float(np.percentile(np.stack(list(errors.values())), 99.5)) or 1.0
    grey_top = float(np.percentile(real, 99.5)) or 1.0

    columns = len(sources) + 5
    rows = len(synthesized)
    heading = 0.5 if title or automatic else 0.0
    figure = Figure(figsize=(columns * cell_inches, rows * cell_inches + heading), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)

    def draw(ax: Any, plane: np.ndarray, top: float, cmap: str = "gray", box: bool = False) -> Any:
        image = ax.imshow(plane.T if ras else plane, cmap=cmap, vmin=0.0, vmax=top,
                          origin="lower" if ras else "upper", interpolation="nearest")
        if box:
            (first, second) = roi
            corner = (first.start - 0.5, second.start - 0.5) if ras else (second.start - 0.5, first.start - 0.5)
            extent = (first.stop - first.start, second.stop - second.start)
            width, height = extent if ras else extent[::-1]
            ax.add_patch(Rectangle(corner, width, height, fill=False, edgecolor="yellow", linewidth=1.0))
        ax.set_xticks([])
        ax.set_yticks([])
        return image

    error_images = []
    for row, (name, plane) in enumerate(synthesized.items()):
        row_axes = axes[row]
        for column, (source_name, source) in enumerate(sources.items()):
            if row == 0:
                draw(row_axes[column], source, float(np.percentile(source, 99.5)) or 1.0)
                row_axes[column].set_title(source_name)
            else:
                row_axes[column].axis("off")
        first = len(sources)
        draw(row_axes[first], plane, grey_top, box=True)
        draw(row_axes[first + 1], real, grey_top, box=True)
        error_images.append(draw(row_axes[first + 2], errors[name], error_top, cmap="inferno", box=True))
        draw(row_axes[first + 3], plane[roi], grey_top)
        draw(row_axes[first + 4], real[roi], grey_top)
        row_axes[first].set_ylabel(
            _label(name, (metrics or {}).get(name)), fontsize=8, rotation=0, ha="right", va="center"
        )
        if row == 0:
            for offset, text in enumerate(
                ["synthesized", f"real {target_name}", "|synthesized - real|", "ROI, synthesized", "ROI, real"]
            ):
                row_axes[first + offset].set_title(text, fontsize=9)
    figure.colorbar(error_images[0], ax=list(axes[:, len(sources) + 2]), shrink=0.8, label="absolute error")
    lines = [title] if title else []
    if automatic:
        lines.append(
            f"ROI (yellow): the {roi[0].stop - roi[0].start}x{roi[1].stop - roi[1].start} box of largest mean "
            f"absolute error, at [{roi[0].start}:{roi[0].stop}, {roi[1].start}:{roi[1].stop}]"
        )
    if lines:
        figure.suptitle("\n".join(lines), fontsize=9)
    return _save(figure, path, dpi)


def robustness_plot(
    table: str | Path | Sequence[Mapping[str, Any]],
    path: str | Path,
    metric: str = "psnr_db",
    group: str = "network",
    level: str = "perturbation",
    title: str | None = None,
    xlabel: str = "translation of one input (pixels)",
    width_inches: float = 5.0,
    height_inches: float = 3.5,
    dpi: int = 100,
) -> Path:
    """The paper's Fig. 3: ``metric`` against the perturbation level, one line per network, as a PNG.

    ``table`` is a CSV path or its rows, with columns ``group`` (the network), ``level`` (e.g. the translation
    in pixels) and ``metric``; several rows per (network, level) (e.g. one per case) are averaged, and their
    standard deviation is drawn as a band.

    Args:
        table: the sweep's CSV or rows.
        path: the PNG to write (atomically).
        metric: the column to plot (``"psnr_db"``, ``"ssim_pct"``, ``"mae_x100"`` or any other).
        group: the column naming the lines.
        level: the column of the x axis.
        title: the plot's title.
        xlabel: the x axis label.
        width_inches: figure width; the PNG is ``width_inches * dpi`` pixels wide.
        height_inches: figure height.
        dpi: resolution.

    Returns:
        ``path``.
    """
    rows = read_csv(table) if isinstance(table, (str, Path)) else list(table)
    if not rows:
        raise ValueError("the sweep table is empty; expected rows with columns " f"{group!r}, {level!r}, {metric!r}")
    cells = sweep_statistics(rows, metric, group, level)
    figure = Figure(figsize=(width_inches, height_inches), layout="constrained")
    ax = figure.subplots()
    for name, by_level in cells.items():
        levels = np.array(list(by_level))
        means = np.array([stats["mean"] for stats in by_level.values()])
        spread = np.array([stats["std"] for stats in by_level.values()])
        (line,) = ax.plot(levels, means, marker="o", label=name)
        if any(stats["n"] > 1 for stats in by_level.values()):
            ax.fill_between(levels, means - spread, means + spread, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        _title(figure, title, width_inches)
    return _save(figure, path, dpi)


def ablation_plot(
    table: str | Path | Sequence[Mapping[str, Any]],
    path: str | Path,
    metric: str = "slice2d_psnr_db",
    name: str = "ablation",
    parameters: str | None = "params",
    title: str | None = None,
    width_inches: float = 5.0,
    dpi: int = 100,
) -> Path:
    """The ablation table as a PNG: one horizontal bar per variant (``metric``, its value printed at the bar's end),
    labelled with the variant's name and, when ``parameters`` names a column, its parameter count in millions.

    Args:
        table: ``scripts/ablation.py``'s CSV or its rows.
        path: the PNG to write (atomically).
        metric: the column the bars show, e.g. ``"slice2d_psnr_db"``.
        name: the column naming the variants.
        parameters: the column of parameter counts; None leaves them out.
        title: the plot's title.
        width_inches: figure width (the height grows with the number of variants).
        dpi: resolution.
    """
    rows = read_csv(table) if isinstance(table, (str, Path)) else list(table)
    if not rows or any(metric not in row or name not in row for row in rows):
        raise ValueError(f"the ablation table needs rows with columns {name!r} and {metric!r}")
    labels = [
        f"{row[name]}" + (f" ({float(row[parameters]) / 1e6:.2f} M)" if parameters and row.get(parameters) else "")
        for row in rows
    ]
    values = np.array([float(row[metric]) for row in rows])
    figure = Figure(figsize=(width_inches, 0.8 + 0.35 * len(rows)), layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(rows))[::-1]  # first row on top, as in the table
    ax.barh(positions, values, color="tab:blue")
    ax.set_yticks(positions, labels)
    for position, value in zip(positions, values):
        ax.text(value, position, f" {value:.2f}", va="center", fontsize=8)
    ax.set_xlabel(METRIC_LABELS.get(metric.split("_", 1)[-1], metric))
    ax.set_xlim(min(0.0, float(values.min())), float(values.max()) * 1.15 if values.max() > 0 else 1.0)
    ax.grid(axis="x", alpha=0.3)
    if title:
        _title(figure, title, width_inches)
    return _save(figure, path, dpi)
