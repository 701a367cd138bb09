"""Canonical contrast names and the file-naming rules that map dataset files onto them.

Canonical names (the keys of every case dictionary in this package): ``T1``, ``T2``, ``PD``, ``FLAIR``,
``T1Gd`` for images and ``seg`` for a tumour label map.

A file name is read as ``<case prefix><separator><contrast token>[<separator><processing tag>...]``,
separators being ``-``, ``_`` or ``.``. This covers, for example:

- IXI: ``IXI012-HH-1211-T1.nii.gz`` (case ``IXI012-HH-1211``)
- BraTS 2023: ``BraTS-GLI-00001-000-t1n.nii.gz`` (t1n T1, t1c T1Gd, t2w T2, t2f FLAIR, seg)
- older BraTS: ``BraTS20_Training_001_t1ce.nii.gz`` (t1, t1ce, t2, flair, seg)
- BraTS-Toolkit output: ``OtherEXampleFromTCIA_fla_bet.nii.gz`` (``bet`` is a processing tag)
- DeepMedic examples: ``Flair_subtrMeanDivStd.nii.gz``, ``OTMultiClass.nii.gz``
- a bare name in a case folder: ``t1.nii.gz`` (the case is named after the folder)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from agi_monai.data.errors import DataError

__all__ = [
    "CONTRASTS",
    "LABELS",
    "CONTRAST_ALIASES",
    "canonical_contrast",
    "parse_filename",
    "strip_image_extension",
    "contrasts_in_name",
    "choose_reference",
    "patient_id",
]

CONTRASTS: tuple[str, ...] = ("T1", "T2", "PD", "FLAIR", "T1Gd")
"""Canonical image contrasts."""

LABELS: tuple[str, ...] = ("seg",)
"""Canonical label maps (not intensity-normalised; resampled with nearest neighbour)."""

CONTRAST_ALIASES: dict[str, str] = {
    # lower-cased file-name token -> canonical name
    "t1": "T1", "t1n": "T1", "t1w": "T1", "t1pre": "T1",
    "t1c": "T1Gd", "t1ce": "T1Gd", "t1gd": "T1Gd", "t1post": "T1Gd", "t1gad": "T1Gd",
    "t2": "T2", "t2w": "T2",
    "pd": "PD", "pdw": "PD",
    "flair": "FLAIR", "fla": "FLAIR", "t2f": "FLAIR", "t2flair": "FLAIR",
    "seg": "seg", "otmulticlass": "seg",
    "mav": "seg",  # BraTS-Toolkit majority-vote fusion of automatic segmentations
}  # fmt: skip

# Tokens after the contrast token that only describe processing (brain extraction, DeepMedic's z-scoring).
_PROCESSING_TAGS: frozenset[str] = frozenset({"bet", "brain", "skullstripped", "subtrmeandivstd", "n4", "reg"})

_IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")
_SEPARATORS = re.compile(r"[-_.]")

# A BIDS name (https://bids-specification.readthedocs.io, "modality agnostic files"): sub-<label>, then
# <key>-<value> entities (ses, acq, ce, rec, run, ...), then the suffix naming the contrast (T1w, T2w, PDw, FLAIR)
_BIDS_NAME = re.compile(r"^(sub-[A-Za-z0-9]+)((?:_[A-Za-z]+-[A-Za-z0-9]+)*)_([A-Za-z0-9]+)$")

# Preference for the grid every contrast of a case is resampled onto: IXI T2/PD share the axial
# acquisition grid (T1 is a separate sagittal scan), so T2, then PD, come first.
_REFERENCE_PREFERENCE: tuple[str, ...] = ("T2", "PD", "FLAIR", "T1", "T1Gd")

# Patient-level identifiers for the datasets whose case IDs carry more than the patient.
_PATIENT_RULES: tuple[re.Pattern[str], ...] = (
    re.compile(r"^(BraTS-[A-Za-z]+-\d+)-\d+$"),  # BraTS 2023: BraTS-GLI-<patient>-<timepoint>
    re.compile(r"^(IXI\d+)(?:-.*)?$"),  # IXI: IXI<number>-<site>-<scan id>
    re.compile(r"^(sub-[A-Za-z0-9]+)_ses-[A-Za-z0-9]+$"),  # BIDS: the sessions of one subject
)


def canonical_contrast(name: str, aliases: Mapping[str, str] | None = None) -> str:
    """The canonical contrast name for ``name`` (a canonical name, an alias, any capitalisation).

    Args:
        name: e.g. ``"t1ce"``, ``"FLAIR"``, ``"T1Gd"``.
        aliases: extra lower-case token -> canonical name entries, searched before the built-in ones.

    Raises:
        DataError: ``name`` is not a known contrast.
    """
    token = name.strip().lower()
    table = {**CONTRAST_ALIASES, **{k.lower(): v for k, v in (aliases or {}).items()}}
    for canonical in CONTRASTS + LABELS:
        table.setdefault(canonical.lower(), canonical)
    if token not in table:
        known = ", ".join(CONTRASTS + LABELS)
        raise DataError(name, "is not a known contrast name", f"one of {known} or an alias such as t1ce, t2f, fla")
    return table[token]


def strip_image_extension(filename: str) -> str | None:
    """``filename`` without its NIfTI extension, or None when it is not a NIfTI file name."""
    lowered = filename.lower()
    for extension in _IMAGE_EXTENSIONS:
        if lowered.endswith(extension):
            return filename[: -len(extension)]
    return None


def parse_filename(filename: str, aliases: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """Split an image file name into ``(case prefix, canonical contrast)``.

    The contrast is the last token that is not a processing tag; the prefix is everything before it
    (an empty prefix means the case is named after its folder). A BIDS name (``sub-01_ses-2_acq-tse_T2w.nii.gz``)
    is read by its entities: the case is the subject and session (``sub-01_ses-2``), the contrast the suffix,
    a T1w with a ``ce-`` entity (contrast agent) is T1Gd, and the other entities (acq, rec, run...) name no case.

    Args:
        filename: a file name (not a path), e.g. ``"IXI012-HH-1211-T1.nii.gz"``.
        aliases: extra lower-case token -> canonical name entries (e.g. ``{"mprage": "T1"}``).

    Returns:
        ``("IXI012-HH-1211", "T1")``, or None when the name is not a NIfTI file of a known contrast.
    """
    stem = strip_image_extension(filename)
    if stem is None:
        return None
    bids = _BIDS_NAME.match(stem)
    if bids is not None:
        return _parse_bids_name(*bids.groups(), aliases)
    tokens = _SEPARATORS.split(stem)
    while len(tokens) > 1 and tokens[-1].lower() in _PROCESSING_TAGS:
        tokens.pop()
    try:
        contrast = canonical_contrast(tokens[-1], aliases)
    except DataError:
        return None
    # the prefix keeps the original separators: cut the stem just before the contrast token
    position = sum(len(token) + 1 for token in tokens[:-1])
    prefix = stem[: max(position - 1, 0)]
    return prefix, contrast


def contrasts_in_name(filename: str, aliases: Mapping[str, str] | None = None) -> list[str]:
    """The contrasts that any part of a NIfTI file name names (``P01_T2_TSE_AX.nii.gz`` -> ``["T2"]``), in order,
    once each: what :func:`parse_filename` did not read as the contrast of a name that does not end with one. None
    for a BIDS name, whose suffix alone names its contrast (``sub-01_mod-T1w_defacemask`` is a mask)."""
    stem = strip_image_extension(filename) or ""
    if _BIDS_NAME.match(stem):
        return []
    named = []
    for token in _SEPARATORS.split(stem):
        try:
            named.append(canonical_contrast(token, aliases))
        except DataError:
            continue
    return list(dict.fromkeys(named))


def _parse_bids_name(subject: str, entities: str, suffix: str, aliases: Mapping[str, str] | None) -> tuple[str, str] | None:
    values = dict(entity.split("-", 1) for entity in entities.split("_") if entity)
    try:
        contrast = canonical_contrast(suffix, aliases)
    except DataError:  # another suffix (dwi, bold, mask, dseg...): not an image contrast of ours
        return None
    if contrast == "T1" and "ce" in values:
        contrast = "T1Gd"
    return subject + (f"_ses-{values['ses']}" if "ses" in values else ""), contrast


def choose_reference(contrasts: Sequence[str]) -> str:
    """The contrast whose grid the others of a case are resampled onto (must be one of ``contrasts``).

    Pass the *input* contrasts of a scenario, so that training and inference (where the target is
    missing) use the same grid: T2, then PD, FLAIR, T1, T1Gd.
    """
    for candidate in _REFERENCE_PREFERENCE:
        if candidate in contrasts:
            return candidate
    raise DataError(", ".join(contrasts) or "<none>", "has no image contrast to use as reference", str(CONTRASTS))


def patient_id(case_id: str) -> str:
    """The patient a case belongs to, so that splits keep all of a patient's cases together.

    BraTS 2023 ``BraTS-GLI-00001-000`` -> ``BraTS-GLI-00001`` (the last number is the time point);
    IXI ``IXI012-HH-1211`` -> ``IXI012``; anything else is its own patient.
    """
    for rule in _PATIENT_RULES:
        match = rule.match(case_id)
        if match:
            return match.group(1)
    return case_id
