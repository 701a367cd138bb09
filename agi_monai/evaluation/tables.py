"""Per-case rows, summaries and markdown tables of the metric protocols, written atomically.

An evaluation directory holds (``write_evaluation``):

- ``metrics_per_case.csv``: ``case_id`` and, per protocol ``p``, ``p_psnr_db``, ``p_ssim_pct``, ``p_mae_x100``
  and ``p_slices`` (``"slice2d"``: evaluated slices) or ``p_voxels`` (``"brasyn3d"``: voxels in the mask);
- ``metrics_summary.json``: per protocol, its :class:`~agi_monai.evaluation.Protocol` record and the mean,
  standard deviation (population, ddof 0), median, minimum and maximum of each metric over the cases, plus the
  failed cases with their reasons;
- ``metrics_summary.md``: the same as a markdown table, each protocol's data range and mask policy beside it.

``scripts/report.py`` reads these files back (and robustness-sweep CSVs) to compare runs.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agi_monai.data import DataError, Failure, atomic_output, write_json
from agi_monai.evaluation.protocols import METRIC_NAMES, Protocol, ProtocolResult

__all__ = [
    "CASES_CSV",
    "METRIC_LABELS",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "case_row",
    "cases_markdown",
    "comparison_markdown",
    "read_csv",
    "statistics",
    "summarize",
    "summary_markdown",
    "sweep_markdown",
    "sweep_statistics",
    "write_csv",
    "write_evaluation",
    "write_text",
]

CASES_CSV = "metrics_per_case.csv"
SUMMARY_JSON = "metrics_summary.json"
SUMMARY_MD = "metrics_summary.md"
#: Column headers of the metrics, in the paper's units.
METRIC_LABELS = {"psnr_db": "PSNR (dB)", "ssim_pct": "SSIM (%)", "mae_x100": "MAE (x100)"}
STATISTICS = ("mean", "std", "median", "min", "max")
#: the per-case tables' identifier column: read back as written, never as a number
IDENTIFIER_COLUMN = "case_id"


def case_row(case_id: str, results: Mapping[str, ProtocolResult]) -> dict[str, Any]:
    """One CSV row: ``case_id``, then ``<protocol>_<metric>`` and ``<protocol>_<evaluated unit>`` per protocol."""
    row: dict[str, Any] = {"case_id": case_id}
    for name, result in results.items():
        row.update({f"{name}_{metric}": value for metric, value in result.metrics.items()})
        row[f"{name}_{result.protocol.evaluated_unit}"] = result.evaluated
    return row


def statistics(values: Iterable[float]) -> dict[str, float | int]:
    """Mean, population standard deviation (ddof 0), median, minimum, maximum and count of ``values``
    (``nan`` for an empty list; a PSNR of ``inf`` makes the mean ``inf``)."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return {**{name: math.nan for name in STATISTICS}, "n": 0}
    with np.errstate(invalid="ignore"):  # inf - inf in the deviation of an infinite PSNR: nan, as it should
        values_by_name = {
            "mean": array.mean(), "std": array.std(), "median": np.median(array), "min": array.min(),
            "max": array.max(),
        }
    return {**{name: float(value) for name, value in values_by_name.items()}, "n": int(array.size)}


def summarize(
    rows: Sequence[Mapping[str, Any]],
    protocols: Mapping[str, Protocol],
    failures: Sequence[Failure] = (),
    description: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary JSON's content: per protocol its record and :func:`statistics` of each metric over ``rows``
    (from :func:`case_row`), the number of cases, the failed cases, and ``description`` (scenario, network...)."""
    return {
        "description": dict(description or {}),
        "cases": len(rows),
        "case_ids": [str(row["case_id"]) for row in rows],
        "failed": [{"case_id": f.case_id, "reason": f.reason} for f in failures],
        "statistics": "over cases: mean, std (population, ddof 0), median, min, max",
        "protocols": {
            name: {
                "protocol": protocol.as_dict(),
                "metrics": {m: statistics(float(row[f"{name}_{m}"]) for row in rows) for m in METRIC_NAMES},
            }
            for name, protocol in protocols.items()
        },
    }


def _number(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _mean_std(stats: Mapping[str, float]) -> str:
    if not stats.get("n"):
        return "-"
    return f"{_number(stats['mean'])} ± {_number(stats['std'])} ({_number(stats['median'])})"


def summary_markdown(summary: Mapping[str, Any], title: str | None = None) -> str:
    """A markdown table of a :func:`summarize` result: one row per protocol, each metric as
    ``mean ± std (median)`` over cases, with the protocol's data range and mask; the full policies below."""
    lines = [f"## {title}", ""] if title else []
    description = summary.get("description") or {}
    if description:
        lines += ["; ".join(f"{key}: {value}" for key, value in description.items()), ""]
    header = ["protocol", *(METRIC_LABELS[m] for m in METRIC_NAMES), "cases", "data range", "mask"]
    lines += _table_lines(header, [
        [
            f"{entry['protocol']['title']} (`{name}`)", *(_mean_std(entry["metrics"][m]) for m in METRIC_NAMES),
            str(summary["cases"]), f"{entry['protocol']['data_range']:g}", entry["protocol"]["mask"],
        ]
        for name, entry in summary["protocols"].items()
    ])
    lines += ["", "Values: mean ± standard deviation (median) over cases."]
    for name, entry in summary["protocols"].items():
        protocol = entry["protocol"]
        lines.append(
            f"- `{name}`: {protocol['normalization']}; mask: {protocol['mask_policy']}; SSIM: {protocol['ssim']}; "
            f"{protocol['aggregation']}."
        )
    if summary.get("failed"):
        lines += ["", f"Failed cases ({len(summary['failed'])}):"]
        lines += [f"- {failure['case_id']}: {failure['reason']}" for failure in summary["failed"]]
    return "\n".join(lines) + "\n"


def comparison_markdown(summaries: Mapping[str, Mapping[str, Any]], protocol: str | None = None) -> str:
    """Runs side by side (e.g. ``{"AGI-Net": summary, "ResUNet": summary}``): one table per protocol, one row per
    run, ``mean ± std`` of each metric; refuses to put runs measured under different protocol settings, or runs
    synthesizing different targets or from different inputs (their descriptions), in one table; runs over
    different cases, or with failed cases, are compared under a note saying which evaluated how many.

    Raises:
        DataError: a protocol no summary holds; runs of different protocol settings, targets or inputs.
    """
    _check_one_task(summaries)
    names = [protocol] if protocol else list(dict.fromkeys(p for s in summaries.values() for p in s["protocols"]))
    lines = _cases_note(summaries)
    for name in names:
        entries = {run: s["protocols"][name] for run, s in summaries.items() if name in s["protocols"]}
        if not entries:
            held = sorted({p for s in summaries.values() for p in s["protocols"]})
            raise DataError(f"runs {list(summaries)}", f"no summary holds protocol {name!r}", f"one of {held}")
        records = {json.dumps(entry["protocol"], sort_keys=True) for entry in entries.values()}
        if len(records) > 1:
            raise DataError(f"runs {list(entries)}", f"used different {name!r} settings", "one protocol per table")
        record = next(iter(entries.values()))["protocol"]
        lines += [f"### {record['title']} (`{name}`): data range {record['data_range']:g}, mask: {record['mask']}", ""]
        header = ["run", *(METRIC_LABELS[m] for m in METRIC_NAMES), "cases"]
        lines += _table_lines(header, [
            [run, *(_mean_std(entry["metrics"][m]) for m in METRIC_NAMES), str(summaries[run]["cases"])]
            for run, entry in entries.items()
        ])
        lines += ["", f"{record['normalization']}; mask: {record['mask_policy']}; SSIM: {record['ssim']}; "
                      f"{record['aggregation']}. Values: mean ± std (median) over cases.", ""]
    return "\n".join(lines)


def _task(description: Mapping[str, Any]) -> dict[str, Any]:
    """What a run synthesizes, from its summary's description (evaluate.json writes ``target`` and ``inputs``):
    ``{"target": ..., "inputs": [...]}``, the inputs sorted (their channel order does not change the task); only the
    entries the description records."""
    task = {}
    if "target" in description:
        task["target"] = str(description["target"])
    if "inputs" in description:
        inputs = description["inputs"]
        task["inputs"] = sorted(str(i) for i in (inputs if isinstance(inputs, (list, tuple)) else [inputs]))
    return task


def _check_one_task(summaries: Mapping[str, Mapping[str, Any]]) -> None:
    """Raises :class:`DataError` naming two runs that record different targets or inputs (a run that does not record
    one, e.g. an input-as-target baseline without ``inputs``, is not checked on it)."""
    tasks = {run: _task(summary.get("description") or {}) for run, summary in summaries.items()}
    for key, difference in (("target", "synthesize different targets"), ("inputs", "synthesize from different inputs")):
        recorded = {run: task[key] for run, task in tasks.items() if key in task}
        runs = list(recorded)
        for other in runs[1:]:
            first = runs[0]
            if recorded[other] != recorded[first]:
                shown = {run: ", ".join(v) if isinstance(v, list) else v for run, v in recorded.items()}
                raise DataError(f"runs {first!r} and {other!r}",
                                f"{difference} ({first}: {shown[first]}; {other}: {shown[other]})",
                                "runs of one target from the same inputs in one comparison")


def _cases_note(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A note above the tables when the runs' means are not over the same cases (their ``case_ids``, or their
    numbers of cases for summaries without ids) or a run had failed cases: each run's numbers of evaluated and
    failed cases; no lines otherwise."""
    if all("case_ids" in summary for summary in summaries.values()):
        different = len({frozenset(map(str, summary["case_ids"])) for summary in summaries.values()}) > 1
    else:
        different = len({summary["cases"] for summary in summaries.values()}) > 1
    failed = {run: summary["failed"] for run, summary in summaries.items() if summary.get("failed")}
    if not different and not failed:
        return []

    def counts(run: str, summary: Mapping[str, Any]) -> str:
        text = f"{run}: {summary['cases']} case{'' if summary['cases'] == 1 else 's'}"
        if "failed" not in summary:  # an older summary: its failures are not known
            return text
        ids = [str(failure["case_id"]) for failure in summary["failed"]]
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        return text + (f", {len(ids)} failed ({shown})" if ids else ", none failed")

    opening = ("the runs were evaluated on different cases, so their means are not over the same cases"
               if different else "some cases failed and are left out of the means")
    return [f"Note: {opening}: " + "; ".join(counts(run, s) for run, s in summaries.items()) + ".", ""]


def cases_markdown(rows: Sequence[Mapping[str, Any]], digits: int = 2) -> str:
    """A per-case CSV's rows as a markdown table (numbers to ``digits`` decimals, whole numbers as integers)."""
    if not rows:
        return "(no cases)\n"
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return str(int(value)) if value.is_integer() else _number(value, digits)
        return str(value)

    return "\n".join(_table_lines(columns, [[cell(row[c]) for c in columns] for row in rows])) + "\n"


def sweep_statistics(
    rows: Sequence[Mapping[str, Any]], metric: str, group: str = "network", level: str = "perturbation"
) -> dict[str, dict[float, dict[str, float | int]]]:
    """``{group value: {level: statistics of metric}}`` (see :func:`statistics`) of a robustness sweep's rows, groups
    in first-seen order, levels ascending.

    Raises:
        ValueError: a column is missing.
    """
    for column in (group, level, metric):
        if rows and column not in rows[0]:
            raise ValueError(f"the sweep table has no column {column!r}; its columns are {list(rows[0])}")
    cells: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        cells.setdefault(str(row[group]), {}).setdefault(float(row[level]), []).append(float(row[metric]))
    return {name: {lvl: statistics(by_level[lvl]) for lvl in sorted(by_level)} for name, by_level in cells.items()}


def sweep_markdown(
    rows: Sequence[Mapping[str, Any]], metric: str, group: str = "network", level: str = "perturbation"
) -> str:
    """A robustness sweep (rows with ``group``, ``level`` and ``metric`` columns, e.g. one per case) as a table:
    one row per group, one column per level (ascending), the mean of ``metric`` over the rows of each cell."""
    cells = sweep_statistics(rows, metric, group, level)
    levels = sorted({lvl for by_level in cells.values() for lvl in by_level})
    header = [group, *(f"{lvl:g}" for lvl in levels)]
    body = [
        [name, *(_number(by_level[lvl]["mean"]) if lvl in by_level else "-" for lvl in levels)]
        for name, by_level in cells.items()
    ]
    label = METRIC_LABELS.get(metric, metric)
    return f"{label}, mean over the rows of each cell, by {level}:\n\n" + "\n".join(_table_lines(header, body)) + "\n"


def _table_lines(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


# -------------------------------------------------------------------------------------------------- files


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV atomically (floats in full precision, ``repr``), columns in the first row's order
    unless given; returns the path."""
    path = Path(path)
    columns = list(columns or (rows[0] if rows else ["case_id"]))
    with atomic_output(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: repr(v) if isinstance(v, float) else v for c, v in row.items()} for row in rows)
    return path


def read_csv(path: str | Path, numbers: Collection[str] = (), text: Collection[str] = ()) -> list[dict[str, Any]]:
    """The rows of a CSV written by :func:`write_csv` (or any CSV). A column is read as numbers (float) when every
    filled cell of it is one (empty cells stay ""), except the identifier columns, ``case_id`` and ``text``, which stay strings exactly as
    written (a case ``00042`` or ``1e3`` is not the number 42 or 1000), as does every column with a cell that is
    not a number; ``numbers`` are columns that must be numbers (those present: a cell that is not is an error).

    Raises:
        ValueError: the file is missing, empty or not UTF-8 text, a row has more or fewer cells than the header, or
            a cell of ``numbers`` is not a number; the message names the file, line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected a CSV of metrics)")
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            if not reader.fieldnames:
                raise ValueError(f"{path}: empty file (expected a header row)")
            rows = []
            for number, row in enumerate(reader, start=2):
                if None in row or None in row.values():
                    raise ValueError(f"{path}: line {number} has a different number of cells than the header")
                rows.append(row)
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: not a readable CSV ({error}) (expected UTF-8 comma-separated text)") from None
    identifiers = {IDENTIFIER_COLUMN, *text}
    for column in reader.fieldnames:
        cells = [_number_or_none(row[column]) for row in rows]
        if column in numbers:
            for number, (row, cell) in enumerate(zip(rows, cells), start=2):
                if cell is None:
                    raise ValueError(f"{path}: line {number}, column {column!r}: {row[column]!r} is not a number "
                                     f"(expected a number in every cell of {column!r})")
        # an empty cell (a value that does not apply to that row, e.g. the imputed value of the "real" condition)
        # stays "" in a column of numbers
        filled = [(row, cell) for row, cell in zip(rows, cells) if row[column] != ""]
        if column not in identifiers and filled and all(cell is not None for _, cell in filled):
            for row, cell in filled:
                row[column] = cell
    return rows


def _number_or_none(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def write_evaluation(
    rows: Sequence[Mapping[str, Any]],
    protocols: Mapping[str, Protocol],
    output_dir: str | Path,
    failures: Sequence[Failure] = (),
    description: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the per-case CSV, the summary JSON and the markdown table into ``output_dir``, each atomically;
    returns ``{"cases": ..., "summary": ..., "markdown": ...}`` paths."""
    output_dir = Path(output_dir)
    summary = summarize(rows, protocols, failures, description)
    columns = ["case_id"] + [
        f"{name}_{column}" for name, p in protocols.items() for column in (*METRIC_NAMES, p.evaluated_unit)
    ]
    return {
        "cases": write_csv(rows, output_dir / CASES_CSV, columns),
        "summary": write_json(summary, output_dir / SUMMARY_JSON),
        "markdown": write_text(summary_markdown(summary, "Synthesis metrics"), output_dir / SUMMARY_MD),
    }


# ------------------------------------------------------------------------------------ the scripts' run settings

#: what the scripts' tables say when the test cases are the training cases
FOLDER_SPLIT_NOTE = "test = training cases (a folder, not a datalist with splits): a pipeline check, not a result"


def split_note(dataset: str | Path | None) -> str | None:
    """:data:`FOLDER_SPLIT_NOTE` when ``dataset`` is a plain folder of cases (no ``datalist.json`` in it): then
    :func:`agi_monai.bundle.load_split` gives every case to every split, so the test cases are the training cases;
    None for a datalist (or None)."""
    if dataset is None:
        return None
    path = Path(dataset)
    return FOLDER_SPLIT_NOTE if path.is_dir() and not (path / "datalist.json").is_file() else None


def check_protocol_names(protocols: Sequence[str], option: str = "--protocols") -> list[str]:
    """``protocols`` as a list, refused (``ValueError`` naming ``option``) when empty or naming an unknown one."""
    from agi_monai.evaluation.protocols import PROTOCOL_NAMES

    names = [str(p) for p in protocols]
    unknown = [p for p in names if p not in PROTOCOL_NAMES]
    if unknown or not names:
        raise ValueError(f"{option} {','.join(names)}: expected some of {list(PROTOCOL_NAMES)}")
    return names
