"""DICOM out (issue #7): a synthesized volume written as a new MR series derived from the reference input
series — read back by SimpleITK and pydicom with the reference's geometry, its voxels within the 16-bit
quantisation, patient/study/frame-of-reference tags carried over, new UIDs — written atomically; and
``agi-monai synthesize --dicom`` on a DICOM study made from a shipped BraTS case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import MRImageStorage

import agi_monai.data.dicom as dicom_module
from agi_monai.data import DataError, write_dicom_series
from agi_monai.data.dicom import DERIVED_SERIES_NUMBER_OFFSET, write_derived_series
from test_cli import FAST, GLI, SLICES, digest, run_cli
from helpers import DATA

NATIVE_T2 = DATA / "tcga-lgg" / "TCGA-FG-6692-native" / "t2.nii.gz"
PATIENT_TAGS = {  # set on the reference series, so that carrying them over is visible
    "PatientName": "DOE^JANE",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "StudyDate": "20200102",
    "StudyID": "42",
    "AccessionNumber": "ACC-0001",
    "ReferringPhysicianName": "WHO^DR",
}
CARRIED = ["PatientID", "StudyInstanceUID", "FrameOfReferenceUID", *PATIENT_TAGS]


def write_reference_study(images: dict[str, sitk.Image], folder: Path, patient: str) -> dict[str, list[Path]]:
    """One DICOM study, a series per contrast (SeriesDescription as a scanner names it), with patient tags."""
    series = {}
    for number, (description, image) in enumerate(images.items(), 2):
        files = write_dicom_series(image, folder, description, patient, number, study_uid="1.2.826.0.1.3680043.8.498.7")
        for path in files:
            dataset = pydicom.dcmread(path)
            for keyword, value in PATIENT_TAGS.items():
                setattr(dataset, keyword, value)
            dataset.save_as(path)
        series[description] = files
    return series


def read_series(files_or_folder) -> sitk.Image:
    """A series as SimpleITK reads it, its files sorted by GDCM along the slice normal (a reader given the files
    in another order would put the origin at the wrong end)."""
    if isinstance(files_or_folder, Path) and files_or_folder.is_dir():
        folder, uid = files_or_folder, ""
    else:
        folder, uid = Path(files_or_folder[0]).parent, pydicom.dcmread(files_or_folder[0]).SeriesInstanceUID
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    return reader.Execute()


def assert_same_grid(image: sitk.Image, reference: sitk.Image, canonical: bool = False) -> None:
    if canonical:  # a left-handed NIfTI grid comes back from DICOM with its slice axis reversed
        image, reference = sitk.DICOMOrient(image, "LPS"), sitk.DICOMOrient(reference, "LPS")
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-4)


def headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


@pytest.fixture(scope="module")
def native_reference(tmp_path_factory):
    """The native TCGA T2 (oblique, 26 slices) as a DICOM series with patient tags, and its image."""
    folder = tmp_path_factory.mktemp("reference")
    files = write_reference_study({"AX T2 FSE": sitk.ReadImage(str(NATIVE_T2))}, folder, "TCGA-FG-6692")["AX T2 FSE"]
    return files, read_series(files)


def synthetic_on(reference: sitk.Image) -> sitk.Image:
    """A float image on the reference grid standing in for a synthesized one: the reference scaled into [0, 1.7]."""
    return sitk.Cast(reference, sitk.sitkFloat32) / 1234.5


def test_derived_series_has_the_reference_geometry_and_values(native_reference, tmp_path):
    reference_files, reference = native_reference
    image = synthetic_on(reference)
    written = write_derived_series(image, tmp_path / "synthetic", "SYNTHETIC FLAIR test", "made by a test",
                                   reference=[str(f) for f in reference_files])
    assert len(written) == 26 and all(p.parent == tmp_path / "synthetic" for p in written)

    read_back = read_series(tmp_path / "synthetic")  # SimpleITK/GDCM applies the rescale
    assert_same_grid(read_back, reference)
    values = sitk.GetArrayFromImage(image)
    low, high = float(values.min()), float(values.max())
    step = (high - low) / 65535
    error = np.abs(sitk.GetArrayFromImage(read_back) - values)
    assert error.max() <= step / 2 * 1.001 and error.max() > 0  # quantised, within half a 16-bit step

    # pydicom, independently: stored * slope + intercept per slice, matched to the image's slice by position;
    # the slice positions are the reference series' own
    image_positions = [np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) for k in range(image.GetDepth())]
    reference_positions = [np.array(pydicom.dcmread(f).ImagePositionPatient, float) for f in reference_files]
    for dataset in headers(tmp_path / "synthetic"):
        position = np.array(dataset.ImagePositionPatient, float)
        index = int(np.argmin([np.abs(p - position).max() for p in image_positions]))
        assert np.abs(image_positions[index] - position).max() < 1e-3
        assert min(np.abs(p - position).max() for p in reference_positions) < 1e-3
        pixels = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        np.testing.assert_allclose(pixels, values[index], atol=step / 2 * 1.001)
        assert dataset.pixel_array.dtype == np.uint16 and dataset.PixelRepresentation == 0 and dataset.BitsStored == 16
        # the display window, as a viewer applies it (before: a width below 1 with the default LINEAR function,
        # which PS3.3 forbids and pydicom refuses): the image's range onto the display's
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        displayed = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset)
        if np.ptp(pixels) > 0:  # a linear, increasing map of the values, not a threshold
            assert len(np.unique(displayed)) == len(np.unique(pixels)) and np.corrcoef(displayed.ravel(), pixels.ravel())[0, 1] > 0.9999


def test_derived_series_tags(native_reference, tmp_path):
    reference_files, reference = native_reference
    write_derived_series(synthetic_on(reference), tmp_path / "s", "SYNTHETIC FLAIR brats_t1_t2_to_flair",
                         "Synthetic FLAIR made by AGI-Net bundle brats_t1_t2_to_flair", reference=str(reference_files[0]))
    original = pydicom.dcmread(reference_files[0])
    derived = headers(tmp_path / "s")
    first = derived[0]
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert first.SeriesDescription == "SYNTHETIC FLAIR brats_t1_t2_to_flair"
    assert "brats_t1_t2_to_flair" in first.DerivationDescription
    assert first.Modality == "MR" and first.SOPClassUID == MRImageStorage and first.file_meta.MediaStorageSOPClassUID == MRImageStorage
    assert int(first.SeriesNumber) == DERIVED_SERIES_NUMBER_OFFSET + int(original.SeriesNumber)
    for keyword in CARRIED:
        assert str(first[keyword].value) == str(original[keyword].value), keyword
    assert first.PatientName == "DOE^JANE" and first.FrameOfReferenceUID == original.FrameOfReferenceUID
    # new series: one new SeriesInstanceUID shared by the slices, a new SOPInstanceUID per slice
    assert {d.SeriesInstanceUID for d in derived} == {first.SeriesInstanceUID} != {original.SeriesInstanceUID}
    sops = {d.SOPInstanceUID for d in derived}
    assert len(sops) == len(derived) and not sops & {pydicom.dcmread(f).SOPInstanceUID for f in reference_files}
    assert all(d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID for d in derived)
    np.testing.assert_allclose(np.array(first.ImageOrientationPatient, float), np.array(original.ImageOrientationPatient, float), atol=1e-6)
    np.testing.assert_allclose(np.array(first.PixelSpacing, float), np.array(original.PixelSpacing, float), atol=1e-6)
    assert float(first.SliceThickness) == pytest.approx(reference.GetSpacing()[2], abs=1e-4)
    assert sorted(int(d.InstanceNumber) for d in derived) == list(range(1, len(derived) + 1))


def test_without_a_reference_a_new_study_with_synthetic_patient_tags(tmp_path):
    nifti = sitk.ReadImage(str(GLI / "BraTS-GLI-00001-000-t2w.nii.gz"))[:, :, SLICES]  # LPS, left-handed grid
    image = sitk.Cast(nifti, sitk.sitkFloat32) / 1000.0
    write_derived_series(image, tmp_path / "s", "SYNTHETIC FLAIR x", "test", reference=None, case_id="BraTS-GLI-00001-000")
    derived = headers(tmp_path / "s")
    first = derived[0]
    assert first.PatientName == "SYNTHETIC^BraTS-GLI-00001-000" and first.PatientID == "BraTS-GLI-00001-000"
    assert "no DICOM reference" in first.StudyDescription
    assert len({d.StudyInstanceUID for d in derived}) == 1 and len({d.FrameOfReferenceUID for d in derived}) == 1
    assert_same_grid(read_series(tmp_path / "s"), image, canonical=True)


def test_written_atomically_and_never_over_an_existing_series_without_overwrite(native_reference, tmp_path, monkeypatch):
    reference_files, reference = native_reference
    image = synthetic_on(reference)
    folder = tmp_path / "s"
    write_derived_series(image, folder, "first", "test", reference=[str(f) for f in reference_files])
    first = digest(folder)
    with pytest.raises(DataError, match=rf"{folder}: already exists \(expected a new output folder, or overwrite=True"):
        write_derived_series(image, folder, "second", "test")
    assert digest(folder) == first

    real_slice = dicom_module._slice_dataset

    def failing_slice(header, image, index, pixels):  # the disk fills up at the 6th slice
        if index == 5:
            raise OSError("No space left on device")
        return real_slice(header, image, index, pixels)

    monkeypatch.setattr(dicom_module, "_slice_dataset", failing_slice)
    with pytest.raises(OSError, match="No space left"):
        write_derived_series(image, folder, "third", "test", overwrite=True)
    assert digest(folder) == first  # the old series is intact
    with pytest.raises(OSError):
        write_derived_series(image, tmp_path / "new", "third", "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no partial folder, no temporary folder
    monkeypatch.undo()

    write_derived_series(image, folder, "fourth", "test", overwrite=True)
    assert {d.SeriesDescription for d in headers(folder)} == {"fourth"} and len(list(folder.iterdir())) == 26
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_long_series_description_is_refused(native_reference, tmp_path):
    with pytest.raises(DataError, match="is 65 characters long"):
        write_derived_series(synthetic_on(native_reference[1]), tmp_path / "s", "x" * 65, "test")
    assert not (tmp_path / "s").exists()


def test_synthesize_dicom_study_to_nifti_and_a_derived_series(tmp_path):
    from test_cli import make_bundle

    bundle = make_bundle(tmp_path / "bundles", "brats_t1_t2_to_flair", 2)
    study = tmp_path / "dicom" / "study"
    images = {
        description: sitk.ReadImage(str(GLI / f"BraTS-GLI-00001-000-{name}.nii.gz"))[:, :, SLICES]
        for description, name in (("AX T2 FSE", "t2w"), ("AX T1 SE", "t1n"))
    }
    series = write_reference_study(images, study, "PATIENT-7")
    before = digest(tmp_path / "dicom")
    result = run_cli("synthesize", tmp_path / "dicom", "--bundle", bundle, "--output_dir", tmp_path / "out", "--dicom", *FAST)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(
        f"agi-monai synthesize: 1 of 1 cases written (FLAIR, NIfTI + DICOM) to {tmp_path / 'out'} by brats_t1_t2_to_flair"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["PATIENT-7_FLAIR.nii.gz", "PATIENT-7_FLAIR_dicom"]
    reference = read_series(series["AX T2 FSE"])  # T2: the reference input of (T1, T2) -> FLAIR
    nifti = sitk.ReadImage(str(tmp_path / "out" / "PATIENT-7_FLAIR.nii.gz"))
    assert_same_grid(nifti, reference, canonical=True)
    derived = read_series(tmp_path / "out" / "PATIENT-7_FLAIR_dicom")
    assert_same_grid(derived, reference)
    values = sitk.GetArrayFromImage(sitk.DICOMOrient(nifti, "LPS"))
    assert values.max() > 0
    error = np.abs(sitk.GetArrayFromImage(sitk.DICOMOrient(derived, "LPS")) - values)
    assert error.max() <= (values.max() - values.min()) / 65535 / 2 * 1.001

    original = pydicom.dcmread(series["AX T2 FSE"][0])
    first = headers(tmp_path / "out" / "PATIENT-7_FLAIR_dicom")[0]
    for keyword in CARRIED:
        assert str(first[keyword].value) == str(original[keyword].value), keyword
    assert first.SeriesDescription == "SYNTHETIC FLAIR brats_t1_t2_to_flair"
    assert "from T1, T2 on the T2 grid" in first.DerivationDescription and first.SeriesInstanceUID != original.SeriesInstanceUID
    assert digest(tmp_path / "dicom") == before


# The MR Image IOD (PS3.3 A.4) as PACS check it: Type 1 attributes present and not empty, Type 2 present (maybe
# empty), for the modules a derived MR slice carries (Patient, General Study, General Series, Frame of Reference,
# General Equipment, General Image, Image Plane, Image Pixel, MR Image, SOP Common). Typed out from the standard,
# independently of the writer's own lists.
TYPE_1 = ["StudyInstanceUID", "Modality", "SeriesInstanceUID", "FrameOfReferenceUID", "PixelSpacing",
          "ImageOrientationPatient", "ImagePositionPatient", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
          "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData", "ImageType",
          "ScanningSequence", "SequenceVariant", "SOPClassUID", "SOPInstanceUID"]
TYPE_2 = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "PatientPosition",
          "PositionReferenceIndicator", "Manufacturer", "InstanceNumber", "SliceThickness", "ScanOptions",
          "MRAcquisitionType", "EchoTime", "EchoTrainLength"]


@pytest.mark.parametrize("source", ["NIfTI input", "DICOM input", "DICOM input without patient tags"])
def test_every_derived_slice_has_the_mr_image_iods_required_attributes(native_reference, tmp_path, source):
    # before: the series made from a NIfTI input lacked PatientBirthDate, PatientSex, ReferringPhysicianName, StudyID,
    # AccessionNumber and PatientPosition (pydicom's DICOMDIR writer refused it: "'Study ID' element is missing")
    from pydicom.fileset import FileSet

    reference_files, reference_image = native_reference
    image = synthetic_on(reference_image)
    reference = None if source == "NIfTI input" else reference_files
    if source == "DICOM input without patient tags":
        bare = tmp_path / "bare"
        bare.mkdir()
        for path in reference:
            dataset = pydicom.dcmread(path)
            for keyword in [*PATIENT_TAGS, "PatientPosition"]:
                if keyword in dataset and keyword != "PatientName":
                    delattr(dataset, keyword)
            dataset.save_as(bare / Path(path).name)
        reference = sorted(bare.iterdir())
    files = write_derived_series(image, tmp_path / "s", "SYNTHETIC T2 x", "test", reference=reference, case_id="P1")
    for path in files:
        dataset = pydicom.dcmread(path)
        assert [k for k in TYPE_1 if k not in dataset or dataset[k].value in (None, "", b"")] == [], path
        assert [k for k in TYPE_2 if k not in dataset] == [], path
    if source != "DICOM input without patient tags":  # (a DICOMDIR needs a study date and ID: none to carry over)
        files_set = FileSet()  # what a CD/USB export writes: refuses instances missing these
        for path in files:
            files_set.add(path)
        files_set.write(tmp_path / "export")
        assert (tmp_path / "export" / "DICOMDIR").is_file()


def test_a_reference_without_a_frame_of_reference_gets_a_new_one(native_reference, tmp_path):
    # FrameOfReferenceUID and StudyInstanceUID are Type 1: a reference lacking them gave a series without them
    reference_files, reference = native_reference
    stripped = tmp_path / "reference.dcm"
    dataset = pydicom.dcmread(reference_files[0])
    del dataset.FrameOfReferenceUID
    dataset.save_as(stripped)
    write_derived_series(synthetic_on(reference), tmp_path / "s", "SYNTHETIC FLAIR test", "made by a test",
                         reference=str(stripped))
    uids = {(d.FrameOfReferenceUID, d.StudyInstanceUID) for d in headers(tmp_path / "s")}
    assert len(uids) == 1  # one new frame of reference for the whole series; the reference's study kept
    ((frame, study),) = uids
    assert frame and frame != pydicom.dcmread(reference_files[0]).FrameOfReferenceUID and study == dataset.StudyInstanceUID
