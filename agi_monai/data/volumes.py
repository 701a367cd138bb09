"""Reading one MR volume (NIfTI file or DICOM series) into a checked MONAI ``MetaTensor``, and the
conversions between ``MetaTensor`` (RAS affine, MONAI) and ``SimpleITK.Image`` (LPS, registration, DICOM).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor, NibabelReader
from monai.transforms import EnsureChannelFirst, LoadImage

from agi_monai.data.errors import DataError, MissingFileError

__all__ = [
    "VolumeSource", "load_volume", "check_volume", "missing_file_error", "sitk_to_metatensor", "metatensor_to_sitk"
]

VolumeSource = str | Path | Sequence[str]
"""A NIfTI file, a folder holding one DICOM series, or the files of one DICOM series."""

# NIfTI/MONAI affines map voxels to RAS+ world coordinates, ITK/DICOM to LPS: flip x and y.
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])
_NIFTI_LOADER = LoadImage(reader=NibabelReader, image_only=True, dtype=np.float32)
_ORTHONORMAL_TOLERANCE = 1e-4


def load_volume(source: VolumeSource) -> MetaTensor:
    """Read and check one 3D volume; returns a channel-first float32 ``MetaTensor`` of shape (1, X, Y, Z).

    NIfTI files go through MONAI's ``LoadImage`` (nibabel), so the metadata is what every MONAI transform
    and writer expects. DICOM series go through SimpleITK (GDCM), which groups and sorts slices by
    geometry, handles oblique series, and gives the same RAS affine.

    Args:
        source: a ``.nii``/``.nii.gz`` file, a folder holding exactly one DICOM series, or a list of the
            files of one DICOM series.

    Raises:
        DataError: naming the file, when it is missing (a :class:`MissingFileError`, see
            :func:`missing_file_error`), unreadable, truncated, not NIfTI despite its name, not 3D, contains NaN/Inf,
            or is constant (see :func:`check_volume`).
    """
    if isinstance(source, (str, Path)) and not Path(source).is_dir():
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
    return volume


def _load_dicom_series(source: str | Path | Sequence[str]) -> MetaTensor:
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
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise DataError(label, f"cannot be read as a DICOM series ({error})", "readable DICOM images") from error
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        raise DataError(label, f"is a single 2D slice, size {image.GetSize()}", "a 3D DICOM series")
    _check_series_slices(files, image, label)
    volume = sitk_to_metatensor(image, source=label)
    return volume[0]  # check_volume sees the bare 3D array, like a NIfTI volume


def _check_series_slices(files: Sequence[str], image: sitk.Image, label: str) -> None:
    """One patient in every slice, and no slice missing: GDCM leaves out a file it cannot parse (e.g. a truncated
    one) without a word, and ITK then stacks the remaining slices as if they were evenly spaced."""
    origins, patients, descriptions = [], set(), set()
    for name in files:  # headers only; SimpleITK reads classic and enhanced (per-frame) MR positions alike
        header = sitk.ImageFileReader()
        header.SetFileName(str(name))
        header.ReadImageInformation()
        origins.append(header.GetOrigin())
        patients.add(header.GetMetaData("0010|0020").strip() if header.HasMetaDataKey("0010|0020") else "")
        descriptions.add(header.GetMetaData("0008|103e").strip() if header.HasMetaDataKey("0008|103e") else "")
    if len(patients) > 1:
        raise DataError(label, f"mixes slices of several patients (PatientID {', '.join(sorted(patients))})", "one series of one patient")
    if len(origins) < 3:
        return
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    gaps = np.abs(np.diff(np.asarray(origins) @ normal))
    typical = float(np.median(gaps))
    widest = int(np.argmax(gaps))
    if typical > 0 and gaps[widest] > 1.5 * typical:
        # the files on either side of the gap, in the series' order (GDCM's, by position), and the series'
        # description: a folder often holds several series, and the unreadable file is one GDCM left out
        series = f"its series '{descriptions.pop()}'" if len(descriptions) == 1 and "" not in descriptions else "it"
        raise DataError(
            label,
            f"has a gap of {gaps[widest]:.3g} mm between {Path(files[widest]).name} and {Path(files[widest + 1]).name}, "
            f"two of the {len(origins)} readable slices of {series}, where the others are {typical:.3g} mm apart (a "
            "slice between them is missing or could not be read)",
            "a complete series",
        )


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
    spacing = np.linalg.norm(linear, axis=0)
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
