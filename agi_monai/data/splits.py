"""Deterministic patient-level train/validation/test splits, written as MONAI (decathlon-style) datalists."""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agi_monai.data.contrasts import CONTRASTS, LABELS
from agi_monai.data.discovery import Discovery, discover_cases, validate_cases
from agi_monai.data.errors import DataError, format_failures
from agi_monai.data.files import write_in_nearest_folder, write_json
from agi_monai.data.volumes import with_source_paths

__all__ = ["SPLIT_NAMES", "split_cases", "datalist_patients", "write_datalist", "prepare_datalist", "preparation_summary"]

SPLIT_NAMES: tuple[str, str, str] = ("training", "validation", "test")
_SIZES_EXPECTED = (
    "three numbers >= 0, either fractions summing to 1 (e.g. 0.8,0.1,0.1) or whole numbers of patients, not all 0 "
    "(e.g. 500,40,40)"
)

_logger = logging.getLogger(__name__)


def split_cases(
    cases: Sequence[Mapping[str, Any]], sizes: Sequence[float], seed: int = 0, keep: Mapping[str, str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Split cases by patient into training, validation and test.

    Patients (``case["patient_id"]``, else the case ID) are sorted, shuffled with ``seed`` and dealt out in
    that order, so the result depends only on the set of patients and the seed, and no patient is in two
    splits. That set decides every patient's split: one patient more among 580 moves others between splits. So data
    that grows is split with ``keep``, an earlier datalist's patients and splits (:func:`datalist_patients`): those
    patients stay where they were, and only the new ones are shuffled and dealt out, filling each split up to its
    size (with fractions, of all patients); a model tested on the earlier test set never trained on it.

    Args:
        cases: datalist items.
        sizes: three fractions >= 0 summing to 1 within 1e-6 (validation and test rounded, training the rest;
            ``(1, 0, 0)`` is every patient in training), or else three whole numbers >= 0 of patients, not all 0
            (e.g. the paper's IXI ``(500, 37, 40)``; patients beyond their sum are left out).
        seed: seed of the shuffle.
        keep: ``{patient: split}`` of patients whose split is fixed (more of them than a size asks for stay all
            the same).

    Raises:
        ValueError: ``sizes`` are neither, naming them.
        DataError: there are fewer patients than the counts ask for.
    """
    by_patient = _by_patient(cases)
    keep = {patient: split for patient, split in (keep or {}).items() if patient in by_patient}
    new = sorted(patient for patient in by_patient if patient not in keep)
    random.Random(seed).shuffle(new)
    counts = _patient_counts(sizes, len(by_patient))
    chosen: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for patient, name in keep.items():
        chosen[name].append(patient)
    # (with fractions the counts add up to every patient, so the rooms hold all the new ones)
    start = 0
    for name, count in zip(SPLIT_NAMES, counts):
        room = max(count - len(chosen[name]), 0)
        chosen[name] += new[start : start + room]
        start += room
    return {name: [case for patient in chosen[name] for case in by_patient[patient]] for name in SPLIT_NAMES}


def datalist_patients(path: str | Path) -> dict[str, str]:
    """``{patient: split}`` of a datalist (:func:`write_datalist`'s), in its order: what :func:`split_cases` keeps.

    Raises:
        DataError: naming ``path``: not a readable JSON datalist, a case without ``patient_id`` or ``case_id``, or a
            patient in two splits (a leaked datalist cannot be kept as it is).
    """
    path = Path(path)
    expected = "a datalist written by scripts/prepare_*.py (a JSON object of training/validation/test case lists)"
    problem = _not_a_datalist(path) if path.is_file() else ("is a folder" if path.is_dir() else "does not exist")
    if problem:
        raise DataError(path, problem, expected)
    content = json.loads(path.read_text(encoding="utf-8"))
    patients: dict[str, str] = {}
    for name in SPLIT_NAMES:
        split = content.get(name, [])
        if not isinstance(split, list):
            raise DataError(path, f"{name!r} is a {type(split).__name__}, not a list of cases", expected)
        for index, case in enumerate(split):
            patient = case.get("patient_id", case.get("case_id")) if isinstance(case, Mapping) else None
            if patient is None:
                raise DataError(path, f"{name}[{index}] has neither patient_id nor case_id", expected)
            earlier = patients.setdefault(str(patient), name)
            if earlier != name:
                raise DataError(path, f"patient {patient} is in both {earlier} and {name}",
                                "a datalist whose patients are each in one split")
    return patients


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
    extend: str | Path | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], Discovery]:
    """Discover the cases under ``root`` that have every ``required`` contrast, check their volumes, split
    them by patient and write the datalist to ``output``. Bad cases are skipped and reported, not fatal.
    With ``extend``, an earlier datalist of the same data (``output`` itself may be it), its patients keep their
    splits and only new patients are dealt out (:func:`split_cases`' ``keep``); its patients no longer found are
    listed in the new one's ``_info.earlier_patients_missing`` and logged.

    What can be refused without reading a volume is refused before the first is read (reading every volume of
    BraTS takes half an hour): ``sizes``, an ``output`` that cannot be written, no usable case, and more patients
    asked for than discovery found.

    Returns:
        The splits and the discovery (whose ``failures`` list the skipped cases).

    Raises:
        ValueError: ``sizes`` are neither fractions nor counts (:func:`split_cases`).
        DataError: ``output`` cannot be written, ``root`` holds no usable case, fewer patients than ``sizes`` ask
            for, or ``extend`` is not a datalist or none of its patients is found; nothing is written.
    """
    _sizes_are_fractions(sizes)  # refuses sizes that are neither fractions nor counts
    output = _writable_output(output)
    keep = datalist_patients(extend) if extend is not None else None
    discovery = discover_cases(root, required=required, progress=progress)
    _require_usable_cases(discovery, root, required)
    # the volumes can only leave out more patients: too few now is too few after reading them
    _patient_counts(sizes, len(_by_patient(discovery.cases)))
    if validate:
        checked = len(discovery.failures)
        discovery.cases = validate_cases(discovery.cases, discovery.failures, progress)
        for failure in discovery.failures[checked:]:  # as discover_cases logs the cases it skips
            _logger.warning("skipped %s", failure)
        _require_usable_cases(discovery, root, required)
    extension = _extension(keep, discovery.cases, extend) if keep is not None else {}
    splits = split_cases(discovery.cases, sizes, seed, keep)
    used = sum(len(cases) for cases in splits.values())
    info = {
        "source": str(Path(root).resolve()),
        "required": list(required),
        "sizes": list(sizes),
        "seed": seed,
        "cases_found": len(discovery.cases),
        "cases_left_out": len(discovery.cases) - used,
        "skipped": [str(failure) for failure in discovery.failures],
        "ignored": list(discovery.ignored),
        **extension,
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
    if discovery.ignored:
        line += f", {len(discovery.ignored)} files ignored (listed in the datalist's _info.ignored)"
    details = format_failures(discovery.failures, unit)
    return f"{details}\n{line}" if details else line


def _extension(keep: Mapping[str, str], cases: Sequence[Mapping[str, Any]], extend: str | Path) -> dict[str, Any]:
    """What extending the datalist ``extend`` (its patients ``keep``) with ``cases`` keeps, for the ``_info`` block.
    None of its patients among the cases is an error: it is a datalist of other data (or IDs read otherwise)."""
    found = set(_by_patient(cases))
    missing = [patient for patient in keep if patient not in found]
    if len(missing) == len(keep) and keep:
        raise DataError(extend, f"none of its {len(keep)} patients is among the usable cases found",
                        "the datalist of an earlier preparation of this data, to keep its patients' splits")
    if missing:
        _logger.warning("%s: %d of its patients are no longer found (or no longer usable), e.g. %s", extend,
                        len(missing), ", ".join(missing[:5]))
    return {
        "extends": str(Path(extend).resolve()),
        "patients_kept": len(keep) - len(missing),
        "patients_new": len(found) - (len(keep) - len(missing)),
        "earlier_patients_missing": missing,
    }


def _by_patient(cases: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The cases of each patient (``case["patient_id"]``, else the case ID)."""
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for case in cases:
        by_patient.setdefault(str(case.get("patient_id", case.get("case_id"))), []).append(dict(case))
    return by_patient


def _sizes_are_fractions(sizes: Any) -> bool:
    """Whether ``sizes`` are fractions (else patient counts); a ValueError naming them when they are neither: a typo
    must not become another split (0.7,0.2,0.2 read as counts gave an empty datalist, -3,10,10 put patients in both
    training and test)."""
    numbers_given = (
        isinstance(sizes, Sequence) and not isinstance(sizes, str)
        and all(isinstance(size, numbers.Real) and not isinstance(size, bool) and math.isfinite(size) for size in sizes)
    )
    if not numbers_given or len(sizes) != len(SPLIT_NAMES):
        problem = f"not {len(SPLIT_NAMES)} numbers (training, validation, test)"
    elif any(size < 0 for size in sizes):
        problem = "holds a negative number"
    elif math.isclose(sum(sizes), 1.0, abs_tol=1e-6):
        return True
    elif not all(float(size).is_integer() for size in sizes):
        problem = f"not whole numbers, and as fractions they sum to {sum(sizes):g}, not 1"
    elif sum(sizes) == 0:
        problem = "all 0"
    else:
        return False
    shown = ",".join(map(str, sizes)) if isinstance(sizes, Sequence) and not isinstance(sizes, str) else repr(sizes)
    raise ValueError(f"sizes {shown}: {problem}; expected {_SIZES_EXPECTED}")


def _patient_counts(sizes: Sequence[float], available: int) -> list[int]:
    if not _sizes_are_fractions(sizes):
        counts = [int(size) for size in sizes]
        if sum(counts) > available:
            raise DataError(
                "split",
                f"asks for {sum(counts)} patients {counts} but only {available} have every contrast",
                f"at least {sum(counts)}",
            )
        return counts
    validation = min(round(sizes[1] * available), available)
    # two halves both rounded up (0,0.5,0.5 of 3 patients) would leave training -1
    test = min(round(sizes[2] * available), available - validation)
    return [available - validation - test, validation, test]


def _writable_output(output: str | Path) -> Path:
    """``output`` when a datalist can be written there: not a folder, and the nearest of its folders that exists (the
    others are created when it is written) is a folder a file can be written to (one is, and removed: nothing is
    created now, so a run refused later leaves nothing behind)."""
    path = Path(output)
    expected = "the name of a JSON file in a folder that exists or can be created, and can be written to"
    if path.is_dir():
        raise DataError(path, "is a folder", expected)
    if path.exists() and path.stat().st_size > 0:
        # a datalist is replaced (preparing again), as is an empty file (mktemp's); any other file (an image, a
        # bundle's config) is not lost
        problem = _not_a_datalist(path)
        if problem:
            raise DataError(path, f"exists and {problem}: it is not replaced", "a new file, or a datalist to replace")
    try:
        write_in_nearest_folder(Path(os.path.abspath(path)).parent)
    except NotADirectoryError as error:
        raise DataError(path, f"cannot be created: {error.filename} is a file, not a folder", expected) from None
    except OSError as error:
        raise DataError(path, f"cannot be written ({error.strerror or error})", expected) from None
    return path


def _not_a_datalist(path: Path) -> str | None:
    """Why the existing file ``path`` is not a datalist (a JSON object with ``_info`` or a split), or None."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "is not JSON"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if not isinstance(content, dict) or not {"_info", *SPLIT_NAMES} & set(content):
        return f"is JSON without any of the keys of a datalist (_info, {', '.join(SPLIT_NAMES)})"
    return None


def _require_usable_cases(discovery: Discovery, root: str | Path, required: Sequence[str]) -> None:
    """No usable case is an error, not an empty datalist (e.g. a download in a format that is not read)."""
    if not discovery.cases:
        listed = " (the skipped cases are listed above)" if discovery.failures else ""
        raise DataError(
            root, f"no usable case with every one of {', '.join(required)}",
            "NIfTI files named by case and contrast (e.g. <case>-t1.nii.gz) or DICOM series below it",
            f"discovery: {discovery.summary().splitlines()[0]}{listed}",
        )


def _relative(value: Any, base: Path) -> Any:
    """Relative to ``base`` when the file lies below it, else absolute."""
    if isinstance(value, (list, Mapping)):  # a DICOM series' files, or one echo's (echo_frames)
        return with_source_paths(value, lambda name: _relative(name, base))
    path = Path(os.path.abspath(value))
    return os.path.relpath(path, base) if path.is_relative_to(base) else str(path)
