"""Case discovery: file-name rules, the shipped folders, JSON datalists and the cases that get skipped."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from agi_monai.data import (
    DataError, canonical_contrast, choose_reference, discover_cases, parse_filename, patient_id, write_dicom_series
)
from helpers import DATA

SHARED = Path(__file__).parents[2] / "shared" / "data"
BRATS_GLI = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("IXI012-HH-1211-T1.nii.gz", ("IXI012-HH-1211", "T1")),
        ("IXI012-HH-1211-PD.nii.gz", ("IXI012-HH-1211", "PD")),
        ("BraTS-GLI-00001-000-t1n.nii.gz", ("BraTS-GLI-00001-000", "T1")),
        ("BraTS-GLI-00001-000-t1c.nii.gz", ("BraTS-GLI-00001-000", "T1Gd")),
        ("BraTS-GLI-00001-000-t2w.nii.gz", ("BraTS-GLI-00001-000", "T2")),
        ("BraTS-GLI-00001-000-t2f.nii.gz", ("BraTS-GLI-00001-000", "FLAIR")),
        ("BraTS-GLI-00001-000-seg.nii.gz", ("BraTS-GLI-00001-000", "seg")),
        ("BraTS20_Training_001_t1ce.nii.gz", ("BraTS20_Training_001", "T1Gd")),
        ("BraTS20_Training_001_flair.nii", ("BraTS20_Training_001", "FLAIR")),
        ("OtherEXampleFromTCIA_fla_bet.nii.gz", ("OtherEXampleFromTCIA", "FLAIR")),
        ("Flair_subtrMeanDivStd.nii.gz", ("", "FLAIR")),
        ("T1c_subtrMeanDivStd.nii.gz", ("", "T1Gd")),
        ("OTMultiClass.nii.gz", ("", "seg")),
        ("t1.nii.gz", ("", "T1")),
        ("mav.nii.gz", ("", "seg")),
        ("isen-20.nii.gz", None),
        ("brainmask.nii.gz", None),
        ("IXI002-Guys-0828-MRA.nii.gz", None),
        ("IXI012-HH-1211-T1.json", None),
        # BIDS: subject and session name the case, the suffix the contrast, ce- makes a T1w a T1Gd
        ("sub-01_T1w.nii.gz", ("sub-01", "T1")),
        ("sub-01_ses-2_acq-tse_run-1_T2w.nii.gz", ("sub-01_ses-2", "T2")),
        ("sub-01_ses-2_ce-gadolinium_T1w.nii.gz", ("sub-01_ses-2", "T1Gd")),
        ("sub-P01_rec-norm_PDw.nii.gz", ("sub-P01", "PD")),
        ("sub-01_FLAIR.nii", ("sub-01", "FLAIR")),
        ("sub-01_space-MNI152_desc-preproc_T1w.nii.gz", ("sub-01", "T1")),
        ("sub-01_T2starw.nii.gz", None),
        ("sub-01_desc-brain_mask.nii.gz", None),
        ("sub-01_dwi.nii.gz", None),
        # a contrast in two words is one contrast (before: T2_FLAIR gave a case P01_T2 holding a FLAIR, T1_CE and
        # T1+C were ignored, the warning calling them T1)
        ("P01_T2_FLAIR.nii.gz", ("P01", "FLAIR")),
        ("P01_T2-FLAIR.nii.gz", ("P01", "FLAIR")),
        ("P01_T1_post.nii.gz", ("P01", "T1Gd")),
        ("P01_T1-Gd.nii.gz", ("P01", "T1Gd")),
        ("P01_T1_CE_bet.nii.gz", ("P01", "T1Gd")),
        ("P01-t1-ce.nii.gz", ("P01", "T1Gd")),
        ("P01_T1_gad.nii.gz", ("P01", "T1Gd")),
        ("P01_T1w_ce.nii.gz", ("P01", "T1Gd")),
        ("P01_T1_KM.nii.gz", ("P01", "T1Gd")),  # Kontrastmittel
        ("P01_T1+C.nii.gz", ("P01", "T1Gd")),
        ("P01_T1C+.nii.gz", ("P01", "T1Gd")),
        ("P01_T1+.nii.gz", ("P01", "T1Gd")), ("P01-T1w+.nii.gz", ("P01", "T1Gd")),  # "+": enhanced, not a separator
        ("P01_T1_pre.nii.gz", ("P01", "T1")),
        ("T2_FLAIR.nii.gz", ("", "FLAIR")),
        # two contrasts that make none together: which is it? (before: a T2 of case P01-PD, a seg of case P01_T1)
        ("P01-PD-T2.nii.gz", ("P01-PD", "T2")),  # (read by the last contrast, with a warning: see below)
        ("P01_T1_seg.nii.gz", ("P01_T1", "seg")),
        ("P01_seg_t1.nii.gz", ("P01_seg", "T1")),
        ("P01-PD-T2_FLAIR.nii.gz", ("P01-PD", "FLAIR")),
        ("P01_T2_star.nii.gz", None),  # T2*: no contrast of ours
    ],
)
def test_filename_rules(filename, expected):
    assert parse_filename(filename) == expected


def test_aliases_contrast_names_reference_and_patients():
    assert parse_filename("sub-01_mprage.nii.gz", aliases={"mprage": "T1"}) == ("sub-01", "T1")
    assert parse_filename("P01_T1_mprage.nii.gz", aliases={"mprage": "T1"}) == ("P01", "T1")  # one contrast twice
    assert canonical_contrast("t1ce") == "T1Gd" and canonical_contrast("flair") == "FLAIR"
    with pytest.raises(DataError, match="'?dwi'?: is not a known contrast"):
        canonical_contrast("dwi")
    assert choose_reference(["T1", "PD"]) == "PD" and choose_reference(["T1", "T2", "FLAIR"]) == "T2"
    assert patient_id("BraTS-GLI-00001-001") == "BraTS-GLI-00001"
    assert patient_id("IXI012-HH-1211") == "IXI012"
    assert patient_id("aurora-example") == "aurora-example"
    assert patient_id("sub-01_ses-2") == "sub-01" and patient_id("sub-01") == "sub-01"
    assert patient_id("TCGA-FG-6692-native") == "TCGA-FG-6692" and patient_id("LGG_TCGA-FG-6692") == "TCGA-FG-6692"
    assert patient_id("OtherEXampleFromTCIA", "TCGA-FG-6692") == "TCGA-FG-6692"  # the case's folder names it
    assert patient_id("IXI012-HH-1211", "TCGA-FG-6692") == "IXI012" and patient_id("P01", "site1") == "P01"


def test_discovery_of_the_shipped_folders():
    discovery = discover_cases(DATA)
    cases = {case["case_id"]: case for case in discovery.cases}
    assert discovery.failures == []
    contrasts = {
        case_id: sorted(k for k in case if k not in ("case_id", "patient_id")) for case_id, case in cases.items()
    }
    assert contrasts == {
        "BraTS-GLI-00001-000": ["FLAIR", "T1", "T1Gd", "T2"],
        "IXI901-SIM-0001": ["PD", "T1", "T2"],
        "OtherEXampleFromTCIA": ["FLAIR", "T1", "T1Gd", "T2", "seg"],  # mav.nii.gz joins its folder's case
        "TCGA-FG-6692-native": ["FLAIR", "T1", "T1Gd", "T2"],
        "aurora-example": ["FLAIR", "T1", "T1Gd", "T2"],
    }
    assert cases["BraTS-GLI-00001-000"]["T1Gd"].endswith("BraTS-GLI-00001-000-t1c.nii.gz")
    assert cases["BraTS-GLI-00001-000"]["patient_id"] == "BraTS-GLI-00001"
    assert cases["IXI901-SIM-0001"]["patient_id"] == "IXI901"
    # one subject twice (native scans, and BraTS-Toolkit's outputs named OtherEXampleFromTCIA_* in its barcode's
    # folder): one patient, which a split keeps together (before: patients "OtherEXampleFromTCIA" and
    # "TCGA-FG-6692-native", in different splits for most seeds)
    assert cases["OtherEXampleFromTCIA"]["patient_id"] == cases["TCGA-FG-6692-native"]["patient_id"] == "TCGA-FG-6692"
    assert cases["aurora-example"]["patient_id"] == "aurora-example"


def test_missing_contrast_is_reported_by_name_and_skipped():
    discovery = discover_cases(DATA, required=["T1", "T2", "PD"])
    assert [case["case_id"] for case in discovery.cases] == ["IXI901-SIM-0001"]
    reasons = {failure.case_id: failure.reason for failure in discovery.failures}
    assert reasons["aurora-example"] == "missing PD (found FLAIR, T1, T1Gd, T2)"
    assert len(reasons) == 4
    assert "4 skipped" in discovery.summary().splitlines()[0]


def test_official_ixi_layout_and_duplicate_case_ids(tmp_path):
    ixi = DATA / "ixi-sim"
    for contrast in ("T1", "T2", "PD"):
        (tmp_path / f"IXI-{contrast}").mkdir()
        shutil.copy(
            ixi / f"IXI901-SIM-0001-{contrast}.nii.gz",
            tmp_path / f"IXI-{contrast}" / f"IXI012-HH-1211-{contrast}.nii.gz",
        )
    # the same subject's T1 a second time, in another folder: its case ID is no longer unique
    (tmp_path / "extra").mkdir()
    shutil.copy(ixi / "IXI901-SIM-0001-T1.nii.gz", tmp_path / "extra" / "IXI012-HH-1211-T1.nii.gz")
    shutil.copy(ixi / "IXI901-SIM-0001-T2.nii.gz", tmp_path / "IXI-T2" / "IXI013-HH-1212-T2.nii.gz")
    discovery = discover_cases(tmp_path, required=["T2"])
    assert [case["case_id"] for case in discovery.cases] == ["IXI013-HH-1212"]
    (failure,) = discovery.failures
    assert failure.case_id == "IXI012-HH-1211"
    assert failure.reason.startswith("duplicate case ID, several files for one contrast: T1 in ")
    assert "extra/IXI012-HH-1211-T1.nii.gz" in failure.reason and "IXI-T1/IXI012-HH-1211-T1.nii.gz" in failure.reason


def test_a_bids_dataset_gives_one_case_per_subject_and_session_and_skips_its_derivatives(tmp_path):
    # before: acq-/run-/ce- entities were part of the case ID (T1w and T2w of one session in two cases, the
    # ce-gadolinium T1w taken for a T1), and derivatives/ and sourcedata/ gave second copies of every subject
    root = tmp_path / "bids"
    (root / "dataset_description.json").parent.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')
    files = {  # each a link to a shipped image of that contrast (discovery reads names only)
        "sub-01/ses-1/anat/sub-01_ses-1_acq-mprage_T1w.nii.gz": "t1n",
        "sub-01/ses-1/anat/sub-01_ses-1_acq-mprage_ce-gadolinium_T1w.nii.gz": "t1c",
        "sub-01/ses-1/anat/sub-01_ses-1_acq-tse_run-1_T2w.nii.gz": "t2w",
        "sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz": "t2f",
        "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz": "t1n",
        "sub-01/ses-2/anat/sub-01_ses-2_T2w.nii.gz": "t2w",
        "sub-02/anat/sub-02_T1w.nii.gz": "t1n",
        "sub-02/anat/sub-02_T2w.nii.gz": "t2w",
        "derivatives/fmriprep/sub-02/anat/sub-02_desc-preproc_T1w.nii.gz": "t1n",
    }
    for name, contrast in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(BRATS_GLI / f"BraTS-GLI-00001-000-{contrast}.nii.gz")
    (root / "derivatives" / "fmriprep" / "dataset_description.json").write_text('{"Name": "fmriprep"}')
    image = sitk.ReadImage(str(DATA / "tcga-lgg" / "TCGA-FG-6692-native" / "t2.nii.gz"))
    write_dicom_series(image, root / "sourcedata" / "sub-02" / "dicom", "AX T2 FSE", "sub-02")  # the scanner's export
    discovery = discover_cases(root)
    assert discovery.failures == []
    found = {case["case_id"]: sorted(k for k in case if k not in ("case_id", "patient_id")) for case in discovery.cases}
    assert found == {"sub-01_ses-1": ["FLAIR", "T1", "T1Gd", "T2"], "sub-01_ses-2": ["T1", "T2"], "sub-02": ["T1", "T2"]}
    assert [case["patient_id"] for case in discovery.cases] == ["sub-01", "sub-01", "sub-02"]  # sessions: one patient
    assert discovery.cases[2]["T1"] == str(root / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    # pointed at a derivatives dataset, discovery searches it
    (case,) = discover_cases(root / "derivatives" / "fmriprep").cases
    assert case["case_id"] == "sub-02" and case["T1"].endswith("sub-02_desc-preproc_T1w.nii.gz")


def test_nifti_files_naming_no_contrast_are_counted_and_a_misnamed_one_is_named(tmp_path, caplog):
    # before: left out without a word, so a user could not tell why P01's T2 was "missing"
    folder = tmp_path / "P01"
    folder.mkdir()
    for name, contrast in [("P01-t1.nii.gz", "t1n"), ("P01_T2_TSE_AX.nii.gz", "t2w"), ("brainmask.nii.gz", "t1n"),
                           ("sub-01_mod-T1w_defacemask.nii.gz", "t1n")]:  # BIDS: the suffix decides, no warning
        (folder / name).symlink_to(BRATS_GLI / f"BraTS-GLI-00001-000-{contrast}.nii.gz")
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING", logger="agi_monai.data.discovery"):
        discovery = discover_cases(tmp_path, required=["T1", "T2"])
    assert discovery.ignored == [str(folder / n) for n in ("P01_T2_TSE_AX.nii.gz", "brainmask.nii.gz",
                                                           "sub-01_mod-T1w_defacemask.nii.gz")]
    assert discovery.summary().splitlines()[0] == (
        f"0 cases found, 1 skipped, 3 NIfTI files ignored, their names ending in no one contrast "
        f"({folder / 'P01_T2_TSE_AX.nii.gz'}, {folder / 'brainmask.nii.gz'}, {folder / 'sub-01_mod-T1w_defacemask.nii.gz'})"
    )
    warnings = [r.getMessage() for r in caplog.records if "ignored, although" in r.getMessage()]
    assert warnings == [f"{folder / 'P01_T2_TSE_AX.nii.gz'}: ignored, although its name holds T2: the contrast must end "
                        "the name (expected <case>-<contrast>.nii.gz, e.g. P01-T2.nii.gz if it is the T2 image: rename "
                        "or link the file, or list the case in a JSON datalist)"]


def test_contrasts_in_two_words_are_read_and_two_contrasts_at_a_names_end_are_named(tmp_path, caplog):
    # before: P01_T2_FLAIR.nii.gz made a case "P01_T2" holding a FLAIR (and P01 had none), P01_T1_CE was ignored
    # with "its name holds T1 ... e.g. P01-T2.nii.gz" (renamed, a T1Gd became a T1 or a T2), P01_T1+C was dropped
    # without a word; P01-PD-T2 made a case "P01-PD" holding a T2 without a word (it still does, as case IDs such as
    # "missing-t2" need, but with a warning)
    folder = tmp_path / "P01"
    folder.mkdir()
    files = {"P01_T1.nii.gz": "t1n", "P01_T2.nii.gz": "t2w", "P01_T2_FLAIR.nii.gz": "t2f", "P01_T1+C.nii.gz": "t1c",
             "P01_T1_CE_AX.nii.gz": "t1c", "P01_T2_star_AX.nii.gz": "t2w"}
    (tmp_path / "P02").mkdir()
    (tmp_path / "P02" / "P02-PD-T2.nii.gz").symlink_to(BRATS_GLI / "BraTS-GLI-00001-000-t2w.nii.gz")
    for name, contrast in files.items():
        (folder / name).symlink_to(BRATS_GLI / f"BraTS-GLI-00001-000-{contrast}.nii.gz")
    with caplog.at_level("WARNING", logger="agi_monai.data.discovery"):
        discovery = discover_cases(tmp_path, required=["T1", "T2", "FLAIR", "T1Gd"])
    assert [failure.case_id for failure in discovery.failures] == ["P02-PD"]  # a T2 only
    (case,) = discovery.cases
    assert case["case_id"] == "P01" and case["FLAIR"] == str(folder / "P01_T2_FLAIR.nii.gz")
    assert case["T1Gd"] == str(folder / "P01_T1+C.nii.gz")
    assert sorted(Path(path).name for path in discovery.ignored) == ["P01_T1_CE_AX.nii.gz", "P01_T2_star_AX.nii.gz"]
    assert sorted(m for m in caplog.messages if not m.startswith("skipped")) == [
        f"{folder / 'P01_T1_CE_AX.nii.gz'}: ignored, although its name holds T1Gd: the contrast must end the name "
        "(expected <case>-<contrast>.nii.gz, e.g. P01-T1Gd.nii.gz if it is the T1Gd image: rename or link the file, or "
        "list the case in a JSON datalist)",
        f"{tmp_path / 'P02' / 'P02-PD-T2.nii.gz'}: read as the T2 of case P02-PD, though its name ends in two "
        "contrasts, PD then T2, that name no one contrast together (if it is not, rename or link the file, or list "
        "the case in a JSON datalist)",
    ]  # and none for the T2* (P01_T2_star_AX): no contrast of ours, not to be renamed to a T2


def test_hidden_files_and_folders_are_not_read_as_cases_and_are_counted(tmp_path):
    # what a Mac leaves on a copied dataset: an AppleDouble "._<name>" file beside every image, .DS_Store; and a
    # trash folder or a file server's snapshot holding second copies. Before: ._BraTS-GLI-00001-000-t1n.nii.gz made
    # a case "._BraTS-GLI-00001-000"; in aurora-example (files named by contrast only) ._t1.nii.gz made "." the
    # folder's one prefixed case, which t1.nii.gz then joined too (a duplicate T1); the copies made every real case
    # a "duplicate case ID"
    apple_double = b"\x00\x05\x16\x07AppleDouble"
    gli = tmp_path / "BraTS-GLI-00001-000"
    aurora = tmp_path / "aurora-example"
    gli.mkdir()
    aurora.mkdir()
    for image in sorted(BRATS_GLI.iterdir()):
        (gli / image.name).symlink_to(image)
        (gli / f"._{image.name}").write_bytes(apple_double)
    for image in sorted((DATA / "brats2023-mets" / "aurora-example").iterdir()):
        (aurora / image.name).symlink_to(image)
        (aurora / f"._{image.name}").write_bytes(apple_double)
    (tmp_path / ".DS_Store").write_bytes(b"Bud1")
    (tmp_path / ".Trash-1000" / "files").mkdir(parents=True)
    (tmp_path / ".Trash-1000" / "files" / "BraTS-GLI-00001-000").symlink_to(gli, target_is_directory=True)
    (tmp_path / "aurora-example" / ".snapshot").symlink_to(aurora, target_is_directory=True)
    discovery = discover_cases(tmp_path, required=["T1", "T2", "FLAIR", "T1Gd"])
    assert [case["case_id"] for case in discovery.cases] == ["BraTS-GLI-00001-000", "aurora-example"]
    assert discovery.failures == [] and discovery.ignored == []
    assert discovery.cases[1]["T1"] == str(aurora / "t1.nii.gz")
    assert discovery.hidden == [str(tmp_path / ".DS_Store"), str(tmp_path / ".Trash-1000"),
                                *(str(gli / f"._{image.name}") for image in sorted(BRATS_GLI.iterdir())),
                                str(aurora / "._flair.nii.gz"), str(aurora / "._t1.nii.gz"), str(aurora / "._t1c.nii.gz"),
                                str(aurora / "._t2.nii.gz"), str(aurora / ".snapshot")]
    assert discovery.summary().splitlines()[0] == (
        f"2 cases found, 0 skipped, 11 hidden files or folders ignored ({tmp_path / '.DS_Store'}, "
        f"{tmp_path / '.Trash-1000'}, {gli / '._BraTS-GLI-00001-000-t1c.nii.gz'}, ...)")


def test_image_files_of_other_formats_are_counted_and_named(tmp_path, caplog):
    # the BRATS 2015 download (MetaImage .mha, one folder per image): before, "0 cases found" and not a word on why
    root = tmp_path / "BRATS2015_Training"
    expected = []
    for number, (name, token) in enumerate([("MR_Flair", "t2f"), ("MR_T1", "t1n"), ("MR_T1c", "t1c"), ("MR_T2", "t2w")]):
        stem = f"VSD.Brain.XX.O.{name}.{54501 + number}"
        (root / "HGG" / "brats_2013_pat0001_1" / stem).mkdir(parents=True)
        image = sitk.ReadImage(str(BRATS_GLI / f"BraTS-GLI-00001-000-{token}.nii.gz"))[:, :, 70:72]
        sitk.WriteImage(image, str(root / "HGG" / "brats_2013_pat0001_1" / stem / f"{stem}.mha"))
        expected.append(str(root / "HGG" / "brats_2013_pat0001_1" / stem / f"{stem}.mha"))
    sitk.WriteImage(image, str(tmp_path / "P02-T2.nrrd"))
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING", logger="agi_monai.data.discovery"):
        discovery = discover_cases(tmp_path)
    assert discovery.cases == [] and discovery.failures == [] and discovery.ignored == []
    assert discovery.other_formats == [str(tmp_path / "P02-T2.nrrd"), *expected]
    assert discovery.summary(tmp_path) == (
        f"0 cases found in {tmp_path}, 0 skipped, 5 image files ignored, of formats not read ({tmp_path / 'P02-T2.nrrd'}, "
        f"{expected[0]}, {expected[1]}, ...; expected NIfTI (.nii, .nii.gz) or DICOM: convert them, e.g. with SimpleITK)")
    assert caplog.messages == [
        f"{tmp_path}: 5 image files ignored, of formats not read ({tmp_path / 'P02-T2.nrrd'}, {expected[0]}, "
        f"{expected[1]}, ...; expected NIfTI (.nii, .nii.gz) or DICOM: convert them, e.g. with SimpleITK)"]


def test_validation_skips_bad_volumes_and_goes_on(tmp_path):
    for case_id in ("good", "truncated", "fake"):
        (tmp_path / case_id).mkdir()
        for name in ("t1n", "t2w"):
            shutil.copy(
                BRATS_GLI / f"BraTS-GLI-00001-000-{name}.nii.gz", tmp_path / case_id / f"{case_id}-{name}.nii.gz"
            )
    truncated = tmp_path / "truncated" / "truncated-t2w.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:200_000])
    (tmp_path / "fake" / "fake-t1n.nii.gz").write_bytes(gzip.compress(b"not an image" * 100))
    discovery = discover_cases(tmp_path, required=["T1", "T2"], validate=True)
    assert [case["case_id"] for case in discovery.cases] == ["good"]
    reasons = {failure.case_id: failure.reason for failure in discovery.failures}
    assert "truncated-t2w.nii.gz: is truncated or its compressed data is corrupt" in reasons["truncated"]
    assert "fake-t1n.nii.gz: is not a NIfTI file" in reasons["fake"]


def test_explicit_json_datalist(tmp_path):
    datalist = {
        "training": [
            {
                "case_id": "gli",
                "t1": str(BRATS_GLI / "BraTS-GLI-00001-000-t1n.nii.gz"),
                "T2": str(BRATS_GLI / "BraTS-GLI-00001-000-t2w.nii.gz"),
            },
            {"case_id": "bad", "T1": "a.nii.gz", "dwi": "b.nii.gz"},
        ],
        "test": [{"flair": "relative/x-t2f.nii.gz", "T1": "relative/x-t1n.nii.gz"}],
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    training = discover_cases(path, required=["T1"], split="training")
    assert [case["case_id"] for case in training.cases] == ["gli"]
    assert training.cases[0]["T1"].endswith("-t1n.nii.gz") and training.cases[0]["patient_id"] == "gli"
    assert training.failures[0].case_id == "bad" and "dwi: is not a known contrast" in training.failures[0].reason
    (test_case,) = discover_cases(path, split="test").cases
    assert test_case["case_id"] == "x" and test_case["FLAIR"] == str(tmp_path / "relative" / "x-t2f.nii.gz")
    with pytest.raises(DataError, match="has no 'validation' list"):
        discover_cases(path, split="validation")
    (tmp_path / "empty.json").write_text("{}")  # before: "has no 'training' list (keys: )"
    with pytest.raises(DataError, match=r"empty.json: has no 'training' list \(an empty JSON object\)"):
        discover_cases(tmp_path / "empty.json", split="training")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match="broken.json: cannot be read as JSON"):
        discover_cases(tmp_path / "broken.json")
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "nowhere")


def test_a_case_listed_in_two_splits_is_read_once_and_named(tmp_path, caplog):
    # before: read over every split (synthesis), the case failed as "duplicate case ID, several files for one
    # contrast: T1 in a, a" (the same file twice)
    gli = {"case_id": "gli", "T1": str(BRATS_GLI / "BraTS-GLI-00001-000-t1n.nii.gz"),
           "T2": str(BRATS_GLI / "BraTS-GLI-00001-000-t2w.nii.gz")}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [gli], "validation": [gli], "test": [{**gli, "T2": gli["T1"]}]}))
    with caplog.at_level("WARNING", logger="agi_monai.data.discovery"):
        discovery = discover_cases(path, split="training")
        assert [case["case_id"] for case in discovery.cases] == ["gli"] and not caplog.records
        discovery = discover_cases(path)
    assert discovery.cases == [] and [f.case_id for f in discovery.failures] == ["gli"]  # other files under one ID
    assert discovery.failures[0].reason == ("duplicate case ID, several files for one contrast: "
                                            f"T1 in {gli['T1']}, {gli['T1']}; T2 in {gli['T2']}, {gli['T1']}")
    assert caplog.messages[0] == (f"{path}: case gli is listed in 'training' and in 'validation' with the same files "
                                  "(read once; a case in two splits is in both the training and the evaluation data)")
    path.write_text(json.dumps({"training": [gli], "test": [gli]}))
    assert [case["T2"] for case in discover_cases(path).cases] == [gli["T2"]]


def test_a_duplicate_dicom_series_is_named_by_its_folder_not_every_file(tmp_path):
    # before: the message listed every file of the series (1377 characters for 26 slices)
    import SimpleITK as sitk

    from agi_monai.data import write_dicom_series

    volume = sitk.ReadImage(str(BRATS_GLI / "BraTS-GLI-00001-000-t2f.nii.gz"))[:, :, 70:76]
    write_dicom_series(volume, tmp_path / "P01" / "flair", "AX FLAIR", "P01", 3)
    sitk.WriteImage(volume, str(tmp_path / "P01-FLAIR.nii.gz"))  # the same series converted beside it
    (failure,) = discover_cases(tmp_path).failures
    assert failure.reason == (f"duplicate case ID, several files for one contrast: FLAIR in {tmp_path / 'P01-FLAIR.nii.gz'}, "
                              f"{tmp_path / 'P01' / 'flair'} (6 DICOM files)")


def test_a_case_naming_one_image_for_two_contrasts_is_skipped_and_named(tmp_path):
    # a path pasted twice (--t1 a --t2 a, or a datalist) gave a plausible synthesis from one contrast
    t1, t2 = (DATA / "ixi-sim" / f"IXI901-SIM-0001-{c}.nii.gz" for c in ("T1", "T2"))
    link = tmp_path / "link-to-t1.nii.gz"
    link.symlink_to(t1)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps([
        {"case_id": "same", "T1": str(t1), "T2": str(t1)},
        {"case_id": "linked", "T1": str(t1), "T2": str(link)},
        {"case_id": "fine", "T1": str(t1), "T2": str(t2)},
    ]))
    discovery = discover_cases(datalist, required=["T1", "T2"])
    assert [case["case_id"] for case in discovery.cases] == ["fine"]
    assert [str(failure) for failure in discovery.failures] == [
        f"linked: T1 and T2 are the same image: {link} (expected a different image for each contrast)",
        f"same: T1 and T2 are the same image: {t1} (expected a different image for each contrast)",
    ]
    # two echoes of the same enhanced DICOM files are two images
    files = [str(t1)]
    datalist.write_text(json.dumps([{"case_id": "echoes", "PD": {"files": files, "echo_time": 15.0},
                                     "T2": {"files": files, "echo_time": 100.0}}]))
    assert not discover_cases(datalist).failures


def test_a_datalist_case_of_dicom_series_without_an_id_is_named_by_its_patient(tmp_path):
    # as discovery names a folder's DICOM cases, and as `synthesize --t1 <series> --t2 <series>` writes such a case
    # (before: after the series folders' parent, or "datalist-0000" for file lists)
    import SimpleITK as sitk

    from agi_monai.data import write_dicom_series

    volume = sitk.ReadImage(str(BRATS_GLI / "BraTS-GLI-00001-000-t2w.nii.gz"))[:, :, 70:74]
    for number, name in enumerate(("t1", "t2"), 1):
        write_dicom_series(volume, tmp_path / "export" / name, f"AX {name.upper()}", "TCGA-FG-6692", number)
    folders = {"T1": str(tmp_path / "export" / "t1"), "T2": str(tmp_path / "export" / "t2")}
    files = {c: sorted(str(f) for f in Path(folder).iterdir()) for c, folder in folders.items()}
    for entries in (folders, files):
        (tmp_path / "datalist.json").write_text(json.dumps([entries]))
        (case,) = discover_cases(tmp_path / "datalist.json").cases
        assert case["case_id"] == "TCGA-FG-6692"


def test_linked_case_folders_are_found_and_a_link_loop_ends(tmp_path):
    # a dataset folder of links to a shared store (common on clusters): before, os.walk skipped linked folders and
    # their cases were left out without a word
    store, dataset = tmp_path / "store", tmp_path / "dataset"
    for case in ("A", "B"):
        (store / case).mkdir(parents=True)
        for name in ("t1n", "t2w"):
            (store / case / f"{case}-{name}.nii.gz").symlink_to(BRATS_GLI / f"BraTS-GLI-00001-000-{name}.nii.gz")
    (dataset / "A").mkdir(parents=True)
    for file in (store / "A").iterdir():
        (dataset / "A" / file.name).symlink_to(file)
    (dataset / "B").symlink_to(store / "B", target_is_directory=True)  # a linked case folder
    (dataset / "B" / "loop").symlink_to(dataset, target_is_directory=True)  # a link back up: entered once only
    discovery = discover_cases(dataset, required=["T1", "T2"])
    assert [case["case_id"] for case in discovery.cases] == ["A", "B"] and discovery.failures == []
    assert discovery.cases[1]["T1"] == str(dataset / "B" / "B-t1n.nii.gz")


def test_case_ids_that_are_not_file_names_become_one(tmp_path, caplog):
    # outputs are named <case_id>_<target>.nii.gz: a "/" would put them in another folder (and two cases' outputs
    # in one file); DICOM PatientIDs and datalist IDs can hold one
    import SimpleITK as sitk

    from agi_monai.data import write_dicom_series

    volume = sitk.ReadImage(str(BRATS_GLI / "BraTS-GLI-00001-000-t2w.nii.gz"))[:, :, 70:74]
    study = tmp_path / "dicom"
    for number, description in enumerate(["AX T1 SE", "AX T2 FSE"], 1):
        write_dicom_series(volume, study / description.replace(" ", "_"), description, "MRN/0042", number, study_uid="1.2.3")
    with caplog.at_level("WARNING"):
        (case,) = discover_cases(study, required=["T1", "T2"]).cases
    assert case["case_id"] == "MRN_0042" and case["patient_id"] == "MRN/0042"
    assert "case ID 'MRN/0042' is not a file name; its outputs are named after 'MRN_0042'" in caplog.messages

    t1, t2 = (str(BRATS_GLI / f"BraTS-GLI-00001-000-{name}.nii.gz") for name in ("t1n", "t2w"))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps([
        {"case_id": "site1/P01", "T1": t1, "T2": t2},
        {"case_id": "site1_P01", "T1": t1, "T2": t2},  # the same file name once the "/" is replaced: both reported
        {"case_id": "site2\\P02", "T1": t1, "T2": t2},
        {"case_id": "..", "T1": t1, "T2": t2},
    ]))
    discovery = discover_cases(datalist, required=["T1", "T2"])
    assert [case["case_id"] for case in discovery.cases] == ["__", "site2_P02"]
    (failure,) = discovery.failures
    assert failure.case_id == "site1_P01" and failure.reason.startswith("duplicate case ID, several files for one contrast")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside this clone")
@pytest.mark.parametrize(
    "folder, case_count, contrasts",
    [
        ("brats2023-gli", 1, {"T1", "T2", "FLAIR", "T1Gd"}),
        ("brats2023-mets", 1, {"T1", "T2", "FLAIR", "T1Gd"}),
        ("tcga-lgg", 2, {"T1", "T2", "FLAIR", "T1Gd"}),
        ("brats2015-deepmedic", 4, {"FLAIR", "T1Gd", "seg"}),
        ("ixi-sim", 3, {"T1", "T2", "PD"}),
    ],
)
def test_discovery_of_every_shared_folder(folder, case_count, contrasts):
    discovery = discover_cases(SHARED / folder, required=sorted(contrasts))
    assert len(discovery.cases) == case_count and discovery.failures == []


def test_a_synthesized_nifti_beside_the_acquired_images_is_not_an_input(tmp_path):
    # before: an earlier synthesis's FLAIR kept in the case folder was read as an acquired FLAIR, chose the 3-to-1
    # bundle, and the new output's description hid that one of its inputs was synthetic
    import nibabel as nib

    case = tmp_path / "GLI1"
    case.mkdir()
    for token in ("t1n", "t2w"):
        shutil.copy(BRATS_GLI / f"BraTS-GLI-00001-000-{token}.nii.gz", case / f"GLI1-{token}.nii.gz")
    flair = nib.load(BRATS_GLI / "BraTS-GLI-00001-000-t2f.nii.gz")
    flair.header["descrip"] = b"SYNTHETIC FLAIR from T1,T2 by brats_t1_t2_to_flair"
    nib.save(flair, case / "GLI1_FLAIR.nii.gz")
    found = discover_cases(tmp_path)
    (only,) = found.cases
    assert {key for key in only if key in ("T1", "T2", "FLAIR")} == {"T1", "T2"}
    assert found.synthetic == [str(case / "GLI1_FLAIR.nii.gz")]
    assert "1 synthesized NIfTI files not used as inputs" in found.summary()
    flair.header["descrip"] = b"acquired"  # the same image, not marked: an input
    nib.save(flair, case / "GLI1_FLAIR.nii.gz")
    assert "FLAIR" in discover_cases(tmp_path).cases[0]
