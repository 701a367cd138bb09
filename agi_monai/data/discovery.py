"""Case discovery: a folder (NIfTI and/or DICOM) or a JSON datalist -> cases, each a MONAI datalist item
``{"case_id", "patient_id", <contrast>: <NIfTI path or DICOM series file list>, ...}`` (one echo of enhanced
multi-frame files that hold several: ``{"files": [...], "echo_time": <ms>}``, :func:`agi_monai.data.volumes.echo_frames`).

NIfTI files are matched by name (:func:`agi_monai.data.parse_filename`); the case is the file-name prefix.
A file named only by its contrast (``t1.nii.gz``, ``mav.nii.gz``) belongs to the one prefixed case of its
folder, or, when there is none or several, to a case named after the folder. DICOM series are matched by their tags
(:func:`agi_monai.data.match_series_to_contrasts`); the case is the PatientID (plus the study when a
patient has several). Outputs are named after the case ID, so one that is not a file name (a PatientID such as
``MRN/0042``, a datalist's ``site1/P01``) has its path separators and control characters replaced by ``_``, with a
warning: it would otherwise name a file in another folder, or the same file as another case. A case that lacks a
required contrast, has two files for one contrast (a duplicate case ID), or (with ``validate=True``) holds a bad
volume is reported by name and skipped.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from tqdm import tqdm

from agi_monai.data.contrasts import (
    CONTRASTS, LABELS, ambiguous_ending, canonical_contrast, contrasts_in_name, parse_filename, patient_id,
    strip_image_extension
)
from agi_monai.data.dicom import DicomSeries, find_dicom_series, is_dicom_source, match_series_to_contrasts
from agi_monai.data.errors import DataError, Failure, format_failures
from agi_monai.data.files import walk_folders
from agi_monai.data.volumes import load_volume, source_paths, with_source_paths

__all__ = ["Discovery", "discover_cases", "file_safe_case_id"]

_logger = logging.getLogger(__name__)
_CASE_KEYS = ("case_id", "patient_id")

# Image formats that discovery does not read (MetaImage: the BRATS 2015 download; NRRD; Analyze; FreeSurfer; MINC):
# counted and named, so that a folder of them does not give "0 cases found" without a word on why.
_OTHER_IMAGE_FORMATS = (".mha", ".mhd", ".nrrd", ".nhdr", ".hdr", ".hdr.gz", ".img", ".img.gz", ".mgz", ".mgh", ".mnc")
_OTHER_FORMATS_EXPECTED = "expected NIfTI (.nii, .nii.gz) or DICOM: convert them, e.g. with SimpleITK"


@dataclass
class Discovery:
    """What :func:`discover_cases` found.

    Attributes:
        cases: usable cases, sorted by case ID (MONAI datalist items).
        failures: skipped cases and why.
        ignored: NIfTI files of a searched folder whose names end in no one contrast (``brainmask.nii.gz``,
            ``P01_T2_AX.nii.gz``), so that a user can tell why a file was not used.
        other_formats: image files of formats discovery does not read (``.mha``, ``.nrrd``, ``.mgz``...).
        hidden: hidden files and folders (names starting with ``.``: ``._<image>`` AppleDouble files, ``.DS_Store``,
            ``.Trash-1000/``, ``.snapshot/``), not searched (:func:`agi_monai.data.files.walk_folders`).
        synthetic: NIfTI files named by a contrast but marked synthesized in their header
            (:func:`agi_monai.data.is_synthetic_nifti`): an earlier synthesis's output kept beside the acquired
            images is not an acquired contrast (as a synthesized DICOM series is not).
    """

    cases: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    other_formats: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    synthetic: list[str] = field(default_factory=list)

    def summary(self, source: str | Path = "") -> str:
        """One line: how many cases were found and skipped (and files ignored, by why), then the skipped cases, one
        per line."""
        where = f" in {source}" if source else ""
        line = f"{len(self.cases)} cases found{where}, {len(self.failures)} skipped"
        if self.ignored:
            line += (f", {len(self.ignored)} NIfTI files ignored, their names ending in no one contrast "
                     f"({_first(self.ignored)})")
        if self.other_formats:
            line += (f", {len(self.other_formats)} image files ignored, of formats not read "
                     f"({_first(self.other_formats)}; {_OTHER_FORMATS_EXPECTED})")
        if self.hidden:
            line += f", {len(self.hidden)} hidden files or folders ignored ({_first(self.hidden)})"
        if self.synthetic:
            line += f", {len(self.synthetic)} synthesized NIfTI files not used as inputs ({_first(self.synthetic)})"
        details = format_failures(self.failures)
        return f"{line}\n{details}" if details else line


def _first(paths: Sequence[str], count: int = 3) -> str:
    """The first ``count`` of ``paths``, for a summary line."""
    return ", ".join(paths[:count]) + (", ..." if len(paths) > count else "")


def discover_cases(
    source: str | Path,
    required: Sequence[str] = (),
    split: str | None = None,
    aliases: Mapping[str, str] | None = None,
    dicom_mapping: Mapping[str, str] | None = None,
    validate: bool = False,
    progress: bool = False,
) -> Discovery:
    """Find the cases in a folder or a JSON datalist.

    Args:
        source: a folder (searched recursively, through linked folders: NIfTI files by name, DICOM series by tags), or a JSON
            datalist: a list of items, or a dict of lists (MONAI decathlon style, e.g. ``"training"``),
            whose items map contrasts (canonical names or aliases such as ``t1ce``) to files; relative
            paths are taken from the JSON file's folder.
        required: contrasts every case must have (canonical names or aliases).
        split: the key of a JSON datalist to read (``"training"``, ``"validation"``, ``"test"``); None reads
            a plain list, or every list of a dict.
        aliases: extra lower-case file-name token -> canonical contrast entries, e.g. ``{"mprage": "T1"}``.
        dicom_mapping: explicit contrast -> DICOM series selector (UID, number or description), used
            instead of the description rules for every study.
        validate: also read every volume of every case (:func:`agi_monai.data.load_volume`) and skip cases
            with a bad one; slower, used by the preparation scripts.
        progress: show a progress bar while validating.

    Raises:
        DataError: ``source`` does not exist, or is a JSON file that cannot be read as a datalist.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(source, "does not exist", "a folder of NIfTI/DICOM files or a JSON datalist")
    required = [canonical_contrast(name) for name in required]
    ignored: list[str] = []
    other_formats: list[str] = []
    hidden: list[str] = []
    synthetic: list[str] = []
    if source.is_file():
        grouped, failures = _read_datalist(source, split, aliases)
    else:
        grouped, failures = _scan_folder(source, aliases, dicom_mapping, ignored, other_formats, hidden, synthetic)

    cases = []
    for case_id in sorted(grouped):
        entries = grouped[case_id]
        duplicates = {c: files for c, files in entries.items() if c in CONTRASTS + LABELS and len(files) > 1}
        if duplicates:
            detail = "; ".join(f"{c} in {', '.join(map(_describe_source, files))}" for c, files in duplicates.items())
            failures.append(Failure(case_id, f"duplicate case ID, several files for one contrast: {detail}"))
            continue
        case = {key: files[0] for key, files in entries.items()}
        shared = _shared_sources(case)
        if shared:
            failures.append(Failure(case_id, f"{shared} (expected a different image for each contrast)"))
            continue
        patients = _dicom_patients(case)
        if len(set(patients.values())) > 1:  # e.g. --t1 and --t2 series of two patients
            named = ", ".join(f"{contrast}: {patient}" for contrast, patient in patients.items())
            failures.append(Failure(case_id, f"its DICOM series come from different patients ({named}) (expected "
                                             "every contrast of one patient: their PatientIDs differ)"))
            continue
        missing = [c for c in required if c not in case]
        if missing:
            found = ", ".join(c for c in case if c in CONTRASTS + LABELS) or "nothing"
            failures.append(Failure(case_id, f"missing {', '.join(missing)} (found {found})"))
            continue
        case.setdefault("case_id", case_id)
        case.setdefault("patient_id", patient_id(case_id))
        cases.append(case)

    if validate:
        cases = validate_cases(cases, failures, progress)
    for failure in failures:
        _logger.warning("skipped %s", failure)
    if other_formats:  # said here too: the datalist scripts print no summary, and a folder of .mha gave 0 cases unexplained
        _logger.warning("%s: %d image files ignored, of formats not read (%s; %s)", source, len(other_formats),
                        _first(other_formats), _OTHER_FORMATS_EXPECTED)
    if hidden:
        _logger.info("%s: %d hidden files or folders ignored (%s)", source, len(hidden), _first(hidden))
    return Discovery(cases, failures, ignored, other_formats, hidden, synthetic)


def file_safe_case_id(case_id: str) -> str:
    """``case_id`` usable as the start of a file name in one folder: path separators (``/``, ``\\``) and control
    characters become ``_``, and so does an ID that is empty, ``.`` or ``..``, and a leading ``.`` (which would hide
    the outputs); a changed ID is logged."""
    safe = "".join("_" if char in "/\\" or not char.isprintable() else char for char in case_id)
    if safe in ("", ".", ".."):
        safe = "_" * max(len(safe), 1)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != case_id:
        _logger.warning("case ID %r is not a file name; its outputs are named after %r", case_id, safe)
    return safe


def _scan_folder(
    root: Path, aliases: Mapping[str, str] | None, dicom_mapping: Mapping[str, str] | None, ignored: list[str],
    other_formats: list[str], hidden: list[str], synthetic: list[str]
) -> tuple[dict[str, dict[str, list[Any]]], list[Failure]]:
    """The cases below ``root``, and those that failed; appends what it leaves out to ``ignored`` (NIfTI files whose
    names end in no one contrast), ``other_formats``, ``hidden`` and ``synthetic`` (see :class:`Discovery`)."""
    from agi_monai.data.transforms import is_synthetic_nifti  # (transforms imports MONAI's transforms: not at import)

    grouped: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for folder, names in sorted(walk_folders(root, hidden=hidden)):
        parsed = []
        for name in names:
            found = parse_filename(name, aliases)
            if found is not None and is_synthetic_nifti(Path(folder) / name):
                synthetic.append(str(Path(folder) / name))
                _logger.warning("%s: synthesized (its NIfTI header says so), not used as an input", synthetic[-1])
            elif found is not None:
                parsed.append((name, *found))
                ambiguous = ambiguous_ending(name, aliases)
                if ambiguous:
                    _logger.warning(
                        "%s: read as the %s of case %s, though its name ends in two contrasts, %s then %s, that name no"
                        " one contrast together (if it is not, rename or link the file, or list the case in a JSON "
                        "datalist)", Path(folder) / name, found[1], found[0] or Path(folder).name, *ambiguous,
                    )
            elif strip_image_extension(name) is not None:  # a NIfTI file naming no contrast
                ignored.append(str(Path(folder) / name))
                _warn_if_misnamed(ignored[-1], aliases)
            elif name.lower().endswith(_OTHER_IMAGE_FORMATS):
                other_formats.append(str(Path(folder) / name))
        prefixes = {prefix for _, prefix, _ in parsed if prefix}
        # a file named only by its contrast (t1.nii.gz, mav.nii.gz) joins the folder's one named case, if any
        unnamed_case = prefixes.pop() if len(prefixes) == 1 else Path(folder).name
        for name, prefix, contrast in parsed:
            case_id = prefix or unnamed_case
            grouped[case_id][contrast].append(str(Path(folder) / name))
            # a case whose ID names no patient takes its folder's (OtherEXampleFromTCIA_* in TCGA-FG-6692/)
            from_folder = patient_id(case_id, Path(folder).name)
            if from_folder != patient_id(case_id) and not grouped[case_id]["patient_id"]:
                grouped[case_id]["patient_id"].append(from_folder)
    failures: list[Failure] = []
    for case_id, series in _dicom_studies(root).items():
        try:
            matched = match_series_to_contrasts(series, dicom_mapping)
        except DataError as error:
            failures.append(Failure(case_id, str(error)))
            continue
        for contrast, item in matched.items():
            grouped[case_id][contrast].append(item.volume_source)
        grouped[case_id]["patient_id"] = [series[0].patient_id or case_id]
    return grouped, failures


def _warn_if_misnamed(path: str, aliases: Mapping[str, str] | None) -> None:
    """A warning for an ignored NIfTI file with a contrast among the parts of its name, just not as the last
    (``P01_T2_TSE_AX.nii.gz``): probably meant as that contrast. (``brainmask.nii.gz``, with none, is only counted.)
    The example names the contrast the name holds (``P01_T1_CE_AX.nii.gz``: ``P01-T1Gd.nii.gz``): a fixed
    ``P01-T2.nii.gz`` led users to rename a contrast-enhanced T1 to something else."""
    name = Path(path).name
    named = contrasts_in_name(name, aliases)
    if named:
        examples = " or ".join(f"P01-{contrast}.nii.gz" for contrast in named)
        which = f"if it is the {named[0]} image" if len(named) == 1 else "whichever it is"
        _logger.warning("%s: ignored, although its name holds %s: the contrast must end the name (expected "
                        "<case>-<contrast>.nii.gz, e.g. %s %s: rename or link the file, or list the case in a JSON "
                        "datalist)", path, ", ".join(named), examples, which)


def _dicom_studies(root: Path) -> dict[str, list[DicomSeries]]:
    """DICOM series grouped by study; the case ID is the PatientID, plus the study UID's end when a
    patient has several studies. A study without a PatientID (anonymised exports) is named after the folder holding
    its series (each series often sits in a folder of its own: the study is their common folder); series without a
    StudyInstanceUID either are grouped by their folder (a patient's series without one are one study, as before)."""
    studies: dict[tuple[str, str], list[DicomSeries]] = defaultdict(list)
    for series in find_dicom_series(root):
        study = series.study_uid or ("" if series.patient_id else str(Path(series.files[0]).parent))
        studies[(series.patient_id, study)].append(series)
    per_patient: dict[str, int] = defaultdict(int)
    for patient, _ in studies:
        per_patient[patient] += 1
    cases: dict[str, list[DicomSeries]] = defaultdict(list)
    for (patient, study), series in studies.items():
        if not patient:
            name = Path(os.path.commonpath([str(Path(item.files[0]).parent) for item in series])).name
        else:
            name = patient if per_patient[patient] == 1 else f"{patient}_{study.rsplit('.', 1)[-1]}"
        # two IDs made equal by file_safe_case_id share one entry: discover_cases reports the duplicate contrasts
        cases[file_safe_case_id(name)] += series
    return dict(cases)


def _read_datalist(
    path: Path, split: str | None, aliases: Mapping[str, str] | None
) -> tuple[dict[str, dict[str, list[Any]]], list[Failure]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(path, f"cannot be read as JSON ({error})", "a JSON datalist") from error
    if isinstance(content, dict):
        if split is not None:
            if split not in content:
                keys = f"keys: {', '.join(content)}" if content else "an empty JSON object"
                raise DataError(path, f"has no {split!r} list ({keys})", f"a {split!r} key")
            lists = {split: content[split]}
        else:
            lists = {name: value for name, value in content.items() if isinstance(value, list)}
    elif split is None:
        lists = {"its list": content}
    else:
        raise DataError(path, f"is a plain list, so it has no {split!r} split", "a dict of lists")
    if not all(isinstance(items, list) and all(isinstance(item, dict) for item in items) for items in lists.values()):
        raise DataError(path, "does not hold a list of case dictionaries", 'e.g. [{"T1": "a.nii.gz", ...}]')

    grouped: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    failures = []
    listed: dict[str, tuple[dict[str, Any], str]] = {}  # case ID -> its entries and split, as first listed
    for index, (listed_in, item) in enumerate((name, item) for name, items in lists.items() for item in items):
        case: dict[str, Any] = {}
        try:
            for key, value in item.items():
                if key in _CASE_KEYS:
                    case[key] = str(value)
                else:
                    case[canonical_contrast(key, aliases)] = _resolve(value, path.parent)
        except DataError as error:
            failures.append(Failure(str(item.get("case_id", f"{path.name}[{index}]")), str(error)))
            continue
        given_id = case.pop("case_id", None) or _case_id_from_paths(case) or f"{path.stem}-{index:04d}"
        case_id = file_safe_case_id(given_id)
        entries = {**case, "case_id": given_id}
        if case_id in listed and listed[case_id][0] == entries:  # e.g. in two splits: one case
            first = listed[case_id][1]
            where = f"twice in {first}" if first == listed_in else f"in {first!r} and in {listed_in!r}"
            _logger.warning("%s: case %s is listed %s with the same files (read once; a case in two splits is in both "
                            "the training and the evaluation data)", path, case_id, where)
            continue
        listed.setdefault(case_id, (entries, listed_in))
        for key, value in case.items():
            grouped[case_id][key].append(value)
    return grouped, failures


def _shared_sources(case: Mapping[str, Any]) -> str | None:
    """What two contrasts of ``case`` name one image by (a path pasted twice, e.g. ``--t1 a.nii.gz --t2 a.nii.gz``,
    gave a plausible synthesis from one contrast), or None. Links are followed; two echoes of the same DICOM files
    are two images."""
    seen: dict[tuple[Any, ...], str] = {}
    for key, source in case.items():
        if key not in CONTRASTS + LABELS:
            continue
        identity = (tuple(os.path.realpath(name) for name in source_paths(source)),
                    source.get("echo_time") if isinstance(source, Mapping) else None)
        if identity in seen:
            return f"{seen[identity]} and {key} are the same image: {_describe_source(source)}"
        seen[identity] = key
    return None


def _describe_source(source: Any) -> str:
    """A case entry in a message: a file or folder as it is, a DICOM series by its folder and file count (not every
    file: a 200-slice series would make a line of 10,000 characters)."""
    if isinstance(source, (str, Path)):
        return str(source)
    files = source_paths(source)
    folder = os.path.commonpath(files) if len(files) > 1 else files[0]
    echo = f", echo time {source['echo_time']:g} ms" if isinstance(source, Mapping) else ""
    return f"{folder} ({len(files)} DICOM file{'s' if len(files) > 1 else ''}{echo})"


def _resolve(value: Any, base: Path) -> Any:
    """A datalist entry (a file or folder, a DICOM series' files, or one echo's) with its paths taken from ``base``."""
    return with_source_paths(value, lambda name: os.path.normpath(base / name))


def _case_id_from_paths(case: Mapping[str, Any]) -> str | None:
    """A datalist case's ID when it gives none: its first contrast's file-name prefix (else its folder's name), or,
    for a DICOM series, the PatientID, as discovery names a folder's DICOM cases (else the series folder's parent)."""
    for key, value in case.items():
        if key not in CONTRASTS:
            continue
        if isinstance(value, str) and not Path(value).is_dir():
            parsed = parse_filename(Path(value).name)
            return (parsed[0] if parsed and parsed[0] else Path(value).parent.name) or None
        return _patient_id(_first_dicom_file(value)) or Path(source_paths(value)[0]).parent.name or None
    return None


def _dicom_patients(case: Mapping[str, Any]) -> dict[str, str]:
    """The PatientID of each DICOM contrast of ``case`` that has one (from its first file)."""
    patients = {}
    for key, value in case.items():
        if key in CONTRASTS and is_dicom_source(value):
            patient = _patient_id(_first_dicom_file(value))
            if patient:
                patients[key] = patient
    return patients


def _first_dicom_file(source: Any) -> Path | None:
    """The first file of a DICOM series entry (its files, or its folder)."""
    files = source_paths(source)
    return next(iter(sorted(Path(files[0]).iterdir())), None) if Path(files[0]).is_dir() else Path(files[0])


def _patient_id(path: Path | None) -> str:
    """The PatientID of a DICOM file, "" when it has none or is not DICOM."""
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", "")).strip()
    except Exception:  # not a DICOM file (pydicom raises several types), or no file
        return ""


def validate_cases(cases: list[dict[str, Any]], failures: list[Failure], progress: bool) -> list[dict[str, Any]]:
    """The ``cases`` whose every contrast and label loads (:func:`agi_monai.data.load_volume`: the checks of every bad
    volume), with a progress bar; the others are appended to ``failures`` with the reason."""
    kept = []
    for case in tqdm(cases, desc="checking volumes", unit="case", disable=not progress):
        try:
            for key in case:
                if key in CONTRASTS + LABELS:
                    load_volume(case[key])
        except DataError as error:
            failures.append(Failure(case["case_id"], str(error)))
            continue
        kept.append(case)
    return kept
