"""How uneven a classic DICOM series' slice positions may be: within 2 % of the typical spacing (at least 0.05 mm, the
rounding of written positions) it is read, beyond it refused. ITK gives the volume one spacing, so a series whose one
slice sits 0.3 mm off its place (5 % of the TCGA T2's 5.5 mm) would be read with that slice 0.3 mm from where its
file puts it. The only uneven series tested was 2 mm off, which a tolerance ten times the stated one refuses too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from agi_monai.data import DataError, load_volume, write_dicom_series
from helpers import DATA

NATIVE_T2 = DATA / "tcga-lgg" / "TCGA-FG-6692-native" / "t2.nii.gz"  # 5.5 mm axial slices


def _series_with_one_slice_moved(folder: Path, offset_mm: float) -> None:
    """The shipped T2 as a DICOM series whose seventh slice (001_0007.dcm) is moved ``offset_mm`` along the normal
    (the slices run against it: 0.3 mm leaves 5.2 mm to the slice before in the series' order)."""
    files = write_dicom_series(sitk.ReadImage(str(NATIVE_T2)), folder, "AX T2")
    dataset = pydicom.dcmread(files[6])
    orientation = np.asarray(dataset.ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    position = np.asarray(dataset.ImagePositionPatient, float) + offset_mm * normal
    dataset.ImagePositionPatient = [f"{v:.6f}" for v in position]
    dataset.save_as(files[6])


def test_a_slice_5_percent_off_its_place_is_refused(tmp_path):
    _series_with_one_slice_moved(tmp_path / "series", 0.3)
    expected = "has unevenly spaced slices: 5.2 mm between 001_0007.dcm and 001_0006.dcm, 5.5 mm between most others"
    with pytest.raises(DataError, match=expected):
        load_volume(tmp_path / "series")


def test_positions_within_the_rounding_of_written_positions_are_read(tmp_path):
    _series_with_one_slice_moved(tmp_path / "series", 0.04)
    volume = load_volume(tmp_path / "series")
    assert tuple(volume.shape[-3:]) == sitk.ReadImage(str(NATIVE_T2)).GetSize()
