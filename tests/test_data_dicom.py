"""DICOM: series written from the shipped NIfTI (axial and oblique) come back with the same geometry,
are matched to contrasts, discovered as cases and converted to NIfTI."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from agi_monai.data import (
    DataError,
    convert_dicom_to_nifti,
    discover_cases,
    find_dicom_series,
    load_volume,
    match_series_to_contrasts,
    metatensor_to_sitk,
    write_dicom_series,
)
from agi_monai.data.dicom import write_derived_series

DATA = Path(__file__).parent / "data"
NATIVE = DATA / "tcga-lgg" / "TCGA-FG-6692-native"
BRATS_T1 = DATA / "brats2023-gli" / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t1n.nii.gz"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def native_study(tmp_path_factory) -> Path:
    """The native TCGA scans (oblique, each on its own matrix) as one DICOM study, series in one folder."""
    folder = tmp_path_factory.mktemp("dicom") / "TCGA-FG-6692"
    for number, (name, description) in enumerate(
        [("t2", "AX T2 FSE"), ("flair", "AX T2 FLAIR"), ("t1", "AX T1 SE"), ("t1c", "AX T1 SE +C")], 2
    ):
        write_dicom_series(
            sitk.ReadImage(str(NATIVE / f"{name}.nii.gz")),
            folder,
            description,
            "TCGA-FG-6692",
            number,
            study_uid="1.2.826.0.1.3680043.8.498.1",
        )
    return folder


def _canonical(image: sitk.Image) -> sitk.Image:
    # DICOM sorts slices along row x column, so a left-handed NIfTI grid comes back with its slice axis
    # reversed (same voxels, same positions); compare both in one canonical axis order
    return sitk.DICOMOrient(image, "LPS")


def _assert_same_geometry_and_voxels(read_back: sitk.Image, original: sitk.Image, voxel_tolerance: float = 0.0) -> None:
    read_back, original = _canonical(read_back), _canonical(original)
    assert read_back.GetSize() == original.GetSize()
    np.testing.assert_allclose(read_back.GetOrigin(), original.GetOrigin(), atol=TOLERANCE)
    np.testing.assert_allclose(read_back.GetSpacing(), original.GetSpacing(), atol=TOLERANCE)
    np.testing.assert_allclose(read_back.GetDirection(), original.GetDirection(), atol=TOLERANCE)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(read_back), sitk.GetArrayFromImage(original), atol=voxel_tolerance
    )


def test_axial_round_trip_keeps_geometry(tmp_path):
    original = sitk.ReadImage(str(BRATS_T1))
    files = write_dicom_series(original, tmp_path, "T1 pre")
    assert len(files) == 155 and pydicom.dcmread(files[0]).Modality == "MR"
    _assert_same_geometry_and_voxels(metatensor_to_sitk(load_volume(tmp_path)), original)


def test_oblique_round_trip_keeps_geometry(native_study):
    original = sitk.ReadImage(str(NATIVE / "t2.nii.gz"))
    assert not np.allclose(np.abs(original.GetDirection()), np.eye(3).flatten(), atol=0.01)  # really oblique
    (series,) = [s for s in find_dicom_series(native_study) if s.description == "AX T2 FSE"]
    _assert_same_geometry_and_voxels(metatensor_to_sitk(load_volume(list(series.files))), original)


def test_float_volume_round_trip_within_rescale_precision(tmp_path):
    original = sitk.Cast(sitk.ReadImage(str(NATIVE / "flair.nii.gz")), sitk.sitkFloat32) / 7.3
    write_dicom_series(original, tmp_path, "synthetic FLAIR")
    largest = float(sitk.GetArrayViewFromImage(original).max())
    _assert_same_geometry_and_voxels(
        metatensor_to_sitk(load_volume(tmp_path)), original, voxel_tolerance=largest / 32000
    )


def test_series_are_matched_to_contrasts_by_description(native_study):
    series = find_dicom_series(native_study)
    assert [s.description for s in series] == ["AX T2 FSE", "AX T2 FLAIR", "AX T1 SE", "AX T1 SE +C"]
    matched = match_series_to_contrasts(series)
    assert {contrast: s.description for contrast, s in matched.items()} == {
        "T2": "AX T2 FSE",
        "FLAIR": "AX T2 FLAIR",
        "T1": "AX T1 SE",
        "T1Gd": "AX T1 SE +C",
    }
    explicit = match_series_to_contrasts(series, mapping={"t1": "4", "T2": "ax t2 fse"})
    assert explicit["T1"].description == "AX T1 SE" and explicit["T2"].series_number == "2"
    with pytest.raises(DataError, match="matches 0 series"):
        match_series_to_contrasts(series, mapping={"PD": "AX PD"})


def test_two_series_for_one_contrast_need_a_mapping(native_study, tmp_path):
    series = find_dicom_series(native_study)
    duplicate = [s for s in series if s.description == "AX T2 FSE"][0]
    lookalike = type(duplicate)(**{**duplicate.__dict__, "series_uid": "9.9", "description": "COR T2"})
    with pytest.raises(DataError, match="several series match one contrast .*T2: 'AX T2 FSE'.*'COR T2'"):
        match_series_to_contrasts([*series, lookalike])
    # series in folders of their own: the error names the study's folder, not the first series' folder
    in_subfolder = type(duplicate)(**{**lookalike.__dict__, "files": (str(native_study / "COR_T2" / "1.dcm"),)})
    with pytest.raises(DataError) as raised:
        match_series_to_contrasts([in_subfolder, *series])
    assert raised.value.source == str(native_study)
    # a mapping naming T2 alone settles it; the other contrasts are still found by their descriptions
    settled = match_series_to_contrasts([*series, lookalike], mapping={"T2": "COR T2"})
    assert {contrast: s.description for contrast, s in settled.items()} == {
        "T2": "COR T2", "FLAIR": "AX T2 FLAIR", "T1": "AX T1 SE", "T1Gd": "AX T1 SE +C"
    }
    # a series the mapping selects is not matched again by the rules
    moved = match_series_to_contrasts(series, mapping={"T1": "AX T1 SE +C"})
    assert moved["T1"].description == "AX T1 SE +C" and "T1Gd" not in moved


def test_a_series_synthesized_into_the_study_is_not_taken_for_an_acquired_contrast(native_study, tmp_path, caplog):
    """An earlier run writes "SYNTHETIC FLAIR ..." into the patient's study (same study, same folder, as PACS
    returns it): a later run must find the real FLAIR, not the synthetic one (nor fail on two FLAIRs)."""
    import logging
    import shutil

    study = tmp_path / "TCGA-FG-6692"
    shutil.copytree(native_study, study)
    t2 = [s for s in find_dicom_series(study) if s.description == "AX T2 FSE"][0]
    write_derived_series(
        sitk.ReadImage(str(NATIVE / "t2.nii.gz")), tmp_path / "derived", "SYNTHETIC FLAIR brats_t1_t2_to_flair",
        "Synthetic FLAIR made by AGI-Net bundle brats_t1_t2_to_flair", reference=t2.files[0],
    )
    for file in (tmp_path / "derived").iterdir():
        shutil.copy(file, study / f"synthetic_{file.name}")
    series = find_dicom_series(study)
    (synthetic,) = [s for s in series if s.synthetic]
    assert synthetic.description == "SYNTHETIC FLAIR brats_t1_t2_to_flair" and synthetic.study_uid == t2.study_uid
    with caplog.at_level(logging.INFO, logger="agi_monai.data.dicom"):
        matched = match_series_to_contrasts(series)
    assert matched["FLAIR"].description == "AX T2 FLAIR"
    assert "'SYNTHETIC FLAIR brats_t1_t2_to_flair' (series 1002" in caplog.text and "not used as an input" in caplog.text
    # without the real FLAIR, a scenario that reads FLAIR finds none rather than the synthetic one
    without_flair = [s for s in series if s.description != "AX T2 FLAIR"]
    assert "FLAIR" not in match_series_to_contrasts(without_flair)
    # chosen on purpose by a mapping, it is used
    assert match_series_to_contrasts(series, mapping={"FLAIR": synthetic.series_uid})["FLAIR"].synthetic


def test_dicom_folder_discovered_as_a_case_and_converted(native_study, tmp_path):
    with pytest.raises(DataError, match="holds 4 DICOM series"):
        load_volume(native_study)
    discovery = discover_cases(native_study.parent, required=["T1", "T2", "FLAIR", "T1Gd"])
    (case,) = discovery.cases
    assert case["case_id"] == "TCGA-FG-6692" and case["patient_id"] == "TCGA-FG-6692"
    assert len(case["T2"]) == 26 and all(name.endswith(".dcm") for name in case["T2"])
    converted = convert_dicom_to_nifti(case, tmp_path / "nifti")
    assert converted["T2"] == str(tmp_path / "nifti" / "TCGA-FG-6692-T2.nii.gz")
    assert sorted(p.name for p in (tmp_path / "nifti").iterdir()) == [
        f"TCGA-FG-6692-{c}.nii.gz" for c in ("FLAIR", "T1", "T1Gd", "T2")
    ]
    _assert_same_geometry_and_voxels(sitk.ReadImage(converted["T2"]), sitk.ReadImage(str(NATIVE / "t2.nii.gz")))
    rediscovered = discover_cases(tmp_path / "nifti", required=["T1", "T2", "FLAIR", "T1Gd"])
    assert [c["case_id"] for c in rediscovered.cases] == ["TCGA-FG-6692"]
