"""DICOM: series written from the shipped NIfTI (axial and oblique) come back with the same geometry,
are matched to contrasts, discovered as cases and converted to NIfTI."""

import json
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
from helpers import DATA

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


def _assert_same_grid(read_back: sitk.Image, original: sitk.Image) -> None:
    read_back, original = _canonical(read_back), _canonical(original)
    assert read_back.GetSize() == original.GetSize()
    np.testing.assert_allclose(read_back.GetOrigin(), original.GetOrigin(), atol=TOLERANCE)
    np.testing.assert_allclose(read_back.GetSpacing(), original.GetSpacing(), atol=TOLERANCE)
    np.testing.assert_allclose(read_back.GetDirection(), original.GetDirection(), atol=TOLERANCE)


def _assert_same_geometry_and_voxels(read_back: sitk.Image, original: sitk.Image, voxel_tolerance: float = 0.0) -> None:
    _assert_same_grid(read_back, original)
    read_back, original = _canonical(read_back), _canonical(original)
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
    # a SeriesNumber as a number, as a JSON or Python mapping on the command line gives it (before: AttributeError)
    assert match_series_to_contrasts(series, mapping={"T1": 4})["T1"] == explicit["T1"]
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


def test_a_series_that_is_not_an_mr_image_is_never_matched(native_study):
    # a segmentation or structure set named after its image would be a second T1 (or the only one)
    series = find_dicom_series(native_study)
    assert {s.modality for s in series} == {"MR"}
    (t1,) = [s for s in series if s.description == "AX T1 SE"]
    contours = type(t1)(**{**t1.__dict__, "series_uid": "9.9", "description": "AX T1 SE tumour", "modality": "SEG"})
    assert match_series_to_contrasts([*series, contours])["T1"] == t1
    assert "T1" not in match_series_to_contrasts([s for s in series if s is not t1] + [contours])


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


# ------------------------------------------------------------------------------- enhanced (multi-frame) MR

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
ENHANCED_STUDY = "1.2.826.0.1.3680043.8.498.2"


def write_enhanced_mr(image: sitk.Image | dict[float, sitk.Image], path: Path, description: str,
                      frame_order: list[int] | None = None, per_frame_rescale: bool = False,
                      orientations: dict[int, list[float]] | None = None, agent: str = "",
                      echoes_in_blocks: bool = False) -> Path:
    """An Enhanced MR Image Storage file of ``image`` (written independently of agi_monai): one frame per slice,
    its position in its own PlanePositionSequence, stored in ``frame_order`` (slice indices), scaled by one shared
    rescale or by each frame's own (as Philips files are). ``orientations`` overrides chosen frames' orientation.

    ``image`` may be several echoes, echo time (ms) -> image on one grid (a dual-echo PD/T2 sequence, as Philips and
    Siemens XA export it): one file holding every echo's frames, each with its EffectiveEchoTime in its own
    MREchoSequence, stored slice by slice with the echoes interleaved (as acquired), or echo after echo."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def item(**tags) -> Dataset:
        dataset = Dataset()
        for keyword, value in tags.items():
            setattr(dataset, keyword, value)
        return dataset

    echoes = image if isinstance(image, dict) else {None: image}
    grid = next(iter(echoes.values()))
    values = {echo_time: sitk.GetArrayFromImage(volume).astype(np.float64) for echo_time, volume in echoes.items()}
    direction, spacing = np.asarray(grid.GetDirection()).reshape(3, 3), grid.GetSpacing()
    order = list(range(grid.GetSize()[2])) if frame_order is None else frame_order
    frame_keys = ([(echo_time, index) for echo_time in echoes for index in order] if echoes_in_blocks else
                  [(echo_time, index) for index in order for echo_time in echoes])  # (echo time, slice index)
    if per_frame_rescale:
        low = {key: values[key[0]][key[1]].min() for key in frame_keys}
        high = {key: values[key[0]][key[1]].max() for key in frame_keys}
    else:
        low = dict.fromkeys(frame_keys, min(v.min() for v in values.values()))
        high = dict.fromkeys(frame_keys, max(v.max() for v in values.values()))
    slopes = {key: max(high[key] - low[key], 1e-6) / 65535 for key in frame_keys}
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.Modality, dataset.PatientID, dataset.SeriesDescription = "MR", "ENHANCED-1", description
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = ENHANCED_STUDY, generate_uid()
    if agent:
        dataset.ContrastBolusAgentSequence = DicomSequence([item(CodeMeaning=agent)])
    shared = item(
        PixelMeasuresSequence=DicomSequence([item(PixelSpacing=[spacing[1], spacing[0]], SliceThickness=spacing[2])]),
        PlaneOrientationSequence=DicomSequence([item(ImageOrientationPatient=[*direction[:, 0], *direction[:, 1]])]),
    )
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = DicomSequence(
            [item(RescaleSlope=slopes[frame_keys[0]], RescaleIntercept=low[frame_keys[0]], RescaleType="US")])
    frames, stored = [], []
    for echo_time, index in frame_keys:
        key = (echo_time, index)
        group = item(PlanePositionSequence=DicomSequence(
            [item(ImagePositionPatient=list(grid.TransformIndexToPhysicalPoint((0, 0, index))))]))
        if echo_time is not None:
            group.MREchoSequence = DicomSequence([item(EffectiveEchoTime=echo_time)])
        if per_frame_rescale:
            group.PixelValueTransformationSequence = DicomSequence(
                [item(RescaleSlope=slopes[key], RescaleIntercept=low[key], RescaleType="US")])
        if orientations and index in orientations:
            group.PlaneOrientationSequence = DicomSequence([item(ImageOrientationPatient=orientations[index])])
        frames.append(group)
        stored.append(np.rint((values[echo_time][index] - low[key]) / slopes[key]))
    dataset.SharedFunctionalGroupsSequence = DicomSequence([shared])
    dataset.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    dataset.NumberOfFrames = len(frame_keys)
    dataset.set_pixel_data(np.stack(stored).astype(np.uint16), photometric_interpretation="MONOCHROME2", bits_stored=16)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("order, per_frame_rescale", [("ascending", False), ("interleaved", True), ("descending", True)])
def test_an_enhanced_multiframe_mr_file_reads_as_its_volume(tmp_path, order, per_frame_rescale):
    # before: GDCM stacked the frames in stored order, on a 1 mm grid, all scaled by the first frame's rescale
    original = sitk.Cast(sitk.ReadImage(str(NATIVE / "t2.nii.gz")), sitk.sitkFloat32)  # oblique, 26 slices
    slices = list(range(original.GetSize()[2]))
    frame_order = {"ascending": slices, "interleaved": slices[::2] + slices[1::2], "descending": slices[::-1]}[order]
    path = write_enhanced_mr(original, tmp_path / "enhanced" / "IM1.dcm", "AX T2 ENH", frame_order, per_frame_rescale)
    largest = float(sitk.GetArrayViewFromImage(original).max())
    read = metatensor_to_sitk(load_volume(tmp_path / "enhanced"))
    _assert_same_geometry_and_voxels(read, original, voxel_tolerance=largest / 65535)
    if order == "ascending":  # what GDCM gets right, it gets as we do (an independent reader)
        _assert_same_geometry_and_voxels(sitk.ReadImage(str(path)), read, voxel_tolerance=largest / 65535)


@pytest.mark.parametrize("problem", ["two echoes", "missing frame", "two orientations"])
def test_an_enhanced_file_that_is_not_one_stack_is_refused_naming_why(tmp_path, problem):
    original = sitk.ReadImage(str(NATIVE / "t2.nii.gz"))
    slices = list(range(original.GetSize()[2]))
    path = tmp_path / "IM1.dcm"
    if problem == "two echoes":
        write_enhanced_mr(original, path, "AX T2 2 echoes", slices + slices)
        message = "holds 52 frames at 26 slice positions (several echoes, stacks or time points in one series)"
    elif problem == "missing frame":
        write_enhanced_mr(original, path, "AX T2", [s for s in slices if s != 10])
        message = "has a gap of 11 mm between frames 10 and 11, two of its 25 frames, where the others are 5.5 mm apart"
    else:
        write_enhanced_mr(original, path, "AX T2", orientations={3: [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]})
        message = "holds frames of 2 orientations (e.g. a localizer's three planes)"
    with pytest.raises(DataError) as raised:
        load_volume([str(path)])
    assert raised.value.source == str(path) and message in str(raised.value), str(raised.value)


def test_enhanced_series_are_discovered_and_matched_with_their_contrast_agent(tmp_path):
    # an enhanced file has no ContrastBolusAgent; its agents are in ContrastBolusAgentSequence
    study = tmp_path / "study"
    for name, description, agent in [("t1", "T1 MPRAGE", ""), ("t1c", "T1 MPRAGE", "GADOBUTROL"), ("t2", "T2 SPC", "")]:
        write_enhanced_mr(sitk.ReadImage(str(NATIVE / f"{name}.nii.gz")), study / f"{name}.dcm", description, agent=agent)
    (case,) = discover_cases(study, required=["T1", "T2", "T1Gd"]).cases
    assert case["case_id"] == "ENHANCED-1"
    assert {contrast: Path(case[contrast][0]).name for contrast in ("T1", "T1Gd", "T2")} == {
        "T1": "t1.dcm", "T1Gd": "t1c.dcm", "T2": "t2.dcm"
    }
    _assert_same_geometry_and_voxels(metatensor_to_sitk(load_volume(case["T1Gd"])),
                                     sitk.Cast(sitk.ReadImage(str(NATIVE / "t1c.nii.gz")), sitk.sitkFloat32),
                                     voxel_tolerance=float(sitk.GetArrayViewFromImage(sitk.ReadImage(str(NATIVE / "t1c.nii.gz"))).max()) / 65535)


# ------------------------------------------------------------------------------------- multi-echo series

IXI = DATA / "ixi-sim"


def write_dual_echo_series(folder: Path) -> str:
    """The PD and T2 of the IXI-like subject as one dual-echo series, as a PD/T2 TSE leaves it: one
    SeriesInstanceUID, the two echoes' slices interleaved by InstanceNumber, told apart by EchoTime."""
    written = []
    for echo, (contrast, echo_time) in enumerate([("PD", 15.0), ("T2", 90.0)], start=1):
        files = write_dicom_series(sitk.ReadImage(str(IXI / f"IXI901-SIM-0001-{contrast}.nii.gz")), folder / contrast,
                                   "PD+T2 TSE", "IXI901", 3, study_uid="1.2.826.0.1.3680043.8.498.3")
        written += [(echo, echo_time, index, path) for index, path in enumerate(files)]
    series_uid = pydicom.dcmread(written[0][3]).SeriesInstanceUID
    for echo, echo_time, index, path in written:
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID, dataset.EchoTime, dataset.EchoNumbers = series_uid, echo_time, echo
        dataset.InstanceNumber = 2 * index + echo
        dataset.save_as(folder / f"IM{2 * index + echo:04d}.dcm")
        Path(path).unlink()
    for contrast in ("PD", "T2"):
        (folder / contrast).rmdir()
    return series_uid


def test_a_dual_echo_pd_t2_series_is_split_into_its_echoes(tmp_path):
    # before: the series was one volume of 144 slices, the echoes interleaved at half the spacing, without a word
    folder = tmp_path / "IXI901"
    write_dual_echo_series(folder)
    pd_echo, t2_echo = find_dicom_series(folder)
    assert (pd_echo.echo, pd_echo.echo_time, t2_echo.echo, t2_echo.echo_time) == (1, 15.0, 2, 90.0)
    assert pd_echo.label == f"'PD+T2 TSE' echo 1 (TE 15 ms) (series 3, {folder})"
    (case,) = discover_cases(tmp_path, required=["PD", "T2"]).cases
    for contrast in ("PD", "T2"):
        assert len(case[contrast]) == 72
        _assert_same_geometry_and_voxels(metatensor_to_sitk(load_volume(case[contrast])),
                                         sitk.ReadImage(str(IXI / f"IXI901-SIM-0001-{contrast}.nii.gz")),
                                         voxel_tolerance=1e-3)
    # the whole series given as one volume: refused, not interleaved
    with pytest.raises(DataError, match=r"holds 144 slices at 72 slice positions \(several echoes, stacks or time"):
        load_volume(folder)
    # a selector names one echo; one that names the series names both, and says how to pick one
    assert match_series_to_contrasts([pd_echo, t2_echo], mapping={"T2": "PD+T2 TSE echo 2", "PD": "3 echo 1"}) == {
        "T2": t2_echo, "PD": pd_echo}
    with pytest.raises(DataError, match=r"matches 2 series among: .* \(expected exactly one \(one echo: add echo 1"):
        match_series_to_contrasts([pd_echo, t2_echo], mapping={"T2": "3"})
    # a description that itself ends in "echo 2" is still a selector of its own
    renamed = type(t2_echo)(**{**t2_echo.__dict__, "echo": 0, "echo_time": None, "description": "AX T2 echo 2"})
    assert match_series_to_contrasts([renamed], mapping={"T2": "AX T2 echo 2"}) == {"T2": renamed}
    # names with underscores are words too
    underscored = [type(s)(**{**s.__dict__, "description": "PD_T2_TSE_AX", "protocol": ""}) for s in (pd_echo, t2_echo)]
    assert match_series_to_contrasts(underscored) == {"PD": underscored[0], "T2": underscored[1]}
    # described as one contrast only, the two echoes are two candidates for it: a mapping settles it
    described_as_t2 = [type(s)(**{**s.__dict__, "description": "AX T2 TSE", "protocol": ""}) for s in (pd_echo, t2_echo)]
    with pytest.raises(DataError, match=r"several series match one contrast \(T2: 'AX T2 TSE' echo 1 \(TE 15 ms\)"):
        match_series_to_contrasts(described_as_t2)


ECHO_TIMES = {"PD": 15.0, "T2": 90.0}


def write_multi_echo_study(folder: Path, echoes_in_blocks: bool = False) -> Path:
    """The IXI-like subject as an enhanced dual-echo export: its PD and T2 (which share one axial grid) as the two
    echoes of one multi-frame file ``pdt2.dcm``, per-frame rescale as Philips writes it, beside its T1 as a classic
    series (``t1/``) of the same patient and study; returns the multi-frame file."""
    echoes = {echo_time: sitk.ReadImage(str(IXI / f"IXI901-SIM-0001-{contrast}.nii.gz"))
              for contrast, echo_time in ECHO_TIMES.items()}
    path = write_enhanced_mr(echoes, folder / "pdt2.dcm", "PD+T2 TSE", per_frame_rescale=True,
                             echoes_in_blocks=echoes_in_blocks)
    write_dicom_series(sitk.ReadImage(str(IXI / "IXI901-SIM-0001-T1.nii.gz")), folder / "t1", "T1 SE", "ENHANCED-1", 2,
                       study_uid=ENHANCED_STUDY)
    return path


@pytest.fixture(scope="module")
def multi_echo_study(tmp_path_factory) -> Path:
    """A study folder made by :func:`write_multi_echo_study` (echoes interleaved slice by slice)."""
    folder = tmp_path_factory.mktemp("multi-echo") / "study"
    write_multi_echo_study(folder)
    return folder


def _assert_echo_reads_as(source, contrast: str) -> None:
    original = sitk.ReadImage(str(IXI / f"IXI901-SIM-0001-{contrast}.nii.gz"))
    largest = float(sitk.GetArrayViewFromImage(original).max())
    _assert_same_geometry_and_voxels(metatensor_to_sitk(load_volume(source)), sitk.Cast(original, sitk.sitkFloat32),
                                     voxel_tolerance=largest / 65535)


@pytest.mark.parametrize("echoes_in_blocks", [False, True])
def test_a_dual_echo_enhanced_file_is_split_into_its_echoes(tmp_path, echoes_in_blocks):
    # before: discovery found one series, read whole it was refused ("holds 144 frames at 72 slice positions"), and
    # the case had no T2
    path = write_multi_echo_study(tmp_path / "study", echoes_in_blocks)
    pd_echo, t2_echo, t1 = find_dicom_series(tmp_path / "study")
    assert (pd_echo.echo, pd_echo.echo_time, t2_echo.echo, t2_echo.echo_time) == (1, 15.0, 2, 90.0)
    assert pd_echo.files == t2_echo.files == (str(path),) and pd_echo.echo_in_frames and not t1.echo_in_frames
    assert pd_echo.label == f"'PD+T2 TSE' echo 1 (TE 15 ms) (series , {path.parent})"
    (case,) = discover_cases(tmp_path / "study", required=["T1", "PD", "T2"]).cases
    assert case["case_id"] == "ENHANCED-1" and len(case["T1"]) == 96
    assert {contrast: case[contrast] for contrast in ECHO_TIMES} == {
        contrast: {"files": [str(path)], "echo_time": echo_time} for contrast, echo_time in ECHO_TIMES.items()}
    for contrast in ECHO_TIMES:
        _assert_echo_reads_as(case[contrast], contrast)
    # a selector names one echo as for a classic dual-echo series
    selectors = {"PD": "PD+T2 TSE echo 1", "T2": "PD+T2 TSE echo 2"}
    assert match_series_to_contrasts([pd_echo, t2_echo, t1], mapping=selectors) == {"PD": pd_echo, "T2": t2_echo, "T1": t1}
    # the file given whole: refused, naming its echoes and how to select one
    with pytest.raises(DataError) as raised:
        load_volume([str(path)])
    assert str(raised.value).startswith(f'{path}: holds frames of 2 echoes (EffectiveEchoTime 15, 90 ms) (expected one '
                                        'echo: {"files": [...], "echo_time": <ms>} selects its frames')


def test_an_echo_selection_survives_a_datalist_monai_datasets_and_conversion(multi_echo_study, tmp_path):
    from monai.data import CacheDataset, PersistentDataset

    from agi_monai.bundle.data import load_split
    from agi_monai.data import LoadVolumed, write_datalist

    (case,) = discover_cases(multi_echo_study, required=["T1", "PD", "T2"]).cases
    # written relative to the datalist's folder, read back absolute: the selection kept
    datalist = write_datalist({"test": [case]}, multi_echo_study.parent / "datalist.json")
    written = json.loads(datalist.read_text())["test"][0]
    assert written["T2"] == {"files": ["study/pdt2.dcm"], "echo_time": 90.0}
    (read_back,) = discover_cases(datalist, required=["T1", "PD", "T2"], split="test").cases
    assert read_back == case
    # a training run's datalist check finds the echo's file (before: it looked for files named "files", "echo_time")
    assert load_split(datalist, "test", ["T1", "PD", "T2"], require_files=True) == [case]
    for dataset in (PersistentDataset([read_back], LoadVolumed(["PD", "T2"]), cache_dir=tmp_path / "cache"),
                    CacheDataset([read_back], LoadVolumed(["PD", "T2"]), progress=False)):
        item = dataset[0]
        assert tuple(item["PD"].shape) == tuple(item["T2"].shape) == (1, 128, 128, 72)
        assert not np.allclose(item["PD"], item["T2"])
    converted = convert_dicom_to_nifti(read_back, tmp_path / "nifti")
    _assert_echo_reads_as(converted["T2"], "T2")


@pytest.mark.parametrize("selector, problem", [
    (lambda path, t1: {"files": [path], "echo_time": 50}, "has no frame of echo time 50 ms (its frames' "
                                                          "EffectiveEchoTime: 15, 90 ms) (expected the echo_time of"),
    (lambda path, t1: {"files": [path], "echo": 2}, "is selected by the keys 'files', 'echo' (expected {\"files\""),
    (lambda path, t1: {"files": [path], "echo_time": "90"}, "has echo_time '90' (expected a number of milliseconds"),
    (lambda path, t1: {"files": t1, "echo_time": 90.0}, "is a classic DICOM file (one frame), where echo_time 90 "
                                                        "selects frames"),
], ids=["an echo time no frame has", "an unknown key", "an echo time not a number", "classic files"])
def test_a_wrong_echo_selection_is_refused_naming_the_file(multi_echo_study, tmp_path, selector, problem):
    t1 = [str(name) for name in sorted((multi_echo_study / "t1").iterdir())]
    source = selector(str(multi_echo_study / "pdt2.dcm"), t1)
    with pytest.raises(DataError) as raised:
        load_volume(source)
    assert raised.value.source == source["files"][0] and problem in str(raised.value), str(raised.value)
    # in a datalist: that case is skipped, named with the reason
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps([{"case_id": "P1", "T1": t1, "T2": source}]))
    discovery = discover_cases(datalist, validate=True)
    assert not discovery.cases and [str(failure) for failure in discovery.failures] == [f"P1: {raised.value}"]


def test_synthesize_reads_the_echoes_of_one_enhanced_file(multi_echo_study, tmp_path):
    # (T2, PD) -> T1 on a study whose T2 and PD are one dual-echo file: a T1 on the T2 echo's grid, and with --dicom a
    # series in the study of the input
    from agi_monai.cli import main
    from test_cli import FAST, make_bundle

    bundle = make_bundle(tmp_path / "bundles", "ixi_t2_pd_to_t1", 2)
    output = tmp_path / "out"
    assert main(["synthesize", str(multi_echo_study), "--bundle", str(bundle), "--output_dir", str(output), "--dicom",
                 *FAST]) == 0
    assert sorted(p.name for p in output.iterdir()) == ["ENHANCED-1_T1.nii.gz", "ENHANCED-1_T1_dicom"]
    t2 = sitk.ReadImage(str(IXI / "IXI901-SIM-0001-T2.nii.gz"))
    synthesized = sitk.ReadImage(str(output / "ENHANCED-1_T1.nii.gz"))
    series = sorted((output / "ENHANCED-1_T1_dicom").iterdir())
    for image in (synthesized, metatensor_to_sitk(load_volume([str(p) for p in series]))):
        _assert_same_grid(image, t2)
    header = pydicom.dcmread(series[0])
    assert (header.StudyInstanceUID, header.PatientID, len(series)) == (ENHANCED_STUDY, "ENHANCED-1", 72)


@pytest.mark.parametrize("change, message", [
    ("orientation", "holds slices of 2 orientations (e.g. a localizer's three planes)"),
    ("spacing", "holds slices of 2 pixel spacings (expected one stack of slices of one pixel spacing)"),
    # before: ITK's "Size mismatch!" with its source file's path and no DICOM file named
    ("size", "holds slices of 2 sizes (224 x 240, 224 x 256) (expected one stack of slices of one size)"),
])
def test_a_classic_series_that_is_not_one_stack_is_refused_naming_why(tmp_path, change, message):
    files = write_dicom_series(sitk.ReadImage(str(NATIVE / "t2.nii.gz")), tmp_path / "series", "AX T2")
    dataset = pydicom.dcmread(files[5])
    if change == "orientation":
        dataset.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    elif change == "spacing":
        dataset.PixelSpacing = [0.5, 0.5]
    else:
        dataset.set_pixel_data(dataset.pixel_array[:240], photometric_interpretation="MONOCHROME2", bits_stored=16)
    dataset.save_as(files[5])
    with pytest.raises(DataError) as raised:
        load_volume(tmp_path / "series")
    assert message in str(raised.value), str(raised.value)


@pytest.mark.parametrize("change, message", [
    # before: read without a word, ITK placing the slices along the normal: up to 12 mm off at 5 degrees (review)
    ("tilt", "has slices that are not stacked along their normal (shifted in plane by up to "),
    # before: read, ITK giving the volume the median spacing: the slices beyond the gap ~1 mm off
    ("uneven", "has unevenly spaced slices: 7.5 mm between 001_0007.dcm and 001_0006.dcm, 5.5 mm between most others"),
    ("duplicate", "holds 26 slices at 25 slice positions (several echoes, stacks or time points in one series): e.g. "
                  "001_0006.dcm and 001_0007.dcm at "),
])
def test_a_classic_series_misplaced_by_stacking_is_refused_naming_its_files(tmp_path, change, message):
    files = write_dicom_series(sitk.ReadImage(str(NATIVE / "t2.nii.gz")), tmp_path / "series", "AX T2")
    assert [Path(f).name for f in files[5:7]] == ["001_0006.dcm", "001_0007.dcm"]
    datasets = [pydicom.dcmread(f) for f in files]
    row, column = (np.asarray(datasets[0].ImageOrientationPatient[i:i + 3], float) for i in (0, 3))
    for number, dataset in enumerate(datasets):
        position = np.asarray(dataset.ImagePositionPatient, float)
        if change == "tilt":  # each slice shifted along its column by tan(5 degrees) of its distance from the first
            position = position + number * 5.5 * np.tan(np.radians(5)) * column
        elif change == "uneven" and number > 5:
            position = position - 2.0 * np.cross(row, column)  # (the slices run against the normal)
        elif change == "duplicate" and number == 6:
            position = np.asarray(datasets[5].ImagePositionPatient, float)
        dataset.ImagePositionPatient = [f"{v:.6f}" for v in position]
        dataset.save_as(files[number])
    with pytest.raises(DataError) as raised:
        load_volume(tmp_path / "series")
    assert message in str(raised.value), str(raised.value)


@pytest.mark.parametrize("echo_time", ["15,0", "n/a", [15.0, 90.0], None])
def test_a_series_without_one_usable_echo_time_per_file_is_left_whole(tmp_path, echo_time, caplog):
    # before the fix: a ValueError/TypeError traceback from discovery and convert-dicom for the whole folder
    folder = tmp_path / "IXI901"
    write_dual_echo_series(folder)
    changed = sorted(folder.iterdir())[5:6] if echo_time is None else sorted(folder.iterdir())
    for path in changed:
        dataset = pydicom.dcmread(path)
        if echo_time is None:
            del dataset.EchoTime
        else:  # the raw value, as some exports write it: pydicom refuses to set it
            raw = "\\".join(map(str, echo_time)) if isinstance(echo_time, list) else echo_time
            raw = raw.encode() + b" " * (len(raw) % 2)
            dataset[0x00180081] = pydicom.dataelem.RawDataElement(
                pydicom.tag.Tag(0x00180081), "DS", len(raw), raw, 0, True, True)
        dataset.save_as(path)
    with caplog.at_level("WARNING", logger="agi_monai.data.dicom"):
        (series,) = find_dicom_series(folder)
    assert series.echo == 0 and len(series.files) == 144
    if echo_time is None:  # one file of an otherwise split series: said
        assert "no usable EchoTime (None), where other files of its series have one" in caplog.text
    with pytest.raises(DataError, match="holds 144 slices at 72 slice positions"):
        load_volume(list(series.files))


def test_a_media_export_with_a_dicomdir_is_discovered(tmp_path):
    # a CD/USB export: DICOMDIR at the top, the images in PT*/ST*/SE*/IM* files without an extension
    from pydicom.fileset import FileSet

    t2 = write_derived_series(sitk.ReadImage(str(NATIVE / "t2.nii.gz")), tmp_path / "src" / "t2", "AX T2 FSE", "-",
                              case_id="P1")
    t1 = write_derived_series(sitk.ReadImage(str(NATIVE / "t1.nii.gz")), tmp_path / "src" / "t1", "AX T1 SE", "-",
                              reference=str(t2[0]), case_id="P1")
    files = FileSet()
    for path in [*t2, *t1]:
        dataset = pydicom.dcmread(path)
        dataset.Manufacturer = "ACME"  # acquired series, not ones agi-monai wrote
        dataset.save_as(path)
        files.add(path)
    files.write(tmp_path / "export")
    assert (tmp_path / "export" / "DICOMDIR").is_file()
    (case,) = discover_cases(tmp_path / "export", required=["T1", "T2"]).cases
    assert case["case_id"] == "P1" and len(case["T1"]) == len(case["T2"]) == 26
    _assert_same_geometry_and_voxels(metatensor_to_sitk(load_volume(case["T1"])),
                                     sitk.Cast(sitk.ReadImage(str(NATIVE / "t1.nii.gz")), sitk.sitkFloat32),
                                     voxel_tolerance=float(sitk.GetArrayViewFromImage(sitk.ReadImage(str(NATIVE / "t1.nii.gz"))).max()) / 65535)


@pytest.mark.parametrize("description, contrast", [
    ("t1_mprage_sag_p2_iso", "T1"), ("SAG_T1_MPRAGE_GD", "T1Gd"), ("t1_fl2d_tra_post", "T1Gd"), ("T1_SE_AX_+C", "T1Gd"),
    ("t1_se_tra_ce", "T1Gd"), ("T1_CE", "T1Gd"), ("T1 WO CE", "T1"), ("T1_WO_CE", "T1"), ("T1 no CE", "T1"),
    ("T1_PRE_CE", "T1"), ("T1_NON_CE", "T1"), ("AX_PD_TSE", "PD"), ("PD_TSE", "PD"), ("PD_FS_TSE", "PD"),
    ("T2_TSE_TRA", "T2"), ("Ax T2 FSE", "T2"), ("t2_tirm_tra_dark-fluid", "FLAIR"), ("AX_FLAIR", "FLAIR"),
    ("Ax T2 FLAIR", "FLAIR"), ("Ax T1 FLAIR", "T1"), ("Ax T1 FLAIR +C", "T1Gd"),  # GE's T1 FLAIR is T1-weighted
    # not an anatomical contrast: left to no rule (before an underscore fix, several of them became T1 or T2)
    ("tfl_b1map", None), ("pCASL_TFE", None), ("Ax_STIR_FSE", None), ("tirm_tse", None), ("tse_dixon_W", None),
    ("localizer_3plane", None), ("T1_loc", None), ("T1_CE_MIP", None), ("ep2d_diff", None), ("t2_swi_tra", None),
    ("DWI_b1000", None), ("T1-CE", "T1Gd"), ("T1 (CE)", "T1Gd"), ("T1 w/o CE", "T1"), ("T1 W/O CONTRAST", "T1"),
    ("t1 pre-contrast", "T1"), ("T1W_FLAIR", "T1"),
    # GE's ProtocolName is the exam's, the same for every series: "t1" or "w/wo contrast" there say nothing of one
    ("AX T2 FLAIR|ROUTINE BRAIN W/WO T1", "FLAIR"), ("AX T1 POST|BRAIN W/WO CONTRAST", "T1Gd"),
    ("T1 +C|BRAIN WITH AND WITHOUT CONTRAST", "T1Gd"),
    # T2*-weighted gradient echoes (for blood products) are no T2 (before, all of these were); T1 gradient echoes are T1
    ("T2*", None), ("AX T2* GRE", None), ("t2_fl2d_tra_hemo", None), ("T2 FFE", None), ("T2_STAR", None),
    ("Ax T2 star GRE", None), ("t2_medic_tra", None), ("Ax GRE T2", None), ("Ax SWAN", None),
    ("AX T1 3D GRE", "T1"), ("T1 FFE", "T1"), ("t1_fl2d_tra", "T1"), ("T1W_3D_FFE", "T1"), ("t1_fl3d_tra_CE", "T1Gd"),
    ("t1_se_tra_KM", "T1Gd"), ("t1_se_tra_ohne_KM", "T1"),  # Kontrastmittel: Siemens' German contrast agent
])
def test_contrast_rules_on_vendor_series_names(native_study, description, contrast):
    (template,) = [s for s in find_dicom_series(native_study) if s.description == "AX T2 FSE"]
    description, _, protocol = description.partition("|")  # "SeriesDescription|ProtocolName"
    series = type(template)(**{**template.__dict__, "description": description, "protocol": protocol})
    assert match_series_to_contrasts([series]) == ({contrast: series} if contrast else {})


@pytest.mark.parametrize("protocols, expected", [
    # GE: the exam's protocol on every series; its "contrast" made the pre-contrast T1 a second T1Gd (ambiguous)
    (["BRAIN TUMOR CONTRAST"] * 4, {"T1": "AX T1 SE", "T1Gd": "AX T1 POST", "T2": "AX T2 FSE", "FLAIR": "AX T2 FLAIR"}),
    (["MR BRAIN W CONTRAST T1"] * 4, {"T1": "AX T1 SE", "T1Gd": "AX T1 POST", "T2": "AX T2 FSE", "FLAIR": "AX T2 FLAIR"}),
    # Siemens: each series' own protocol still counts (here it is what says "post" for the empty description)
    (["t1_se_tra", "t1_se_tra_post", "t2_tse_tra", "t2_tirm_tra_dark-fluid"],
     {"T1": "AX T1 SE", "T1Gd": "", "T2": "AX T2 FSE", "FLAIR": "AX T2 FLAIR"}),
])
def test_an_exam_protocol_name_does_not_decide_a_series_contrast(native_study, protocols, expected):
    (template,) = [s for s in find_dicom_series(native_study) if s.description == "AX T2 FSE"]
    descriptions = ["AX T1 SE", "AX T1 POST" if protocols[0] != "t1_se_tra" else "", "AX T2 FSE", "AX T2 FLAIR"]
    study = [type(template)(**{**template.__dict__, "series_uid": f"1.2.{i}", "series_number": str(i + 1),
                               "description": description, "protocol": protocol})
             for i, (description, protocol) in enumerate(zip(descriptions, protocols))]
    matched = match_series_to_contrasts(study)
    assert {contrast: item.description for contrast, item in matched.items()} == expected


def test_a_shared_protocol_name_still_counts_where_the_description_names_nothing(native_study):
    # one T1 protocol run before and after contrast: only the protocol says T1, the agent says which is post
    (template,) = [s for s in find_dicom_series(native_study) if s.description == "AX T2 FSE"]
    study = [type(template)(**{**template.__dict__, "series_uid": f"1.2.{i}", "description": description,
                               "protocol": "T1 AX SE", "contrast_agent": agent})
             for i, (description, agent) in enumerate([("Ax pre", ""), ("Ax post", "GADAVIST")])]
    assert match_series_to_contrasts(study) == {"T1": study[0], "T1Gd": study[1]}


def test_series_without_the_exam_protocol_name_do_not_hide_it(native_study):
    # a segmentation and a screen save without a ProtocolName in a GE study: still the exam's name on every image
    (template,) = [s for s in find_dicom_series(native_study) if s.description == "AX T2 FSE"]
    acquired = [("AX T1 SE", "BRAIN TUMOR CONTRAST", "MR"), ("AX T1 POST", "BRAIN TUMOR CONTRAST", "MR"),
                ("AX T2 FSE", "BRAIN TUMOR CONTRAST", "MR"), ("Tumour segmentation", "", "SEG"), ("Screen Save", "", "MR")]
    study = [type(template)(**{**template.__dict__, "series_uid": f"1.2.{i}", "description": description,
                               "protocol": protocol, "modality": modality})
             for i, (description, protocol, modality) in enumerate(acquired)]
    matched = match_series_to_contrasts(study)
    assert {contrast: item.description for contrast, item in matched.items()} == {
        "T1": "AX T1 SE", "T1Gd": "AX T1 POST", "T2": "AX T2 FSE"}


def test_an_exam_protocol_name_still_counts_where_descriptions_are_empty(native_study):
    # some anonymisers blank SeriesDescription: the protocol name, even the exam's, is then all there is
    (template,) = [s for s in find_dicom_series(native_study) if s.description == "AX T2 FSE"]
    study = [type(template)(**{**template.__dict__, "series_uid": f"1.2.{i}", "description": description,
                               "protocol": "BRAIN T2 TSE"})
             for i, description in enumerate(["", "AX T1 SE"])]
    assert match_series_to_contrasts(study) == {"T2": study[0], "T1": study[1]}


def test_appledouble_files_beside_a_dicom_series_do_not_hide_it(tmp_path):
    # a study copied on a Mac has a "._<file>" beside every file; sorted first, the five tried for being DICOM were all
    # AppleDouble files, and the folder's series were left out without a word
    volume = sitk.ReadImage(str(NATIVE / "t2.nii.gz"))[:, :, 10:14]
    files = write_dicom_series(volume, tmp_path / "P01" / "t2", "AX T2 FSE", "P01", 2)
    for path in files:
        (Path(path).parent / f"._{Path(path).name}").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    discovery = discover_cases(tmp_path, required=["T2"])
    (case,) = discovery.cases
    assert case["case_id"] == "P01" and sorted(case["T2"]) == sorted(str(path) for path in files)
    assert len(discovery.hidden) == 4


def test_a_t2_star_series_is_not_taken_for_the_t2(native_study):
    # a usual tumour protocol has a T2* gradient echo beside the T2 FSE: before, the study failed as two T2 series;
    # and in a study with only the T2*, the T2 was synthesized from it without a word
    (template,) = [s for s in find_dicom_series(native_study) if s.description == "AX T2 FSE"]
    study = [type(template)(**{**template.__dict__, "series_uid": f"1.2.{i}", "series_number": str(i + 2),
                               "description": description})
             for i, description in enumerate(["AX T2 FSE", "AX T2* GRE", "AX T1 SE"])]
    assert match_series_to_contrasts(study) == {"T2": study[0], "T1": study[2]}
    assert match_series_to_contrasts(study[1:]) == {"T1": study[2]}


def test_an_anonymised_study_with_a_folder_per_series_is_one_case(tmp_path):
    # before: an empty PatientID named each series after its own folder, so a PACS export (one folder per series)
    # became one failing case per series ("ser5: missing T1 (found T2)", "ser6: missing T2 (found T1)")
    for patient, study, uid in (("", "study1", "1.2.826.0.1.3680043.8.498.7"), ("a\\b", "study2", None)):
        for number, (name, description) in enumerate([("t2", "AX T2 FSE"), ("t1", "AX T1 SE")], 5):
            write_dicom_series(sitk.ReadImage(str(NATIVE / f"{name}.nii.gz")), tmp_path / study / f"ser{number}",
                               description, patient, number, study_uid=uid or "1.2.826.0.1.3680043.8.498.8")
    found = discover_cases(tmp_path, required=["T1", "T2"])
    assert found.failures == []
    # the anonymous study after its folder; the multi-valued PatientID as written, made a file name (not "['a', 'b']")
    assert sorted(case["case_id"] for case in found.cases) == ["a_b", "study1"]
    study1 = next(case for case in found.cases if case["case_id"] == "study1")
    assert study1["patient_id"] == "study1" and "ser5" in study1["T2"][0] and "ser6" in study1["T1"][0]
    from agi_monai.data.discovery import file_safe_case_id

    assert file_safe_case_id(".hidden") == "_hidden"  # a PatientID ".hidden" named hidden outputs


def test_contrasts_given_one_by_one_from_two_patients_are_refused(tmp_path):
    # before: --t1 of PATIENT-A and --t2 of PATIENT-B made one case named after A, whose DICOM output carried B's
    # identity and study
    for patient, name, description in (("PATIENT-A", "t1", "AX T1 SE"), ("PATIENT-B", "t2", "AX T2 FSE")):
        write_dicom_series(sitk.ReadImage(str(NATIVE / f"{name}.nii.gz")), tmp_path / name, description, patient)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps([{"T1": str(tmp_path / "t1"), "T2": str(tmp_path / "t2")}]))
    found = discover_cases(datalist)
    assert found.cases == [] and len(found.failures) == 1
    assert found.failures[0].reason == (
        "its DICOM series come from different patients (T1: PATIENT-A, T2: PATIENT-B) (expected every contrast of "
        "one patient: their PatientIDs differ)"
    )


def test_a_patients_series_without_a_study_uid_are_one_case(tmp_path):
    # the folder fallback is for studies with neither PatientID nor StudyInstanceUID: a named patient's series lacking
    # the study UID stay one case, named after the patient, as before
    for number, (name, description) in enumerate([("t2", "AX T2 FSE"), ("t1", "AX T1 SE")], 5):
        for file in write_dicom_series(sitk.ReadImage(str(NATIVE / f"{name}.nii.gz")), tmp_path / f"ser{number}",
                                       description, "P9", number):
            dataset = pydicom.dcmread(file)
            del dataset.StudyInstanceUID
            dataset.save_as(file)
    found = discover_cases(tmp_path, required=["T1", "T2"])
    assert [case["case_id"] for case in found.cases] == ["P9"] and found.failures == []
