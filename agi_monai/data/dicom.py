"""DICOM: folders of files -> series -> contrasts, conversion to NIfTI, and writing a volume as a series.

Series are found with SimpleITK/GDCM (which groups files by series and sorts slices by position), their
descriptive tags are read with pydicom, and each series is matched to a canonical contrast by rules on
SeriesDescription/ProtocolName (:data:`DICOM_CONTRAST_RULES`) or by an explicit mapping.

:func:`write_derived_series` writes a synthesized volume as a new MR series of the reference input's study
(patient, study and frame of reference carried over), so that a viewer overlays it on the inputs.
"""

from __future__ import annotations

import locale
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.misc import is_dicom
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from agi_monai.data.contrasts import canonical_contrast
from agi_monai.data.errors import DataError
from agi_monai.data.files import atomic_output, temporary_path, walk_folders
from agi_monai.data.volumes import (
    VolumeSource, echo_frames, frame_echo_times, load_volume, metatensor_to_sitk, source_paths
)

_logger = logging.getLogger(__name__)
#: The Manufacturer tag of the series :func:`write_derived_series` writes: how a later run knows them.
SYNTHETIC_MANUFACTURER = "agi-monai"

__all__ = [
    "DICOM_CONTRAST_RULES",
    "DicomSeries",
    "find_dicom_series",
    "match_series_to_contrasts",
    "convert_dicom_to_nifti",
    "write_dicom_series",
    "write_derived_series",
    "DERIVED_SERIES_NUMBER_OFFSET",
]

DICOM_CONTRAST_RULES: tuple[tuple[str | None, str], ...] = (
    # (canonical contrast or None to ignore, regex searched in "SeriesDescription ProtocolName", lower case);
    # the first matching rule wins, so exclusions and the more specific contrasts come first. (?<![a-z0-9])x(?![a-z0-9])
    # is x as a word also between underscores ("AX_PD_TSE", "t1_se_tra_ce"), where \b sees none; the other \b
    # words (tse, tfe...) keep \b: between underscores they also name STIR, Dixon and B1-map series.
    (None, r"localizer|scout|survey|calibration|(?<![a-z0-9])loc(?![a-z0-9])|dwi|adc|diffusion|dti|perfusion|swi|tof|"
           r"mra|(?<![a-z0-9])mip(?![a-z0-9])|"
           # T2*-weighted (gradient echo, for blood products; SWAN is GE's SWI): not a T2, which the "t2" rule below
           # took them for. A gradient-echo word only with a T2: "AX T1 3D GRE", "T1 FFE", "t1_fl2d_tra" are T1s.
           r"t2[\s_-]*(?:\*|star(?![a-z]))|(?<![a-z0-9])swan(?![a-z0-9])|"
           r"(?<![a-z0-9])t2w?(?![a-z0-9]).*(?<![a-z0-9])(?:gre|ffe|fl[23]d|medic|merge|hemo)(?![a-z0-9])|"
           r"(?<![a-z0-9])(?:gre|ffe|fl[23]d|medic|merge|hemo)(?![a-z0-9]).*(?<![a-z0-9])t2w?(?![a-z0-9])"),
    # a "T1 FLAIR" (GE's T1-weighted inversion recovery) is a T1; "t1" elsewhere (an exam's protocol name) is not
    ("FLAIR", r"^(?!.*t1[\W_]*(?:w[\W_]*)?flair)(?:.*)(?:flair|t2f|dark[\s_-]?fluid)"),
    # contrast after a T1 ("ce" a word: "T1-CE", "t1_se_tra_ce"; "KM", German Kontrastmittel: "t1_se_tra_KM"), unless
    # said to be without it ("T1_WO_CE", "T1 w/o contrast", "pre-contrast", "ohne KM"; not an exam's "w/wo contrast"
    # or "with and without contrast", in the protocol name of every series)
    ("T1Gd", r"^(?!.*(?<![a-z0-9/])(?<!and[\W_])(?:w/o|wo|without|no|non|pre|ohne)[\W_]*(?:ce|contrast|gd|gad|km)"
             r"(?![a-z0-9]))(?:.*t1.*(?:gd|gad|contrast|post|\+\s*c|c\+|(?<![a-z0-9])(?:ce|km)(?![a-z0-9]))|.*t1c|"
             r".*t1ce|.*mprage.*post)"),
    ("T1", r"t1|mprage|spgr|bravo|\btfe\b|\btfl\b"),
    ("PD", r"(?<![a-z0-9])pd(?![a-z0-9])|pdw|proton[\s_-]?density|pd[\s_-]?w"),
    ("T2", r"t2|\btse\b|\bfse\b"),
)

_NOT_DICOM_SUFFIXES = (".nii", ".nii.gz", ".json", ".txt", ".md", ".csv", ".png", ".jpg", ".py", ".npy", ".npz", ".mat")


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series: its files in slice order and the tags used to name and match it."""

    series_uid: str
    files: tuple[str, ...]
    description: str
    protocol: str
    series_number: str
    patient_id: str
    study_uid: str
    contrast_agent: str
    manufacturer: str = ""
    #: 1, 2, ... by echo time when the series holds several echoes (a dual-echo PD/T2 sequence), 0 otherwise
    echo: int = 0
    echo_time: float | None = None
    modality: str = "MR"
    #: the echo is frames of enhanced multi-frame files that also hold other echoes' frames, not files of its own
    echo_in_frames: bool = False

    @property
    def synthetic(self) -> bool:
        """Written by :func:`write_derived_series` (a synthesized contrast, not an acquired one)."""
        return self.manufacturer == SYNTHETIC_MANUFACTURER

    @property
    def volume_source(self) -> list[str] | dict[str, object]:
        """A case's entry for the series (what :func:`load_volume` reads): its files, or, for an echo of multi-frame
        files, those files and the echo's time, which selects its frames (:func:`echo_frames`)."""
        return echo_frames(self.files, self.echo_time) if self.echo_in_frames else list(self.files)

    @property
    def label(self) -> str:
        """How reports name the series: description, echo, number and folder."""
        echo = f" echo {self.echo} (TE {self.echo_time:g} ms)" if self.echo else ""
        return f"'{self.description or self.protocol}'{echo} (series {self.series_number}, {Path(self.files[0]).parent})"

    def selected_by(self, selector: str) -> bool:
        """Whether a ``dicom_mapping`` selector names this series: its SeriesInstanceUID, SeriesNumber or
        SeriesDescription (case-insensitive), or, for one echo of a multi-echo series, one of those followed by
        ``echo N``."""
        def names(text: str) -> bool:
            return text in (self.series_uid, self.series_number) or text.lower() == self.description.lower()

        selector = str(selector)  # a SeriesNumber given as a number: --discovery#dicom_mapping "{'T1': 2}"
        if names(selector):  # a description may itself end in "echo 2"
            return True
        one_echo = re.fullmatch(r"(.*?)\s+echo\s+(\d+)", selector.strip(), re.IGNORECASE)
        return bool(self.echo and one_echo and int(one_echo.group(2)) == self.echo and names(one_echo.group(1)))


def _patient_id_text(value: object) -> str:
    """A PatientID as text: "" when missing (discovery names such a study after its folder); a multi-valued one
    (``a\\b``: invalid for this tag, but seen) as written, not as Python's list text ``['a', 'b']``."""
    if isinstance(value, MultiValue):
        return "\\".join(str(part) for part in value).strip()
    return str(value).strip()


def find_dicom_series(root: str | Path) -> list[DicomSeries]:
    """All DICOM series below ``root`` (recursively, through linked folders), ordered by folder and series number."""
    found: list[DicomSeries] = []
    for folder, names in sorted(walk_folders(root)):
        # DICOMDIR: a media export's index (its images sit in folders below), no image of its own
        candidates = [name for name in names if not name.lower().endswith(_NOT_DICOM_SUFFIXES) and name.upper() != "DICOMDIR"]
        if not candidates or not any(is_dicom(os.path.join(folder, name)) for name in candidates[:5]):
            continue
        for series_uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid))
            header = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)  # GDCM listed it: a DICOM file
            tags = dict(
                series_uid=series_uid,
                description=str(header.get("SeriesDescription", "")),
                protocol=str(header.get("ProtocolName", "")),
                series_number=str(header.get("SeriesNumber", "")),
                patient_id=_patient_id_text(header.get("PatientID", "")),
                study_uid=str(header.get("StudyInstanceUID", "")),
                contrast_agent=_contrast_agent(header),
                manufacturer=str(header.get("Manufacturer", "")),
                modality=str(header.get("Modality", "")),
            )
            multiframe = int(header.get("NumberOfFrames") or 1) > 1
            echoes = _files_by_frame_echo_time(files, header) if multiframe else _files_by_echo_time(files)
            if len(echoes) > 1:  # one volume per echo: stacked together, the slices of two echoes interleave
                for echo, echo_time in enumerate(sorted(echoes), start=1):
                    found.append(DicomSeries(files=echoes[echo_time], echo=echo, echo_time=echo_time,
                                             echo_in_frames=multiframe, **tags))
            else:
                found.append(DicomSeries(files=files, **tags))
    return sorted(found, key=lambda series: (str(Path(series.files[0]).parent), _number(series.series_number)))


def _files_by_echo_time(files: Sequence[str]) -> dict[float, tuple[str, ...]]:
    """The files of one series grouped by EchoTime (in their order); {} unless every file has one number there.
    (A series left whole with several slices per position is refused when it is read, naming the count.)"""
    groups: dict[float, list[str]] = {}
    for name in files:
        value = None
        try:
            value = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=["EchoTime"], force=True).get("EchoTime")
            echo_time = float(value)  # a missing (None), empty, multi-valued or non-numeric one raises
        except Exception:  # pydicom raises several types for unreadable files; GDCM's reading names the problem
            if groups:  # the files before it had one
                _logger.warning("%s: no usable EchoTime (%r), where other files of its series have one: the series "
                                "is not split by echo", name, value)
            return {}
        groups.setdefault(echo_time, []).append(name)
    return {echo_time: tuple(names) for echo_time, names in groups.items()}


def _files_by_frame_echo_time(files: Sequence[str], first: pydicom.Dataset) -> dict[float, tuple[str, ...]]:
    """The enhanced multi-frame files of one series grouped by the EffectiveEchoTime of their frames (a file holding
    two echoes is in both groups); {} unless every frame has one (the series is then read whole, and refused there if
    it holds several frames per position). ``first``: the header of ``files[0]``, already read."""
    groups: dict[float, list[str]] = {}
    for name in files:
        try:
            header = first if name == files[0] else pydicom.dcmread(name, stop_before_pixels=True, force=True)
            echo_times = frame_echo_times(header)
        except Exception:  # pydicom raises several types for unreadable files; reading the series names the problem
            return {}
        if not echo_times or None in echo_times:
            return {}
        for echo_time in dict.fromkeys(echo_times):  # the file's echoes, in their order
            groups.setdefault(echo_time, []).append(name)
    return {echo_time: tuple(names) for echo_time, names in groups.items()}


def _contrast_agent(header: pydicom.Dataset) -> str:
    """The contrast agent a series was acquired with, "" for none: ContrastBolusAgent (classic MR images), or the
    agents' names in ContrastBolusAgentSequence (enhanced multi-frame MR images, which have no ContrastBolusAgent)."""
    agent = str(header.get("ContrastBolusAgent", "")).strip()
    if agent:
        return agent
    items = header.get("ContrastBolusAgentSequence") or []
    return ", ".join(str(item.get("CodeMeaning", "")).strip() or "unnamed agent" for item in items)


def match_series_to_contrasts(
    series: Sequence[DicomSeries],
    mapping: Mapping[str, str] | None = None,
    rules: Sequence[tuple[str | None, str]] = DICOM_CONTRAST_RULES,
) -> dict[str, DicomSeries]:
    """Assign the series of one study to canonical contrasts.

    Args:
        series: the series of one study.
        mapping: explicit contrast -> selector, a selector being a SeriesInstanceUID, a SeriesNumber or a
            SeriesDescription (case-insensitive), followed by ``echo N`` for one echo of a multi-echo series
            (:meth:`DicomSeries.selected_by`); the contrasts it does not name are matched by the rules among
            the series it does not select (so ``{"T2": "AX T2 FSE"}`` settles two T2 series and nothing else).
        rules: ordered (contrast or None, regex) rules on "SeriesDescription ProtocolName" (on the
            SeriesDescription alone, where a rule reads it, when every acquired MR series of the study has one
            ProtocolName: the exam's, as GE writes it); a T1 series whose ContrastBolusAgent tag is set counts as T1Gd. The two echoes of a dual-echo series named for
            both PD and T2 (e.g. "PD+T2 TSE": the rules' PD and T2 patterns both match) are PD (the shorter echo
            time) and T2. The rules match MR images only (not a segmentation or structure set named "T1
            contours"), and never series synthesized by agi-monai (written into the study by an earlier run, e.g.
            "SYNTHETIC FLAIR ..."): a later run would otherwise take them for acquired contrasts. A mapping can
            still select one.

    Raises:
        DataError: a selector matches no series, or several series match one contrast (give a mapping).
    """
    matched: dict[str, DicomSeries] = {}
    for name, selector in (mapping or {}).items():
        contrast = canonical_contrast(name)
        hits = [s for s in series if s.selected_by(selector)]
        if len(hits) != 1:
            labels = ", ".join(s.label for s in series)
            echoes = len(hits) > 1 and all(s.echo for s in hits)
            raise DataError(
                f"{contrast} = {selector!r}", f"matches {len(hits)} series among: {labels}",
                f"exactly one{' (one echo: add echo 1 or echo 2 ... to the selector)' if echoes else ''}",
            )
        matched[contrast] = hits[0]
    selected = {(item.series_uid, item.echo) for item in matched.values()}

    patterns = {name: pattern for name, pattern in rules if name is not None}
    # A ProtocolName shared by every acquired series of the study names the exam, as GE's does ("BRAIN TUMOR
    # CONTRAST" on the pre-contrast T1 too), not the series: there the rules read the SeriesDescription alone.
    # Siemens and Philips name each series' protocol ("t1_mprage_sag_post"), which still counts.
    # Counted over the acquired MR series that have one (a SEG or a screen save without one says nothing).
    protocols = {item.series_uid: item.protocol.strip().lower() for item in series
                 if not item.synthetic and item.modality in ("MR", "") and item.protocol.strip()}
    exam_protocol = next(iter(protocols.values())) if len(protocols) > 1 and len(set(protocols.values())) == 1 else None
    candidates: dict[str, list[DicomSeries]] = {}
    for item in series:
        if (item.series_uid, item.echo) in selected:
            continue
        if item.synthetic:
            _logger.info("%s: synthesized by %s, not used as an input", item.label, SYNTHETIC_MANUFACTURER)
            continue
        if item.modality not in ("MR", ""):  # a segmentation, structure set, report... named "T1 tumour contours"
            _logger.info("%s: modality %s, not an MR image, not used as an input", item.label, item.modality)
            continue
        texts = [f"{item.description} {item.protocol}".lower()]
        if exam_protocol is not None and item.protocol.strip().lower() == exam_protocol:
            # the description alone first, if any rule reads it ("Ax pre" names nothing: then with the protocol)
            texts.insert(0, item.description.lower())
        text, contrast = next(((t, name) for t in texts for name, pattern in rules if re.search(pattern, t)), (texts[-1], None))
        if contrast == "T1" and item.contrast_agent.strip():
            contrast = "T1Gd"
        echoes = sum(1 for other in series if other.series_uid == item.series_uid and other.echo)
        if echoes == 2 and contrast in ("PD", "T2") and all(re.search(patterns.get(c, "$^"), text) for c in ("PD", "T2")):
            contrast = "PD" if item.echo == 1 else "T2"  # a dual-echo PD/T2 sequence: PD is the short echo
        if contrast is not None and contrast not in matched:
            candidates.setdefault(contrast, []).append(item)
    ambiguous = {contrast: items for contrast, items in candidates.items() if len(items) > 1}
    if ambiguous:
        details = "; ".join(f"{c}: " + ", ".join(s.label for s in items) for c, items in ambiguous.items())
        # the study's folder, not the first series' own: series often sit in folders of their own
        study_folder = os.path.commonpath([str(Path(s.files[0]).parent) for s in series])
        raise DataError(
            study_folder,
            f"several series match one contrast ({details})",
            "an explicit mapping",
        )
    return {**{contrast: items[0] for contrast, items in candidates.items()}, **matched}


def convert_dicom_to_nifti(case: Mapping[str, object], output_dir: str | Path) -> dict[str, object]:
    """Write each DICOM-series contrast of ``case`` as ``<case_id>-<contrast>.nii.gz`` in ``output_dir``
    (atomically) and return the case with those NIfTI paths. NIfTI entries are passed through."""
    case_id = str(case.get("case_id", "case"))
    converted = dict(case)
    for key, value in case.items():
        if not is_dicom_source(value):
            continue
        image = metatensor_to_sitk(load_volume(value))  # the same checks as for training
        path = Path(output_dir) / f"{case_id}-{key}.nii.gz"
        with atomic_output(path) as temporary:
            sitk.WriteImage(image, str(temporary), useCompression=True)
        converted[key] = str(path)
    return converted


def write_dicom_series(
    image: sitk.Image,
    folder: str | Path,
    series_description: str,
    patient_id: str = "ANONYMOUS",
    series_number: int = 1,
    study_uid: str | None = None,
) -> list[Path]:
    """Write a 3D image as an MR DICOM series, one file per slice (each written atomically), keeping its
    geometry (origin, spacing and any oblique direction) in the per-slice position/orientation tags.

    Integer images are written as int16; others as 16-bit integers with a rescale slope (about 1/32000 of
    the largest magnitude), as scanners do. Follows SimpleITK's "DICOM series from array" example.

    Args:
        image: the volume (LPS geometry, as SimpleITK reads it).
        folder: output folder (created).
        series_description: SeriesDescription and ProtocolName, e.g. ``"AX T2 FSE"``.
        patient_id: PatientID and PatientName.
        series_number: SeriesNumber.
        study_uid: StudyInstanceUID, shared by the series of one study; a new one when None.

    Returns:
        The written files in slice order.
    """
    folder = Path(folder)
    pixels, pixel_tags = _pixel_tags(image)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    study_uid = study_uid or generate_uid()
    shared = {
        "0008|0060": "MR",
        "0008|0008": "DERIVED\\SECONDARY",
        "0010|0010": patient_id,
        "0010|0020": patient_id,
        "0020|000d": study_uid,
        "0020|000e": generate_uid(),
        "0020|0052": generate_uid(),
        "0008|103e": series_description,
        "0018|1030": series_description,
        "0020|0011": str(series_number),
        # row and column direction cosines: the first two columns of the direction matrix
        "0020|0037": "\\".join(_decimal_string(v) for v in (*direction[:, 0], *direction[:, 1])),
        "0018|0050": _decimal_string(image.GetSpacing()[2]),
        "0018|0088": _decimal_string(image.GetSpacing()[2]),
        **pixel_tags,
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep the UIDs above instead of new ones per file
    with _preserved_locale():
        written = [
            _write_slice(writer, pixels, image, index, shared, folder / f"{series_number:03d}_{index + 1:04d}.dcm")
            for index in range(pixels.GetDepth())
        ]
    return written


def _write_slice(
    writer: sitk.ImageFileWriter,
    pixels: sitk.Image,
    image: sitk.Image,
    index: int,
    shared: Mapping[str, str],
    path: Path,
) -> Path:
    plane = pixels[:, :, index]
    for tag, value in shared.items():
        plane.SetMetaData(tag, value)
    position = image.TransformIndexToPhysicalPoint((0, 0, index))
    plane.SetMetaData("0020|0032", "\\".join(_decimal_string(v) for v in position))
    plane.SetMetaData("0020|0013", str(index + 1))
    plane.SetMetaData("0008|0018", generate_uid())
    with atomic_output(path) as temporary:
        writer.SetFileName(str(temporary))
        writer.Execute(plane)
    return path


@contextmanager
def _preserved_locale() -> Iterator[None]:
    """GDCM's DICOM writer leaves the process locale at "C", which turns Python's default text encoding
    into ASCII; put it back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _pixel_tags(image: sitk.Image) -> tuple[sitk.Image, dict[str, str]]:
    """The image to hand to GDCM and the pixel tags for it: integer images are stored as int16; others
    as signed 16-bit integers through a rescale slope, which GDCM applies (SimpleITK's documented way)."""
    values = sitk.GetArrayViewFromImage(image)
    low, high = float(values.min()), float(values.max())
    if np.issubdtype(values.dtype, np.integer) and -32768 <= low and high <= 32767:
        return sitk.Cast(image, sitk.sitkInt16), {}
    slope = max(abs(low), abs(high), 1e-12) / 32000.0
    tags = {
        "0028|1053": _decimal_string(slope),
        "0028|1052": "0",
        "0028|0100": "16",
        "0028|0101": "16",
        "0028|0102": "15",
        "0028|0103": "1",
    }
    return sitk.Cast(image, sitk.sitkFloat64), tags


#: A derived series is numbered this much above its reference series (1000 + 4 for a reference series 4).
DERIVED_SERIES_NUMBER_OFFSET = 1000

# Patient, study and frame-of-reference tags a derived series shares with its reference series: the same
# patient and study, and the same patient coordinate system (FrameOfReferenceUID), so viewers overlay them.
_CARRIED_OVER_TAGS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "BodyPartExamined",
    "PatientPosition",
)
_UINT16_MAX = 65535
# The Type 2 attributes (present, empty when unknown) of the MR Image IOD's modules that a synthesized series cannot
# take from anywhere when its reference lacks them, or when there is none (NIfTI input): PS3.3 C.7.1.1 Patient,
# C.7.2.1 General Study, C.7.3.1 General Series (Patient Position: 2C, required for MR), C.7.4.1 Frame of Reference.
# A PACS may refuse an instance without them (pydicom's DICOMDIR writer does).
_TYPE_2_EMPTY_WHEN_UNKNOWN = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "PatientPosition", "PositionReferenceIndicator",
)


def write_derived_series(
    image: sitk.Image,
    folder: str | Path,
    series_description: str,
    derivation_description: str,
    reference: VolumeSource | None = None,
    case_id: str = "SYNTHETIC",
    overwrite: bool = False,
) -> list[Path]:
    """Write a synthesized volume as a new MR series (one file per slice), derived from a reference series.

    The series is a new one (new SeriesInstanceUID and SOPInstanceUIDs) with ImageType DERIVED\\SECONDARY and
    the given descriptions. With a ``reference`` (a file of the input series the volume was synthesized on,
    or that series' files, or its folder, or the case entry of one echo of multi-frame files) the patient, study and
    frame-of-reference tags are copied from it (:data:`_CARRIED_OVER_TAGS`) and the series number is the
    reference's plus :data:`DERIVED_SERIES_NUMBER_OFFSET`. Without one (NIfTI input), a new study is made whose patient is
    marked synthetic: PatientName ``SYNTHETIC^<case_id>``, PatientID ``case_id``, new Study and Frame of
    Reference UIDs.

    Geometry comes from ``image`` (which must be on the reference grid): ImagePositionPatient per slice,
    ImageOrientationPatient, PixelSpacing, SliceThickness and SpacingBetweenSlices, any oblique direction
    kept. Intensities are stored as unsigned 16-bit integers with RescaleIntercept = the minimum and
    RescaleSlope = (maximum - minimum) / 65535, so a reader recovers every voxel within half a step
    (1/131070 of the range). Unsigned with an intercept rather than signed: a synthesized image in [0, 1]
    uses all 65536 levels instead of 32768.

    The series is written into a temporary folder beside ``folder`` and renamed onto it when complete, so
    ``folder`` never holds a partial series.

    Args:
        image: the volume (SimpleITK's LPS geometry, e.g. ``sitk.ReadImage`` of the synthesized NIfTI).
        folder: the series folder to create (its files: ``IM_0001.dcm`` ...).
        series_description: SeriesDescription (at most 64 characters), e.g. ``"SYNTHETIC FLAIR (bundle)"``.
        derivation_description: DerivationDescription, how the image was made (at most 1024 characters).
        reference: the reference input series (its first file is read), or None for a new study.
        case_id: the patient ID of the new study when there is no reference.
        overwrite: replace an existing ``folder``; otherwise an existing one is an error.

    Returns:
        The written files in slice order.

    Raises:
        DataError: ``folder`` exists and ``overwrite`` is False; a description is too long; the reference
            cannot be read; ``image`` is not 3D.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise DataError(folder, "already exists", "a new output folder, or overwrite=True to replace it")
    if len(series_description) > 64:
        raise DataError(series_description, f"is {len(series_description)} characters long", "a SeriesDescription of at most 64")
    if image.GetDimension() != 3:
        raise DataError(folder, f"the image to write has {image.GetDimension()} dimensions", "a 3D volume")
    header = _series_header(image, series_description, derivation_description, reference, case_id)
    stored, intercept, slope = _quantize_uint16(sitk.GetArrayFromImage(image))
    header.RescaleIntercept = _ds(intercept)
    header.RescaleSlope = _ds(slope)
    header.RescaleType = "US"  # unspecified units: MR magnitude, normalised by the bundle
    low, high = intercept, intercept + slope * _UINT16_MAX
    header.WindowCenter = _ds((low + high) / 2)
    header.WindowWidth = _ds(max(high - low, 1e-6))
    # the window spans the image's values, [0, 1] at most: LINEAR (the default) requires a width >= 1 (PS3.3
    # C.11.2.1.2) and a viewer applying it shows such a window thresholded; LINEAR_EXACT takes any width > 0
    header.VOILUTFunction = "LINEAR_EXACT"

    with _atomic_folder(folder, overwrite) as temporary:
        written = []
        for index in range(stored.shape[0]):
            path = temporary / f"IM_{index + 1:04d}.dcm"
            _slice_dataset(header, image, index, stored[index]).save_as(path, enforce_file_format=True)
            written.append(folder / path.name)
    return written


def _series_header(
    image: sitk.Image,
    series_description: str,
    derivation_description: str,
    reference: VolumeSource | None,
    case_id: str,
) -> Dataset:
    """The tags every slice of a derived series shares."""
    now = datetime.now()
    header = Dataset()
    if reference is not None:
        source = _reference_file(reference)
        try:
            reference_header = pydicom.dcmread(source, stop_before_pixels=True, force=True)  # as discovery reads it
        except Exception as error:  # pydicom raises several types for unreadable files; report the file
            raise DataError(source, f"cannot be read as DICOM ({error})", "the reference input series") from error
        for keyword in _CARRIED_OVER_TAGS:
            if keyword in reference_header:
                header[keyword] = reference_header[keyword]
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):  # Type 1: a reference without one gets a new one
            if not str(header.get(keyword, "")).strip():
                setattr(header, keyword, generate_uid())
        number = _number(str(reference_header.get("SeriesNumber", "")))
        header.SeriesNumber = DERIVED_SERIES_NUMBER_OFFSET + (int(number) if np.isfinite(number) else 0)
    else:
        header.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
        header.PatientName = f"SYNTHETIC^{case_id}"[:64]
        header.PatientID = case_id[:64]
        header.StudyInstanceUID = generate_uid()
        header.FrameOfReferenceUID = generate_uid()
        header.StudyDate, header.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        header.StudyDescription = "agi-monai synthesis from NIfTI (no DICOM reference)"
        header.StudyID = "SYNTHETIC"  # Type 2, but a media export (DICOMDIR) needs one: this study is ours to name
        header.PositionReferenceIndicator = ""
        header.SeriesNumber = DERIVED_SERIES_NUMBER_OFFSET
    if "SpecificCharacterSet" not in header:
        header.SpecificCharacterSet = "ISO_IR 192"
    for keyword in _TYPE_2_EMPTY_WHEN_UNKNOWN:
        if keyword not in header:
            setattr(header, keyword, "")
    header.SOPClassUID = MRImageStorage
    header.Modality = "MR"
    # value 3 is required for MR images; OTHER: none of the MR-specific defined terms fits a synthesized image
    header.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    header.SeriesInstanceUID = generate_uid()
    header.SeriesDescription = series_description
    header.DerivationDescription = derivation_description[:1024]
    header.SeriesDate = header.ContentDate = header.InstanceCreationDate = now.strftime("%Y%m%d")
    header.SeriesTime = header.ContentTime = header.InstanceCreationTime = now.strftime("%H%M%S")
    header.Manufacturer = SYNTHETIC_MANUFACTURER
    header.BurnedInAnnotation = "NO"
    # MR Image module attributes that describe an acquisition; a synthesized image has none (RM: research mode)
    header.ScanningSequence, header.SequenceVariant, header.ScanOptions = "RM", "NONE", ""
    header.MRAcquisitionType = ""
    header.RepetitionTime = header.EchoTime = header.EchoTrainLength = None
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    header.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    header.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # between rows (along y), between columns (along x)
    header.SliceThickness = header.SpacingBetweenSlices = _ds(spacing[2])
    return header


def _slice_dataset(header: Dataset, image: sitk.Image, index: int, pixels: np.ndarray) -> Dataset:
    """One slice's file: the shared header, its position and its pixels."""
    dataset = Dataset()
    dataset.update(header)
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    position = image.TransformIndexToPhysicalPoint((0, 0, index))
    normal = np.cross(*np.asarray(image.GetDirection()).reshape(3, 3)[:, :2].T)
    dataset.ImagePositionPatient = [_ds(v) for v in position]
    dataset.SliceLocation = _ds(float(np.dot(normal, position)))
    dataset.InstanceNumber = index + 1
    # sets Rows, Columns, the pixel-format tags and a new SOPInstanceUID (also in the file meta)
    dataset.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=16)
    dataset.file_meta.MediaStorageSOPClassUID = MRImageStorage
    return dataset


def _quantize_uint16(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored uint16 values, intercept and slope with ``values ~ stored * slope + intercept``; the slope and
    intercept are the values their decimal strings read back as, so the error stays within half a step."""
    low, high = float(values.min()), float(values.max())
    intercept = float(_ds(low))
    slope = float(_ds((high - intercept) / _UINT16_MAX)) if high > intercept else 1.0
    stored = np.clip(np.rint((values.astype(np.float64) - intercept) / slope), 0, _UINT16_MAX)
    return stored.astype(np.uint16), intercept, slope


def _reference_file(reference: VolumeSource) -> Path:
    """The first file of a reference series given as a file, its files, a folder holding one series, or one echo of
    multi-frame files (whose files hold the study's tags as any series' do)."""
    if isinstance(reference, Mapping):
        reference = source_paths(reference)
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if not path.is_dir():
            return path
        series = find_dicom_series(path)
        if len(series) != 1:
            raise DataError(path, f"holds {len(series)} DICOM series", "the folder of one reference series")
        return Path(series[0].files[0])
    if not reference:
        raise DataError("<reference>", "is an empty list of files", "the files of the reference series")
    return Path(reference[0])


@contextmanager
def _atomic_folder(folder: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``, renamed onto it when the block succeeds (an existing
    ``folder`` is replaced only then, when ``overwrite``), removed when it fails."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(folder)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        if folder.exists():
            if not overwrite:
                raise DataError(folder, "appeared while it was being written", "a new output folder")
            # a temporary name too: a run killed between the two renames leaves nothing the next run keeps
            replaced = temporary_path(folder.with_name(f"replaced-{folder.name}"))
            os.replace(folder, replaced)
            os.replace(temporary, folder)
            shutil.rmtree(replaced)
        else:
            os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) with as many digits as fit."""
    return format_number_as_ds(float(value))


def _decimal_string(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    return format(float(value), ".10g")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def is_dicom_source(value: object) -> bool:
    """Whether a case entry is a DICOM series: its files, its folder, or one echo of multi-frame files (a mapping,
    :func:`agi_monai.data.volumes.echo_frames`); a NIfTI file is not."""
    if isinstance(value, Mapping):
        return True
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, (str, Path)) and Path(value).is_dir()
