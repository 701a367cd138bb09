"""Geometry with unequal row and column spacing, which no shipped volume has (every one is square in plane).

The native TCGA T2 (oblique, 224 columns × 256 rows × 26 slices) is given in-plane spacing 0.9 mm along x (between
columns) and 1.3 mm along y (between rows), 5.5 mm slices, its oblique direction and origin kept. Its conversions
to and from MONAI's MetaTensor are checked against nibabel's and SimpleITK's own readings of NIfTI files, and the
derived DICOM series written from it against GDCM's reading and pydicom's PixelSpacing, which DICOM orders
[between rows, between columns] = [y spacing, x spacing] (PS3.3 C.7.6.2.1.1).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from agi_monai.data import write_dicom_series
from agi_monai.data.dicom import write_derived_series
from agi_monai.data.volumes import load_volume, metatensor_to_sitk, sitk_to_metatensor
from helpers import DATA

NATIVE_T2 = DATA / "tcga-lgg" / "TCGA-FG-6692-native" / "t2.nii.gz"
SPACING = (0.9, 1.3, 5.5)  # x (between columns), y (between rows), z
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def image() -> sitk.Image:
    image = sitk.ReadImage(str(NATIVE_T2))
    image.SetSpacing(SPACING)  # the same voxels on an anisotropic grid; origin and oblique direction kept
    # The NIfTI grid is left-handed; a DICOM series stacks its slices along row × column, so GDCM reads a series of it
    # with the slice axis reversed. Flipped here in place (same voxels at the same points) so that both agree.
    image = sitk.Flip(image, (False, False, True))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    assert image.GetSize() == (224, 256, 26) and np.linalg.det(direction) > 0
    assert np.abs(direction - np.eye(3)).max() > 0.2  # oblique (about 17° about x)
    return image


def _ras_affine(image: sitk.Image) -> np.ndarray:
    """The RAS voxel-to-world affine of an ITK image, written out: LPS→RAS · direction · diag(spacing), origin."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin())
    return affine


def _assert_same_grid(actual: sitk.Image, expected: sitk.Image, atol: float = 1e-4) -> None:
    assert actual.GetSize() == expected.GetSize()
    np.testing.assert_allclose(actual.GetSpacing(), expected.GetSpacing(), atol=atol)
    np.testing.assert_allclose(actual.GetOrigin(), expected.GetOrigin(), atol=atol)
    np.testing.assert_allclose(actual.GetDirection(), expected.GetDirection(), atol=atol)


def test_metatensor_conversions_keep_x_and_y_spacing_apart(image, tmp_path):
    volume = sitk_to_metatensor(image)
    assert tuple(volume.shape) == (1, 224, 256, 26)
    np.testing.assert_allclose(np.asarray(volume.affine), _ras_affine(image), atol=1e-9)

    # against nibabel's reading of the NIfTI file SimpleITK writes from the image
    path = tmp_path / "anisotropic.nii.gz"
    sitk.WriteImage(image, str(path))
    written = nib.load(path)
    np.testing.assert_allclose(written.header.get_zooms(), SPACING, atol=1e-5)
    np.testing.assert_allclose(np.asarray(volume.affine), written.affine, atol=1e-4)
    np.testing.assert_array_equal(volume[0].numpy(), np.asarray(written.dataobj, dtype=np.float32))
    # the project's NIfTI reader (MONAI, nibabel) agrees
    loaded = load_volume(path)
    np.testing.assert_allclose(np.asarray(loaded.affine), written.affine, atol=1e-4)

    # back to SimpleITK: the image's own grid and voxels
    back = metatensor_to_sitk(volume)
    _assert_same_grid(back, image, atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), SPACING, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image).astype(np.float32))

    # ... and SimpleITK's reading of a NIfTI file nibabel writes with the MetaTensor's affine gives that grid too
    nib_path = tmp_path / "from_nibabel.nii.gz"
    nib.save(nib.Nifti1Image(volume[0].numpy(), np.asarray(volume.affine)), nib_path)
    _assert_same_grid(metatensor_to_sitk(volume), sitk.ReadImage(str(nib_path)))
    _assert_same_grid(metatensor_to_sitk(loaded), sitk.ReadImage(str(nib_path)))


def test_derived_dicom_series_keeps_row_and_column_spacing(image, tmp_path):
    reference_files = write_dicom_series(image, tmp_path / "reference", "AX T2 FSE", "TCGA-FG-6692", 4)
    synthetic = sitk.Cast(image, sitk.sitkFloat32) / 1000.0
    written = write_derived_series(synthetic, tmp_path / "synthetic", "SYNTHETIC T2 test", "made by a test",
                                   reference=[str(f) for f in reference_files])
    assert len(written) == 26

    # GDCM (SimpleITK's series reader): the image's grid
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "synthetic")))
    read_back = reader.Execute()
    _assert_same_grid(read_back, image)
    np.testing.assert_allclose(read_back.GetSpacing(), SPACING, atol=1e-4)
    step = float(sitk.GetArrayViewFromImage(synthetic).max() - sitk.GetArrayViewFromImage(synthetic).min()) / 65535
    np.testing.assert_allclose(sitk.GetArrayFromImage(read_back), sitk.GetArrayFromImage(synthetic), atol=step)

    # pydicom: PixelSpacing is [between rows, between columns]; Rows is the y size, Columns the x size
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    for path in written:
        dataset = pydicom.dcmread(path)
        assert [float(v) for v in dataset.PixelSpacing] == pytest.approx([1.3, 0.9], abs=1e-6)
        assert (dataset.Rows, dataset.Columns) == (256, 224) and dataset.pixel_array.shape == (256, 224)
        assert float(dataset.SliceThickness) == pytest.approx(5.5, abs=1e-6)
        np.testing.assert_allclose(np.asarray(dataset.ImageOrientationPatient, float),
                                   np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-6)
    # the reference series written by GDCM says the same
    assert [float(v) for v in pydicom.dcmread(reference_files[0]).PixelSpacing] == pytest.approx([1.3, 0.9], abs=1e-6)

    # the project's DICOM reader places the derived series where the image is
    loaded = load_volume(tmp_path / "synthetic")
    np.testing.assert_allclose(np.asarray(loaded.affine), _ras_affine(image), atol=1e-4)
