"""Deterministic patient-level train/validation/test splits, written as MONAI (decathlon-style) datalists."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agi_monai.data.contrasts import CONTRASTS, LABELS
from agi_monai.data.discovery import Discovery, discover_cases
from agi_monai.data.errors import DataError, format_failures
from agi_monai.data.files import write_json
from agi_monai.data.volumes import with_source_paths

__all__ = ["SPLIT_NAMES", "split_cases", "write_datalist", "prepare_datalist", "preparation_summary"]

SPLIT_NAMES: tuple[str, str, str] = ("training", "validation", "test")


def split_cases(
    cases: Sequence[Mapping[str, Any]], sizes: Sequence[float], seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Split cases by patient into training, validation and test.

    Patients (``case["patient_id"]``, else the case ID) are sorted, shuffled with ``seed`` and dealt out in
    that order, so the result depends only on the set of patients and the seed, and no patient is in two
    splits.

    Args:
        cases: datalist items.
        sizes: three patient counts (e.g. the paper's IXI ``(500, 37, 40)``; patients beyond their sum are
            left out), or three fractions summing to 1 (validation and test rounded, training the rest).
        seed: seed of the shuffle.

    Raises:
        DataError: there are fewer patients than the counts ask for.
    """
    if len(sizes) != len(SPLIT_NAMES):
        raise ValueError(f"sizes needs {len(SPLIT_NAMES)} numbers (training, validation, test), got {list(sizes)}.")
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for case in cases:
        by_patient.setdefault(str(case.get("patient_id", case.get("case_id"))), []).append(dict(case))
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    counts = _patient_counts(sizes, len(patients))
    splits, start = {}, 0
    for name, count in zip(SPLIT_NAMES, counts):
        splits[name] = [case for patient in patients[start : start + count] for case in by_patient[patient]]
        start += count
    return splits


def write_datalist(
    splits: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, info: Mapping[str, Any] | None = None
) -> Path:
    """Write splits as a JSON datalist (atomically). Files below the JSON's folder are written relative to
    it, so the data and the list can move together; others stay absolute. ``info`` goes under ``"_info"``."""
    path = Path(path)
    base = Path(os.path.abspath(path.parent))
    content: dict[str, Any] = {"_info": dict(info or {})}
    for name, cases in splits.items():
        content[name] = [
            {key: _relative(value, base) if key in CONTRASTS + LABELS else value for key, value in case.items()}
            for case in cases
        ]
    return write_json(content, path)


def prepare_datalist(
    root: str | Path,
    output: str | Path,
    required: Sequence[str],
    sizes: Sequence[float],
    seed: int = 0,
    validate: bool = True,
    progress: bool = True,
) -> tuple[dict[str, list[dict[str, Any]]], Discovery]:
    """Discover the cases under ``root`` that have every ``required`` contrast, check their volumes, split
    them by patient and write the datalist to ``output``. Bad cases are skipped and reported, not fatal.

    Returns:
        The splits and the discovery (whose ``failures`` list the skipped cases).
    """
    discovery = discover_cases(root, required=required, validate=validate, progress=progress)
    splits = split_cases(discovery.cases, sizes, seed)
    used = sum(len(cases) for cases in splits.values())
    info = {
        "source": str(Path(root).resolve()),
        "required": list(required),
        "sizes": list(sizes),
        "seed": seed,
        "cases_found": len(discovery.cases),
        "cases_left_out": len(discovery.cases) - used,
        "skipped": [str(failure) for failure in discovery.failures],
    }
    write_datalist(splits, output, info)
    return splits, discovery


def preparation_summary(
    splits: Mapping[str, Sequence[Any]], discovery: Discovery, output: str | Path, unit: str = "cases"
) -> str:
    """What :func:`prepare_datalist` did: the skipped cases, one per line, then a one-line summary."""
    counts = "/".join(str(len(cases)) for cases in splits.values())
    line = (
        f"{output}: {counts} {'/'.join(splits)} {unit} of {len(discovery.cases)} usable, "
        f"{len(discovery.failures)} skipped"
    )
    details = format_failures(discovery.failures, unit)
    return f"{details}\n{line}" if details else line


def _patient_counts(sizes: Sequence[float], available: int) -> list[int]:
    if all(float(size).is_integer() and size >= 1 for size in sizes) or sum(sizes) > 1 + 1e-9:
        counts = [int(size) for size in sizes]
        if sum(counts) > available:
            raise DataError(
                "split",
                f"asks for {sum(counts)} patients {counts} but only {available} have every contrast",
                f"at least {sum(counts)}",
            )
        return counts
    if not math.isclose(sum(sizes), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {list(sizes)}.")
    validation, test = (round(fraction * available) for fraction in sizes[1:])
    return [available - validation - test, validation, test]


def _relative(value: Any, base: Path) -> Any:
    """Relative to ``base`` when the file lies below it, else absolute."""
    if isinstance(value, (list, Mapping)):  # a DICOM series' files, or one echo's (echo_frames)
        return with_source_paths(value, lambda name: _relative(name, base))
    path = Path(os.path.abspath(value))
    return os.path.relpath(path, base) if path.is_relative_to(base) else str(path)
