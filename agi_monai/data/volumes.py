"""Reading one MR volume (NIfTI file or DICOM series) into a checked MONAI ``MetaTensor``, and the
conversions between ``MetaTensor`` (RAS affine, MONAI) and ``SimpleITK.Image`` (LPS, registration, DICOM).
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
import torch
from monai.data import MetaTensor, NibabelReader
from monai.data.utils import affine_to_spacing
from monai.transforms import EnsureChannelFirst, LoadImage

from agi_monai.data.errors import DataError, MissingFileError

__all__ = [
    "VolumeSource", "load_volume", "check_volume", "missing_file_error", "sitk_to_metatensor", "metatensor_to_sitk",
    "echo_frames", "source_paths", "with_source_paths", "frame_echo_times",
]

VolumeSource = str | Path | Sequence[str] | Mapping[str, object]
"""A NIfTI file, a folder holding one DICOM series, the files of one DICOM series, or one echo of enhanced multi-frame
files that hold several (:func:`echo_frames`)."""

# NIfTI/MONAI affines map voxels to RAS+ world coordinates, ITK/DICOM to LPS: flip x and y.
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])
_NIFTI_LOADER = LoadImage(reader=NibabelReader, image_only=True, dtype=np.float32)
_ORTHONORMAL_TOLERANCE = 1e-4


def echo_frames(files: Sequence[str], echo_time: float) -> dict[str, object]:
    """The volume source of one echo of enhanced multi-frame files holding several echoes (a dual-echo PD/T2 sequence
    exported as one file): ``{"files": [...], "echo_time": <ms>}``, the frames whose ``EffectiveEchoTime`` (per-frame
    ``MREchoSequence``) is ``echo_time``. A mapping, not a frame list: it reads as what it selects, stays right when a
    file is exported again with its frames in another order, and survives JSON datalists and MONAI datasets as it is."""
    return {"files": [str(name) for name in files], "echo_time": float(echo_time)}


def source_paths(source: VolumeSource) -> list[str]:
    """The files or folder a volume source names (a NIfTI file, a series folder, a series' files, an echo's files)."""
    if isinstance(source, Mapping):
        return _echo_selection(source)[0]
    if isinstance(source, (list, tuple)):
        return [str(name) for name in source]
    return [str(source)]


def with_source_paths(source: VolumeSource, change: Callable[[str], str]) -> VolumeSource:
    """``source`` with each path it names replaced by ``change(path)``, in the same form: how a datalist's entries are
    made relative to it or absolute."""
    if isinstance(source, Mapping):
        files, echo_time = _echo_selection(source)
        return echo_frames([change(name) for name in files], echo_time)
    if isinstance(source, (list, tuple)):
        return [change(str(name)) for name in source]
    return change(str(source))


def load_volume(source: VolumeSource) -> MetaTensor:
    """Read and check one 3D volume; returns a channel-first float32 ``MetaTensor`` of shape (1, X, Y, Z).

    NIfTI files go through MONAI's ``LoadImage`` (nibabel), so the metadata is what every MONAI transform
    and writer expects. DICOM series go through SimpleITK (GDCM), which groups and sorts slices by
    geometry, handles oblique series, and gives the same RAS affine.

    Args:
        source: a ``.nii``/``.nii.gz`` file, a folder holding exactly one DICOM series, a list of the
            files of one DICOM series, or one echo of enhanced multi-frame files (:func:`echo_frames`).

    Raises:
        DataError: naming the file, when it is missing (a :class:`MissingFileError`, see
            :func:`missing_file_error`), unreadable, truncated, not NIfTI despite its name, not 3D, contains NaN/Inf,
            or is constant (see :func:`check_volume`); an echo selection that is malformed, names classic files, or
            an echo time none of its frames has.
    """
    if isinstance(source, Mapping):
        volume = _load_dicom_series(*_echo_selection(source))
    elif isinstance(source, (str, Path)) and not Path(source).is_dir():
        volume = _load_nifti(Path(source))
    else:
        volume = _load_dicom_series(source)
    check_volume(volume, volume.meta.get("filename_or_obj", str(source)))
    return EnsureChannelFirst(channel_dim="no_channel")(volume)


def check_volume(volume: torch.Tensor | np.ndarray, source: str) -> None:
    """Raise a :class:`DataError` naming ``source`` unless ``volume`` (no channel dim) is a usable 3D image."""
    shape = tuple(volume.shape)
    if len(shape) != 3:
        raise DataError(source, f"has {len(shape)} dimensions, shape {shape}", "a 3D volume")
    if min(shape) == 0:
        raise DataError(source, f"is empty, shape {shape}", "a 3D volume with voxels")
    if min(shape) == 1:
        raise DataError(source, f"is a single 2D slice, shape {shape}", "a 3D volume")
    values = torch.as_tensor(volume)
    non_finite = int((~torch.isfinite(values)).sum())
    if non_finite:
        raise DataError(source, f"contains {non_finite} NaN/Inf voxels", "finite intensities")
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise DataError(source, f"is constant (every voxel is {low:g})", "an image with some contrast")


def missing_file_error(source: str | Path) -> MissingFileError | None:
    """The error for a volume path that is neither a file nor a folder (None when it is one): the one wording of a
    missing NIfTI file or DICOM series folder, for :func:`load_volume` and for ``train.json``'s datalist check, which
    names it before any volume is preprocessed."""
    if Path(source).is_file() or Path(source).is_dir():
        return None
    # a path without a NIfTI extension may have been meant as a DICOM series folder
    nifti = str(source).lower().endswith((".nii", ".nii.gz"))
    return MissingFileError(
        source, "file not found", "an existing NIfTI file" if nifti else "an existing NIfTI file or DICOM series folder"
    )


def _load_nifti(path: Path) -> MetaTensor:
    missing = missing_file_error(path)
    if missing is not None:
        raise missing
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise DataError(path, "has no NIfTI extension", ".nii or .nii.gz, or a DICOM series folder")
    with open(path, "rb") as file:
        start = file.read(4)
    if not start:
        raise DataError(path, "is empty (0 bytes)", "a NIfTI-1/2 image")
    if path.name.lower().endswith(".gz") and start[:2] != b"\x1f\x8b" and int.from_bytes(start, "little") in (348, 540):
        # nibabel would only say "not a gzip file", which reads as "not an image"
        raise DataError(path, "is an uncompressed NIfTI file named .nii.gz", "gzip-compressed data, or the name .nii")
    try:
        # a reader given at call time makes LoadImage raise the reader's own error instead of a generic one
        volume = _NIFTI_LOADER(path, reader=NibabelReader())
    except nib.filebasedimages.ImageFileError as error:
        raise DataError(path, f"is not a NIfTI file ({error})", "a NIfTI-1/2 image") from error
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(path, f"is truncated or its compressed data is corrupt ({error})", "a complete file") from error
    except Exception as error:  # nibabel raises many types for malformed headers; all mean the same here
        raise DataError(path, f"cannot be read ({type(error).__name__}: {error})", "a NIfTI-1/2 image") from error
    # NIfTI stores a 3D volume with a trailing time axis of length 1 as 4D; that is still 3D
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    return _in_millimetres(volume)


#: Millimetres per NIfTI spatial unit other than mm (``xyzt_units & 7``: 1 metre, 3 micron; 0, unknown, is read as mm).
_MM_PER_NIFTI_UNIT = {1: 1000.0, 3: 0.001}
_NIFTI_UNITS_MM = 2


def _in_millimetres(volume: MetaTensor) -> MetaTensor:
    """``volume`` with its affines in mm, where its header gives them in metres or microns: SimpleITK reads such a file
    in mm, and every writer here marks its output mm, so an output with the input's affine as it was would lie on
    another grid (a thousandth of its size, for a micron header) in every ITK-based tool."""
    units = int(volume.meta.get("xyzt_units", 0))
    factor = _MM_PER_NIFTI_UNIT.get(units & 7)
    if factor is None:
        return volume
    scale = np.diag([factor, factor, factor, 1.0])
    for key in ("affine", "original_affine"):
        if key in volume.meta:
            affine = volume.meta[key]
            volume.meta[key] = (torch.as_tensor(scale, dtype=affine.dtype) @ affine if isinstance(affine, torch.Tensor)
                                else scale @ np.asarray(affine))
    volume.meta["xyzt_units"] = (units & ~7) | _NIFTI_UNITS_MM
    return volume


def _echo_selection(source: Mapping[str, object]) -> tuple[list[str], float]:
    """The files and echo time of an :func:`echo_frames` source, checked."""
    files, echo_time = source.get("files"), source.get("echo_time")
    named = isinstance(files, (list, tuple)) and bool(files) and all(isinstance(name, (str, Path)) for name in files)
    where = str(files[0]) if named else "<echo selection>"
    expected = ('{"files": [the multi-frame files], "echo_time": <ms>}, the frames of one echo (as discovery writes '
                "it)")
    if set(source) != {"files", "echo_time"}:
        raise DataError(where, f"is selected by the keys {', '.join(map(repr, source))}", expected)
    if not named:
        raise DataError(where, f"has files {files!r}", f"a non-empty list of file names: {expected}")
    if isinstance(echo_time, bool) or not isinstance(echo_time, (int, float)) or not math.isfinite(echo_time):
        raise DataError(where, f"has echo_time {echo_time!r}", "a number of milliseconds, the EffectiveEchoTime of "
                                                               "the frames to read")
    return [str(name) for name in files], float(echo_time)


def _load_dicom_series(source: str | Path | Sequence[str], echo_time: float | None = None) -> MetaTensor:
    if isinstance(source, (str, Path)):
        folder = str(source)
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
        if len(series_ids) != 1:
            found = "no DICOM series" if not series_ids else f"{len(series_ids)} DICOM series"
            raise DataError(folder, f"holds {found}", "a folder with exactly one DICOM series (or its file list)")
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_ids[0]))
    else:
        files = [str(name) for name in source]
        if not files:
            raise DataError("<empty file list>", "no DICOM files given", "the files of one DICOM series")
    label = str(Path(files[0]).parent) if len(files) > 1 else files[0]
    multiframe = _is_multiframe(files[0])
    if echo_time is not None:
        if not multiframe:
            raise DataError(files[0], f"is a classic DICOM file (one frame), where echo_time {echo_time:g} selects "
                                      "frames", "enhanced multi-frame files; a classic series' echo is the list of "
                                                "its files")
        label = f"{label} (echo time {echo_time:g} ms)"
    try:
        if multiframe:  # checked frame by frame as it is read
            image = _read_multiframe_series(files, label, echo_time)
        else:
            _check_series_slices(files, label)  # before ITK stacks them: its own errors name no file
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
    except RuntimeError as error:
        raise DataError(label, f"cannot be read as a DICOM series ({error})", "readable DICOM images") from error
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        raise DataError(label, f"is a single 2D slice, size {image.GetSize()}", "a 3D DICOM series")
    volume = sitk_to_metatensor(image, source=label)
    return volume[0]  # check_volume sees the bare 3D array, like a NIfTI volume


def _check_series_slices(files: Sequence[str], label: str) -> None:
    """One patient in every slice, one stack (one orientation, pixel spacing and size, one slice per position) along
    its normal, and no slice missing, evenly spaced: GDCM leaves out a file it cannot parse (e.g. a truncated one)
    without a word, and ITK then stacks the remaining slices as if they were evenly spaced along the normal (a
    shifted or unevenly spaced stack came out several mm from where its files place it, with no error)."""
    origins, orientations, spacings, sizes, patients, descriptions = [], [], [], [], set(), set()
    for name in files:  # headers only
        header = sitk.ImageFileReader()
        header.SetFileName(str(name))
        header.ReadImageInformation()
        origins.append(header.GetOrigin())
        direction = np.asarray(header.GetDirection()).reshape(3, 3)
        orientations.append(np.concatenate([direction[:, 0], direction[:, 1]]))  # ImageOrientationPatient's order
        spacings.append(np.asarray(header.GetSpacing()[:2]))
        sizes.append(tuple(header.GetSize()[:2]))
        patients.add(header.GetMetaData("0010|0020").strip() if header.HasMetaDataKey("0010|0020") else "")
        descriptions.add(header.GetMetaData("0008|103e").strip() if header.HasMetaDataKey("0008|103e") else "")
    if len(patients) > 1:
        raise DataError(label, f"mixes slices of several patients (PatientID {', '.join(sorted(patients))})", "one series of one patient")
    _check_one_stack_geometry(orientations, spacings, sizes, label, "slices")
    if len(origins) < 3:
        return
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    along = np.asarray(origins) @ normal
    order = np.argsort(along, kind="stable")  # GDCM's order when it listed the files
    files, along, positions = [files[i] for i in order], along[order], np.asarray(origins)[order]
    names = [Path(name).name for name in files]
    _check_one_per_position(along, label, "slices", names)
    _check_stacked_along_normal(positions, along, normal, float(np.min(spacings[0])), label, "slices")
    gap = _widest_gap(along)
    if gap is not None:
        widest, width, typical = gap
        # the files on either side of the gap, in the series' order (GDCM's, by position), and the series'
        # description: a folder often holds several series, and the unreadable file is one GDCM left out
        series = f"its series '{descriptions.pop()}'" if len(descriptions) == 1 and "" not in descriptions else "it"
        raise DataError(
            label,
            f"has a gap of {width:.3g} mm between {names[widest]} and {names[widest + 1]}, two of the {len(origins)} "
            f"readable slices of {series}, where the others are {typical:.3g} mm apart (a slice between them is "
            f"missing or could not be read{_left_out(files)})",
            "a complete series",
        )
    _check_even_spacing(along, label, "slices", names)


def _left_out(files: Sequence[str]) -> str:
    """``; unread file(s) of this series in its folder: ...``: the files beside the series' own that GDCM left out
    although they hold its SeriesInstanceUID, or hold no readable DICOM header (one cut short is among them), or ""."""
    folders = {Path(name).parent for name in files}
    if len(folders) != 1:
        return ""
    uid = _series_uid(files[0])
    read = {Path(name).name for name in files}
    unread = [p.name for p in sorted(folders.pop().iterdir())
              if p.is_file() and p.name not in read and _series_uid(p) in (uid, None)]
    if not unread or uid is None:
        return ""
    shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
    return f"; unread file(s) of this series in its folder: {shown}"


def _series_uid(path: str | Path) -> str | None:
    """A DICOM file's SeriesInstanceUID ("" without one), None when it has no readable DICOM header."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:  # pydicom raises several types for files that are not (whole) DICOM
        return None
    return str(header.get("SeriesInstanceUID", ""))


def _check_stacked_along_normal(positions: np.ndarray, along: np.ndarray, normal: np.ndarray, pixel_spacing: float,
                                label: str, what: str) -> None:
    """Each slice (or frame) where the first's, moved along the normal, puts it: ITK (and a NIfTI affine without
    shear) can only place a stack that way; one shifted in plane (a gantry tilt) was placed millimetres off."""
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    if np.abs(offsets).max() > 0.01 * pixel_spacing:
        raise DataError(label, f"has {what} that are not stacked along their normal (shifted in plane by up to "
                               f"{np.abs(offsets).max():.3g} mm, e.g. a gantry tilt)",
                        "a stack of slices along the slice normal (resample a tilted series first)")


def _check_even_spacing(along: np.ndarray, label: str, what: str, names: Sequence[str]) -> None:
    """Slices (or frames) evenly spaced along the normal, within 2 % (at least 0.05 mm: positions are written rounded):
    ITK gives the volume one spacing, so an uneven stack's slices were placed up to a millimetre off."""
    if len(along) < 3:
        return
    gaps = np.diff(along)
    typical = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - typical)))
    if abs(gaps[worst] - typical) > max(0.02 * typical, 0.05):
        raise DataError(
            label, f"has unevenly spaced {what}: {gaps[worst]:.3g} mm between {names[worst]} and {names[worst + 1]}, "
                   f"{typical:.3g} mm between most others (spacings from {gaps.min():.3g} to {gaps.max():.3g} mm)",
            "evenly spaced slices (one spacing throughout; resample the series first)",
        )


def _check_one_stack_geometry(orientations: Sequence[np.ndarray], spacings: Sequence[np.ndarray],
                              sizes: Sequence[tuple[int, int]], label: str, what: str) -> None:
    """Every slice (or frame) in the orientation (row and column cosines), pixel spacing and size (columns, rows) of
    the first."""
    if len(set(sizes)) > 1:
        kinds = ", ".join(f"{columns} x {rows}" for columns, rows in sorted(set(sizes)))
        raise DataError(label, f"holds {what} of {len(set(sizes))} sizes ({kinds})", "one stack of slices of one size")
    if any(not np.allclose(o, orientations[0], atol=_ORTHONORMAL_TOLERANCE) for o in orientations):
        kinds = len({tuple(np.round(o, 3)) for o in orientations})
        raise DataError(label, f"holds {what} of {kinds} orientations (e.g. a localizer's three planes)",
                        "one stack of parallel slices")
    if any(not np.allclose(s, spacings[0], rtol=1e-4) for s in spacings):
        kinds = len({tuple(np.round(s, 4)) for s in spacings})
        raise DataError(label, f"holds {what} of {kinds} pixel spacings", "one stack of slices of one pixel spacing")


def _check_one_per_position(along_normal: np.ndarray, label: str, what: str, names: Sequence[str]) -> None:
    """One slice (or frame) at each position along the normal (sorted): several at one position are echoes, stacks or
    time points of one series, which ITK would interleave into one volume of half the spacing."""
    rounded = np.round(along_normal, 3)
    distinct = len(np.unique(rounded))
    if distinct < len(along_normal):
        first = int(np.flatnonzero(np.diff(rounded) == 0)[0])
        shared = [name for name, value in zip(names, rounded) if value == rounded[first]]
        raise DataError(label, f"holds {len(along_normal)} {what} at {distinct} slice positions (several echoes, "
                               f"stacks or time points in one series): e.g. {' and '.join(shared[:3])} at "
                               f"{along_normal[first]:.4g} mm along the normal",
                        "one per position: a single 3D stack of one echo and time point")


def _widest_gap(along_normal: np.ndarray) -> tuple[int, float, float] | None:
    """``(i, gap, typical)`` when the gap between sorted slice positions ``i`` and ``i + 1`` is over 1.5 times the
    typical (median) one: a slice is missing there. None for an evenly spaced stack."""
    if len(along_normal) < 3:
        return None
    gaps = np.abs(np.diff(along_normal))
    typical = float(np.median(gaps))
    widest = int(np.argmax(gaps))
    return (widest, float(gaps[widest]), typical) if typical > 0 and gaps[widest] > 1.5 * typical else None


def _is_multiframe(path: str) -> bool:
    """Whether the file holds several frames: an Enhanced (or Legacy Converted Enhanced) MR image of a whole stack,
    what current Siemens (XA), Philips and GE consoles export on request. (Enhanced MR files of one frame each, as
    GDCM writes them, are read slice by slice like classic ones.)"""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"], force=True)
    except Exception:  # pydicom raises several types for unreadable files; GDCM's reading then names the problem
        return False
    return int(header.get("NumberOfFrames") or 1) > 1


def frame_echo_times(header: pydicom.Dataset) -> list[float | None]:
    """The EffectiveEchoTime (ms) of each frame of an enhanced MR file, from its MREchoSequence (per frame, else
    shared); None for a frame without one."""
    shared = (header.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    echo_times = []
    for group in header.get("PerFrameFunctionalGroupsSequence") or []:
        items = group.get("MREchoSequence") or shared.get("MREchoSequence") or [pydicom.Dataset()]
        value = items[0].get("EffectiveEchoTime")
        echo_times.append(None if value is None or value == "" else float(value))
    return echo_times


def _read_multiframe_series(files: Sequence[str], label: str, echo_time: float | None = None) -> sitk.Image:
    """The frames of multi-frame DICOM files as one volume, placed by their own functional groups.

    Why not GDCM's reading alone: ``ImageSeriesReader`` makes a 4D image of one such file (the series then failed
    with "axes don't match array"), and ``ReadImage`` stacks the frames in the order they are stored, so a file whose
    frames are stored in acquisition order (interleaved) came back shuffled on a 1 mm grid, and it applies the first
    frame's rescale to every frame, where Philips files scale each frame differently. GDCM still decodes the pixels
    (every transfer syntax); the frames are then sorted along the slice normal, rescaled frame by frame, and checked:
    one orientation, spacing and size, one frame per position (not several echoes or time points), frames stacked
    along their normal, no missing frame. With ``echo_time``, only the frames of that EffectiveEchoTime are read (one
    echo of files holding several); without it, frames of several echo times are refused, naming them.
    """
    frames = []  # (position, orientation, pixel spacing, frame values, file, frame number)
    patients = set()
    for name in files:
        try:
            header = pydicom.dcmread(name, stop_before_pixels=True, force=True)
        except Exception as error:  # pydicom raises several types for unreadable files
            raise DataError(name, f"cannot be read as DICOM ({type(error).__name__}: {error})", "a readable DICOM "
                            "file") from error
        patients.add(str(header.get("PatientID", "")).strip())
        count = int(header.get("NumberOfFrames") or 1)
        per_frame = list(header.get("PerFrameFunctionalGroupsSequence") or [])
        shared = (header.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
        if len(per_frame) != count:
            raise DataError(name, f"has {count} frames and {len(per_frame)} per-frame functional groups",
                            "one group per frame, giving its position (an enhanced MR image)")
        echo_times = frame_echo_times(header)
        echoes = sorted({value for value in echo_times if value is not None})
        listed = f"{', '.join(f'{value:g}' for value in echoes)} ms" if echoes else "none"
        if echo_time is None and len(echoes) > 1:
            raise DataError(name, f"holds frames of {len(echoes)} echoes (EffectiveEchoTime {listed})",
                            'one echo: {"files": [...], "echo_time": <ms>} selects its frames (discovery lists '
                            "each echo as a series)")
        if echo_time is not None and echo_time not in echoes:
            raise DataError(name, f"has no frame of echo time {echo_time:g} ms (its frames' EffectiveEchoTime: "
                                  f"{listed})", "the echo_time of one of its echoes, in ms")
        # GDCM returns the stored frames in their order, all scaled by the first frame's rescale: undone below
        decoded = sitk.GetArrayFromImage(sitk.ReadImage(name, sitk.sitkFloat64)).reshape(count, header.Rows, header.Columns)
        first_slope, first_intercept = _rescale(per_frame[0], shared, header)
        for number, group in enumerate(per_frame, start=1):
            if echo_time is not None and echo_times[number - 1] != echo_time:
                continue  # another echo's frame
            where = f"{name}, frame {number}"
            slope, intercept = _rescale(group, shared, header)
            stored = (decoded[number - 1] - first_intercept) / first_slope
            frames.append((
                np.asarray(_functional(group, shared, "PlanePositionSequence", "ImagePositionPatient", where), float),
                np.asarray(_functional(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient", where), float),
                np.asarray(_functional(group, shared, "PixelMeasuresSequence", "PixelSpacing", where), float),
                stored * slope + intercept, name, number,
            ))
    if len(patients) > 1:
        raise DataError(label, f"mixes frames of several patients (PatientID {', '.join(sorted(patients))})",
                        "one series of one patient")
    _check_one_stack_geometry([f[1] for f in frames], [f[2] for f in frames], [f[3].shape[::-1] for f in frames],
                              label, "frames")
    orientation, spacing = frames[0][1], frames[0][2]
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    frames.sort(key=lambda f: float(f[0] @ normal))
    positions = np.asarray([f[0] for f in frames])
    along = positions @ normal
    frame_names = [f"{Path(f[4]).name}, frame {f[5]}" for f in frames]
    _check_one_per_position(along, label, "frames", frame_names)
    _check_stacked_along_normal(positions, along, normal, float(spacing.min()), label, "frames")
    gap = _widest_gap(along)
    if gap is not None:
        widest, width, typical = gap
        (_, _, _, _, name, number), (_, _, _, _, next_name, next_number) = frames[widest], frames[widest + 1]
        between = (f"frames {min(number, next_number)} and {max(number, next_number)}" if name == next_name else
                   f"{name}, frame {number} and {next_name}, frame {next_number}")
        raise DataError(label, f"has a gap of {width:.3g} mm between {between}, two of its {len(frames)} frames, where "
                               f"the others are {typical:.3g} mm apart (a frame between them is missing)",
                        "a complete series")
    _check_even_spacing(along, label, "frames", frame_names)
    image = sitk.GetImageFromArray(np.stack([f[3] for f in frames]).astype(np.float32))
    # PixelSpacing is (between rows, between columns): x, along a row, is the second
    image.SetSpacing((float(spacing[1]), float(spacing[0]), float(np.median(np.diff(along))) if len(frames) > 1 else
                      1.0))
    image.SetOrigin(positions[0].tolist())
    image.SetDirection(np.column_stack([row, column, normal]).flatten().tolist())
    return image


def _functional(group: pydicom.Dataset, shared: pydicom.Dataset, sequence: str, keyword: str, where: str) -> object:
    """``keyword`` of a frame's functional group ``sequence``: its own, else the one all frames share."""
    for source in (group, shared):
        items = source.get(sequence)
        if items and keyword in items[0]:
            return items[0][keyword].value
    raise DataError(where, f"has no {keyword} (in {sequence}, per frame or shared)",
                    "the position, orientation and pixel spacing of every frame")


def _rescale(group: pydicom.Dataset, shared: pydicom.Dataset, header: pydicom.Dataset) -> tuple[float, float]:
    """(slope, intercept) of a frame: its PixelValueTransformationSequence, the shared one, the file's, or 1, 0."""
    for source in (group, shared):
        items = source.get("PixelValueTransformationSequence")
        if items:
            return float(items[0].get("RescaleSlope", 1.0)), float(items[0].get("RescaleIntercept", 0.0))
    return float(header.get("RescaleSlope", 1.0)), float(header.get("RescaleIntercept", 0.0))


def sitk_to_metatensor(image: sitk.Image, source: str = "") -> MetaTensor:
    """A channel-first ``MetaTensor`` (1, X, Y, Z) with a RAS affine from a 3D SimpleITK image.

    MONAI's ``itk_torch_bridge`` covers ITK, not SimpleITK, hence this small conversion.
    """
    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)  # SimpleITK arrays are (z, y, x)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_FROM_LPS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _RAS_FROM_LPS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    meta = {
        "affine": torch.as_tensor(affine),
        "original_affine": torch.as_tensor(affine),
        "spatial_shape": np.asarray(array.shape),
        "filename_or_obj": source,
        "original_channel_dim": "no_channel",
        "space": "RAS",
    }
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], meta=meta)


def metatensor_to_sitk(volume: torch.Tensor, affine: torch.Tensor | np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image from a (1, X, Y, Z) or (X, Y, Z) volume with a RAS affine (taken from the
    ``MetaTensor`` when ``affine`` is None).

    Raises:
        DataError: the affine has shear or zero spacing, which an ITK image cannot represent.
    """
    if affine is None:
        affine = volume.affine if isinstance(volume, MetaTensor) else np.eye(4)
    affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu())
    array = torch.as_tensor(volume).detach().cpu().numpy()
    if array.ndim == 4:
        array = array[0]
    linear = affine[:3, :3]
    spacing = affine_to_spacing(affine, suppress_zeros=False)  # (a zero spacing is refused below)
    source = volume.meta.get("filename_or_obj", "<volume>") if isinstance(volume, MetaTensor) else "<volume>"
    if np.any(spacing <= 0):
        raise DataError(source, f"has zero voxel spacing {spacing.tolist()}", "a valid affine")
    direction = _RAS_FROM_LPS @ linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
        raise DataError(source, "has a sheared affine", "orthogonal voxel axes")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin((_RAS_FROM_LPS @ affine[:3, 3]).tolist())
    return image
