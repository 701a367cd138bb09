"""Every patient, study and frame-of-reference tag of the reference series reaches the derived series.

A derived (synthesized) series joins its reference's patient, study and frame of reference, so that a PACS files it
with the inputs and a viewer overlays it on them. The reference series is written with the project's writer from
the real native TCGA T2 and then given a value for each such tag (values no writer would make up); every slice of
the derived series must carry each of them unchanged. The tag list here is written out, not taken from the module,
so a tag dropped from the module's list fails.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk

from agi_monai.data import write_dicom_series
from agi_monai.data.dicom import write_derived_series
from helpers import DATA

NATIVE_T2 = DATA / "tcga-lgg" / "TCGA-FG-6692-native" / "t2.nii.gz"

# keyword -> the value set on the reference series (as pydicom writes it back as text)
REFERENCE_TAGS = {
    "SpecificCharacterSet": "ISO_IR 100",  # Latin-1, not the writer's own UTF-8 (ISO_IR 192)
    "PatientName": "MÜLLER^JÖRG",  # needs the character set
    "PatientID": "PID-0042",
    "IssuerOfPatientID": "HOSPITAL-A",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "PatientAge": "052Y",
    "PatientSize": "1.68",
    "PatientWeight": "61.5",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.4242",
    "StudyDate": "20200102",
    "StudyTime": "101500",
    "StudyID": "42",
    "AccessionNumber": "ACC-0001",
    "ReferringPhysicianName": "WHO^DR",
    "StudyDescription": "MRI BRAIN W/WO CONTRAST",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.4243",
    "PositionReferenceIndicator": "NA",
    "BodyPartExamined": "HEAD",
    "PatientPosition": "FFS",
}


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory) -> list[Path]:
    image = sitk.ReadImage(str(NATIVE_T2))[:, :, 10:14]  # four real slices are enough
    folder = tmp_path_factory.mktemp("reference")
    files = write_dicom_series(image, folder, "AX T2 FSE", "TCGA-FG-6692", 4)
    for path in files:
        dataset = pydicom.dcmread(path)
        for keyword, value in REFERENCE_TAGS.items():
            setattr(dataset, keyword, value)
        dataset.save_as(path)
    return files


def test_every_patient_study_and_frame_of_reference_tag_is_carried_over(reference_files, tmp_path):
    reference = pydicom.dcmread(reference_files[0])
    for keyword, value in REFERENCE_TAGS.items():  # the reference holds them as set
        assert str(reference[keyword].value) == value, keyword
    series = [str(f) for f in reference_files]
    image = sitk.Cast(sitk.ReadImage(series), sitk.sitkFloat32) / 1000.0
    written = write_derived_series(image, tmp_path / "synthetic", "SYNTHETIC FLAIR test", "made by a test",
                                   reference=series)
    assert len(written) == 4
    for path in written:
        derived = pydicom.dcmread(path, stop_before_pixels=True)
        missing = [keyword for keyword in REFERENCE_TAGS if keyword not in derived]
        assert not missing, f"{path.name}: not carried over: {missing}"
        different = {keyword: str(derived[keyword].value) for keyword, value in REFERENCE_TAGS.items()
                     if str(derived[keyword].value) != value}
        assert not different, f"{path.name}: carried over with other values: {different}"
        # a new series of that study, not the reference series itself
        assert derived.SeriesInstanceUID != reference.SeriesInstanceUID
