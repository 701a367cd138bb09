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
- a contrast written in two words: ``P01_T2_FLAIR.nii.gz``, ``P01_T1-Gd.nii.gz``, ``P01_T1+C.nii.gz``, ``P01_T1w_ce``

A name ending in two contrasts that make no one contrast together (``P01-PD-T2.nii.gz``, ``P01_T1_seg.nii.gz``) is
read as none (:func:`ambiguous_ending`): cutting off the last would give a case ``P01-PD`` holding a T2.
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
    "ambiguous_ending",
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
# the parts of a name: what lies between separators, and a "+" (with a "C" after it) of its own: "T1+", "T1+C",
# "T1C+" mean contrast-enhanced, so the "+" must not vanish as a separator would (which read "T1+" as the T1)
_TOKENS = re.compile(r"\+c(?![^-_.+])|\+|[^-_.+]+", re.IGNORECASE)

# Words that, after a T1 (or T1Gd) token, say it was acquired after a contrast agent (T1w_ce, T1_KM: Kontrastmittel,
# T1+, T1C+). A T1 token joined with the next one into a known name (T1_post -> t1post) needs none of these.
_CONTRAST_AGENT_WORDS: frozenset[str] = frozenset({"c", "ce", "gd", "gad", "post", "contrast", "km", "+", "+c"})

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
    # TCGA/TCIA: the barcode's participant (TCGA-<site>-<participant>) anywhere in the name, e.g. the native scans
    # "TCGA-FG-6692-native" and the BraTS-space copy in a folder "TCGA-FG-6692"
    re.compile(r"(?<![A-Za-z0-9])(TCGA-[A-Za-z0-9]{2}-[A-Za-z0-9]{4})(?![A-Za-z0-9])"),
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

    The contrast is the last token that is not a processing tag, or the last two when together they name one
    (``T2_FLAIR``, ``T1-Gd``, ``T1+C``, ``T1w_ce``); the prefix is everything before it (an empty prefix means the
    case is named after its folder). A name ending in two contrasts that name no one together (``P01-PD-T2``: a T2
    of case ``P01-PD``, or a PD/T2 image of ``P01``?) is read by that rule, the last one being the contrast, as case
    IDs such as ``missing-t2`` need; :func:`ambiguous_ending` says which two, for a warning. A BIDS name
    (``sub-01_ses-2_acq-tse_T2w.nii.gz``) is read by its entities: the case is the subject and session
    (``sub-01_ses-2``), the contrast the suffix, a T1w with a ``ce-`` entity (contrast agent) is T1Gd, and the other
    entities (acq, rec, run...) name no case.

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
    ending = _contrast_ending(stem, aliases)
    if ending is None:
        return None
    start, contrast, _ = ending
    # the prefix keeps the original separators: the stem up to the separator before the contrast
    return stem[: max(start - 1, 0)], contrast


def ambiguous_ending(filename: str, aliases: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The two contrasts that end a NIfTI file name without naming one contrast together (``P01-PD-T2.nii.gz`` ->
    ``("PD", "T2")``, ``P01_T1_seg.nii.gz`` -> ``("T1", "seg")``), which :func:`parse_filename` reads as the last one
    of a case named with the first: a PD/T2 image, or a T2 of case ``P01-PD``? A segmentation drawn on the T1, or the
    seg of case ``P01_T1``? None for any other name."""
    stem = strip_image_extension(filename)
    if stem is None or _BIDS_NAME.match(stem):
        return None
    ending = _contrast_ending(stem, aliases)
    return None if ending is None or ending[2] is None else (ending[2], ending[1])


def _contrast_ending(stem: str, aliases: Mapping[str, str] | None) -> tuple[int, str, str | None] | None:
    """Where the contrast that ends ``stem`` starts, the contrast, and the contrast of the token just before it when
    that one names another contrast (the name is then ambiguous); None when the name does not end in a contrast."""
    tokens = [(match.start(), match.group()) for match in _TOKENS.finditer(stem)]
    while len(tokens) > 1 and tokens[-1][1].lower() in _PROCESSING_TAGS:
        tokens.pop()
    if not tokens:
        return None
    last = _contrast_of(tokens[-1][1], aliases)
    compound = _compound_contrast(tokens[-2][1], tokens[-1][1], aliases) if len(tokens) > 1 else None
    if compound is not None:
        tokens, contrast = tokens[:-1], compound
    elif last is not None:
        contrast = last
    else:
        return None
    before = _contrast_of(tokens[-2][1], aliases) if len(tokens) > 1 else None
    return tokens[-1][0], contrast, before


def _contrast_of(token: str, aliases: Mapping[str, str] | None) -> str | None:
    try:
        return canonical_contrast(token, aliases)
    except DataError:
        return None


def _compound_contrast(first: str, second: str, aliases: Mapping[str, str] | None) -> str | None:
    """The one contrast two consecutive tokens name together, the first being a contrast: a known name written with
    a separator (``T2_FLAIR`` -> t2flair, ``T1-Gd``, ``T1+C``), a T1 followed by a contrast-agent word (``T1w_ce``,
    ``T1_KM``), or the same contrast twice (``T1_MPRAGE`` with ``aliases={"mprage": "T1"}``); else None."""
    contrast = _contrast_of(first, aliases)
    if contrast is None:
        return None
    joined = _contrast_of(first + second, aliases)
    if joined is not None:
        return joined
    if contrast in ("T1", "T1Gd") and second.lower() in _CONTRAST_AGENT_WORDS:
        return "T1Gd"
    return contrast if _contrast_of(second, aliases) == contrast else None


def contrasts_in_name(filename: str, aliases: Mapping[str, str] | None = None) -> list[str]:
    """The contrasts that any part of a NIfTI file name names (``P01_T2_TSE_AX.nii.gz`` -> ``["T2"]``,
    ``P01_T1_CE_AX.nii.gz`` -> ``["T1Gd"]``: two words read as one contrast as at a name's end), in order, once each:
    what :func:`parse_filename` did not read as the contrast of a name that does not end with one. None for a BIDS
    name, whose suffix alone names its contrast (``sub-01_mod-T1w_defacemask`` is a mask), and no T2 for a T2*
    (``P01_T2_star_AX``, a gradient-echo contrast of its own)."""
    return list(dict.fromkeys(contrast for _, contrast in _named_contrasts(filename, aliases)))


def _named_contrasts(filename: str, aliases: Mapping[str, str] | None) -> list[tuple[int, str]]:
    """Where each contrast named among a NIfTI file name's parts starts, and which it is (see
    :func:`contrasts_in_name`)."""
    stem = strip_image_extension(filename) or ""
    if _BIDS_NAME.match(stem):
        return []
    tokens = [(match.start(), match.group()) for match in _TOKENS.finditer(stem)]
    named = []
    index = 0
    while index < len(tokens):
        start, token = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if following.lower() == "star":  # T2_star: T2*-weighted, not a T2
            index += 2
            continue
        compound = _compound_contrast(token, following, aliases) if following else None
        if compound is not None:
            named.append((start, compound))
            index += 2
            continue
        contrast = _contrast_of(token, aliases)
        if contrast is not None:
            named.append((start, contrast))
        index += 1
    return named


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


def patient_id(case_id: str, folder: str = "") -> str:
    """The patient a case belongs to, so that splits keep all of a patient's cases together.

    BraTS 2023 ``BraTS-GLI-00001-000`` -> ``BraTS-GLI-00001`` (the last number is the time point);
    IXI ``IXI012-HH-1211`` -> ``IXI012``; BIDS ``sub-01_ses-2`` -> ``sub-01``; a TCGA barcode anywhere in the ID
    (``TCGA-FG-6692-native``) -> ``TCGA-FG-6692``. A case ID that names none of these takes the patient that its
    ``folder``'s name names, if any (files ``OtherEXampleFromTCIA_t1.nii.gz``, BraTS-Toolkit's outputs, in a folder
    ``TCGA-FG-6692``: the same subject as ``TCGA-FG-6692-native``, which a split must not put apart); anything else
    is its own patient.
    """
    for name in (case_id, folder):
        for rule in _PATIENT_RULES:
            match = rule.search(name)
            if match:
                return match.group(1)
    return case_id
