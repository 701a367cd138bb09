"""Patient-level splits: deterministic, disjoint, the requested sizes; the preparation scripts on
download-like folders with bad cases."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import agi_monai.data.splits as splits_module
from agi_monai.data import DataError, discover_cases, preparation_summary, prepare_datalist, split_cases, write_datalist
from helpers import DATA, REPO



def _cases(patients: int, timepoints: int = 1) -> list[dict]:
    return [
        {"case_id": f"BraTS-GLI-{p:05d}-{t:03d}", "patient_id": f"BraTS-GLI-{p:05d}", "T1": f"{p}-{t}.nii.gz"}
        for p in range(patients)
        for t in range(timepoints)
    ]


def _patients(cases: list[dict]) -> set[str]:
    return {case["patient_id"] for case in cases}


def test_paper_sizes_deterministic_and_patient_disjoint():
    cases = _cases(600, timepoints=2)
    splits = split_cases(cases, (500, 40, 40), seed=0)
    assert [len(_patients(splits[name])) for name in ("training", "validation", "test")] == [500, 40, 40]
    assert len(splits["training"]) == 1000  # both time points of a patient stay together
    training, validation, test = (_patients(splits[name]) for name in ("training", "validation", "test"))
    assert not (training & validation or training & test or validation & test)
    shuffled_input = split_cases(list(reversed(cases)), (500, 40, 40), seed=0)
    assert all(
        _patients(shuffled_input[name]) == _patients(splits[name]) for name in splits
    )  # input order is irrelevant
    assert _patients(split_cases(cases, (500, 40, 40), seed=1)["test"]) != test


def test_fractions_and_too_few_patients():
    splits = split_cases(_cases(10), (0.8, 0.1, 0.1))
    assert [len(splits[name]) for name in ("training", "validation", "test")] == [8, 1, 1]
    with pytest.raises(DataError, match=r"asks for 577 patients \[500, 37, 40\] but only 10 have every contrast"):
        split_cases(_cases(10), (500, 37, 40))
    with pytest.raises(ValueError, match="as fractions they sum to 0.7, not 1"):
        split_cases(_cases(10), (0.5, 0.1, 0.1))


@pytest.mark.parametrize(
    "sizes, problem",
    [
        ((0.7, 0.2, 0.2), "0.7,0.2,0.2: not whole numbers, and as fractions they sum to 1.1, not 1"),  # was 0/0/0
        ((-3, 10, 10), "-3,10,10: holds a negative number"),  # was 10 patients in both training and test
        ((1.2, -0.1, -0.1), "1.2,-0.1,-0.1: holds a negative number"),  # was 3 of 3 in training, -0 and -0
        ((20, 5.5, 2), "20,5.5,2: not whole numbers, and as fractions they sum to 27.5, not 1"),  # was 20/5/2
        ((0.7, 0.2), "0.7,0.2: not 3 numbers (training, validation, test)"),
        ((0, 0, 0), "0,0,0: all 0"),
        ("abc", "'abc': not 3 numbers (training, validation, test)"),
        ((True, False, False), "True,False,False: not 3 numbers (training, validation, test)"),
    ],
)
def test_sizes_that_are_neither_fractions_nor_counts_are_refused(sizes, problem):
    with pytest.raises(ValueError) as raised:
        split_cases(_cases(30), sizes)
    assert str(raised.value).startswith(f"sizes {problem}; expected three numbers >= 0, either fractions summing to 1")


def test_fractions_never_deal_out_more_patients_than_there_are():
    sizes = {size: [len(cases) for cases in split_cases(_cases(3), size).values()]
             for size in [(0, 0.5, 0.5), (1, 0, 0), (0.0, 0.0, 1.0), (2.0, 1, 0)]}
    # (0, 0.5, 0.5): both halves of 3 rounded up gave -1 training patients; (1, 0, 0) sums to 1: every patient trains
    assert sizes == {(0, 0.5, 0.5): [0, 2, 1], (1, 0, 0): [3, 0, 0], (0.0, 0.0, 1.0): [0, 0, 3], (2.0, 1, 0): [2, 1, 0]}


def test_written_datalist_reads_back_with_relative_paths(tmp_path):
    shutil.copytree(DATA / "brats2023-gli", tmp_path / "brats" / "gli")
    shutil.copytree(DATA / "tcga-lgg", tmp_path / "brats" / "tcga")
    cases = discover_cases(tmp_path / "brats", required=["T1", "T2", "FLAIR", "T1Gd"]).cases
    cases.append(discover_cases(DATA / "brats2023-mets").cases[0])  # outside the datalist's folder
    splits = split_cases(cases, (1, 1, 1), seed=0)  # 3 patients: the two TCGA cases are one (its barcode)
    path = write_datalist(splits, tmp_path / "brats" / "datalist.json", {"seed": 0})
    content = json.loads(path.read_text(encoding="utf-8"))
    assert content["_info"] == {"seed": 0} and not list(path.parent.glob(".tmp-*"))
    written = {case["case_id"]: case["T1"] for split in content.values() if isinstance(split, list) for case in split}
    assert written["BraTS-GLI-00001-000"] == "gli/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz"
    assert written["aurora-example"] == str(DATA / "brats2023-mets" / "aurora-example" / "t1.nii.gz")
    for name, split in splits.items():
        assert discover_cases(path, split=name).cases == sorted(split, key=lambda case: case["case_id"])


def _volume(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(
        nib.Nifti1Image(np.random.default_rng(seed).integers(0, 1000, (6, 6, 6)).astype(np.int16), np.eye(4)), path
    )


def _run(script: str, *arguments: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *arguments],
        capture_output=True,
        encoding="utf-8",
        check=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"},
    )
    return result.stdout


def test_prepare_ixi_on_an_official_layout(tmp_path):
    root = tmp_path / "IXI"
    for subject in range(12):
        for contrast in ("T1", "T2", "PD"):
            if subject == 3 and contrast == "PD":
                continue  # no PD for this subject
            _volume(root / f"IXI-{contrast}" / f"IXI{subject:03d}-Guys-{subject:04d}-{contrast}.nii.gz", subject)
    (root / "IXI-T2" / "IXI005-Guys-0005-T2.nii.gz").write_text("not an image")
    output = tmp_path / "ixi.json"
    stdout = _run("prepare_ixi.py", "--root", str(root), "--output", str(output), "--sizes", "6,2,2", "--seed", "3")
    assert "IXI003-Guys-0003: missing PD (found T1, T2)" in stdout
    assert "IXI005-Guys-0005: " in stdout and "IXI005-Guys-0005-T2.nii.gz: is not a NIfTI file" in stdout
    assert (
        stdout.strip().splitlines()[-1] == f"{output}: 6/2/2 training/validation/test subjects of 10 usable, 2 skipped"
    )
    content = json.loads(output.read_text(encoding="utf-8"))
    assert content["_info"]["cases_found"] == 10 and len(content["_info"]["skipped"]) == 2
    assert _run(
        "prepare_ixi.py",
        "--root",
        str(root),
        "--output",
        str(output),  # preparing again replaces the datalist
        "--sizes",
        "6,2,2",
        "--seed",
        "3",
    )
    assert json.loads(output.read_text(encoding="utf-8"))["test"] == content["test"]
    # the paper's sizes need 577 subjects: one line and exit status 2, no traceback, no file
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_ixi.py"), "--root", str(root), "--output", str(tmp_path / "x")],
        capture_output=True, encoding="utf-8", cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (  # 11: known before reading a volume (IXI005's is bad)
        "prepare_ixi.py: error: split: asks for 577 patients [500, 37, 40] but only 11 have every contrast "
        "(expected at least 577)"
    )
    assert "checking volumes" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_prepare_brats_keeps_time_points_together(tmp_path):
    root = tmp_path / "BraTS2023"
    for patient in range(6):
        for timepoint in range(2 if patient < 2 else 1):
            case = f"BraTS-GLI-{patient:05d}-{timepoint:03d}"
            for token in ("t1n", "t1c", "t2w", "t2f", "seg"):
                _volume(root / case / f"{case}-{token}.nii.gz", patient)
    output = tmp_path / "brats.json"
    stdout = _run(
        "prepare_brats.py", "--root", str(root), "--output", str(output), "--sizes", "4,1,1", "--validate", "False"
    )
    assert stdout.strip().startswith(f"{output}: ") and stdout.strip().endswith(
        "training/validation/test cases of 8 usable, 0 skipped"
    )
    content = json.loads(output.read_text(encoding="utf-8"))
    patients = [{case["patient_id"] for case in content[name]} for name in ("training", "validation", "test")]
    assert [len(p) for p in patients] == [4, 1, 1] and not (patients[0] & patients[1] or patients[0] & patients[2])
    assert set(content["training"][0]) == {"case_id", "patient_id", "T1", "T1Gd", "T2", "FLAIR", "seg"}


def _brats_layout(root: Path, patients: int) -> Path:
    for patient in range(patients):
        case = f"BraTS-GLI-{patient:05d}-000"
        for token in ("t1n", "t1c", "t2w", "t2f"):
            _volume(root / case / f"{case}-{token}.nii.gz", patient)
    return root


def _run_failing(script: str, *arguments: str) -> subprocess.CompletedProcess:
    """The script run as :func:`_run` runs it, expected to refuse its arguments: exit status 2, no traceback."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *arguments], capture_output=True, encoding="utf-8", cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def no_volume_read(monkeypatch):
    """prepare_datalist with discovery and the reading of volumes replaced by failures: what is refused with them never
    gets that far. ``discover`` lets discovery run."""

    def never(*args, **kwargs):
        raise AssertionError("reached")

    monkeypatch.setattr(splits_module, "validate_cases", never)
    monkeypatch.setattr(splits_module, "discover_cases", never)
    return lambda: monkeypatch.setattr(splits_module, "discover_cases", discover_cases)


def test_arguments_and_output_are_refused_before_any_volume_is_read(tmp_path, no_volume_read):
    # before: every volume was read first (31 min for BraTS), then "sizes needs 3 numbers", or a traceback for an
    # output that is a folder (IsADirectoryError) or below a file (FileExistsError)
    root = _brats_layout(tmp_path / "brats", 3)
    contrasts = ("T1", "T2", "FLAIR", "T1Gd")
    with pytest.raises(ValueError, match=r"^sizes 0.7,0.2: not 3 numbers"):
        prepare_datalist(root, tmp_path / "a.json", contrasts, (0.7, 0.2))
    with pytest.raises(DataError) as raised:
        prepare_datalist(root, tmp_path, contrasts, (1, 0, 0))
    assert str(raised.value) == (
        f"{tmp_path}: is a folder (expected the name of a JSON file in a folder that exists or can be created, and can "
        "be written to)"
    )
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=f"^{tmp_path}/file/list/a.json: cannot be created: {tmp_path}/file is a file"):
        prepare_datalist(root, tmp_path / "file" / "list" / "a.json", contrasts, (1, 0, 0))
    # an existing file is replaced only if it is a datalist: not an image or a bundle's config named by mistake
    (tmp_path / "file").write_bytes(b"\x1f\x8b\x08")
    with pytest.raises(DataError, match=f"^{tmp_path}/file: exists and is not JSON: it is not replaced"):
        prepare_datalist(root, tmp_path / "file", contrasts, (1, 0, 0))
    config = tmp_path / "train.json"
    config.write_text('{"network_def": {}}')
    with pytest.raises(DataError, match="exists and is JSON without any of the keys of a datalist"):
        prepare_datalist(root, config, contrasts, (1, 0, 0))
    assert (tmp_path / "file").read_bytes() == b"\x1f\x8b\x08" and config.read_text() == '{"network_def": {}}'
    config.unlink()
    (tmp_path / "empty.json").write_text("")  # an empty file (mktemp's) holds nothing to lose: it is not refused here
    assert splits_module._writable_output(tmp_path / "empty.json") == tmp_path / "empty.json"
    (tmp_path / "empty.json").unlink()
    no_volume_read()  # discovery counts the patients; too few is known before their volumes are read
    with pytest.raises(DataError, match=r"asks for 4 patients \[2, 1, 1\] but only 3 have every contrast"):
        prepare_datalist(root, tmp_path / "a.json", contrasts, (2, 1, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brats", "file"]


def test_the_scripts_refuse_bad_sizes_and_outputs_in_one_line(tmp_path):
    root = _brats_layout(tmp_path / "brats", 3)
    result = _run_failing("prepare_brats.py", "--root", str(root), "--output", str(tmp_path / "a.json"),
                          "--sizes=-3,10,10")
    assert result.stderr.strip().splitlines()[-1].startswith(
        "prepare_brats.py: error: sizes -3,10,10: holds a negative number; expected three numbers >= 0"
    )
    result = _run_failing("prepare_ixi.py", "--root", str(root), "--output", str(tmp_path), "--sizes", "1,0,0")
    assert result.stderr.strip().splitlines()[-1].startswith(f"prepare_ixi.py: error: {tmp_path}: is a folder")
    assert "checking volumes" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brats"]


def test_a_download_without_a_usable_case_writes_no_datalist(tmp_path):
    # before: a BRATS 2015 download (.mha files) gave an empty datalist and exit status 0
    root = tmp_path / "BRATS2015_Training"
    for name in ("VSD.Brain.XX.O.MR_T1.54502", "VSD.Brain.XX.O.MR_Flair.54501"):
        (root / "HGG" / "pat0001" / name).mkdir(parents=True)
        (root / "HGG" / "pat0001" / name / f"{name}.mha").write_bytes(b"ObjectType = Image\n")
    output = tmp_path / "brats.json"
    result = _run_failing("prepare_brats.py", "--root", str(root), "--output", str(output), "--sizes", "0.8,0.1,0.1")
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"prepare_brats.py: error: {root}: no usable case with every one of T1, T2, FLAIR, T1Gd (expected NIfTI files "
        "named by case and contrast (e.g. <case>-t1.nii.gz) or DICOM series below it); discovery: 0 cases found, "
    )
    assert not output.exists()
    # every case skipped, by discovery or for a bad volume: the same, the skipped cases listed before it
    _brats_layout(tmp_path / "bad", 1)
    (tmp_path / "bad" / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz").write_text("not an image")
    with pytest.raises(DataError, match=r"no usable case .* discovery: 0 cases found, 1 skipped \(the skipped cases "):
        prepare_datalist(tmp_path / "bad", output, ("T1", "T2", "FLAIR", "T1Gd"), (1, 0, 0), progress=False)
    assert not output.exists()


def test_ignored_files_are_counted_in_the_summary_and_listed_in_the_datalist(tmp_path):
    root = _brats_layout(tmp_path / "brats", 2)
    _volume(root / "BraTS-GLI-00000-000" / "brainmask.nii.gz", 0)  # names no contrast
    output = tmp_path / "brats.json"
    splits, discovery = prepare_datalist(root, output, ("T1", "T2", "FLAIR", "T1Gd"), (1, 0, 0), progress=False)
    assert preparation_summary(splits, discovery, output) == (
        f"{output}: 2/0/0 training/validation/test cases of 2 usable, 0 skipped, 1 files ignored (listed in the "
        "datalist's _info.ignored)"
    )
    ignored = json.loads(output.read_text(encoding="utf-8"))["_info"]["ignored"]
    assert ignored == [str(root / "BraTS-GLI-00000-000" / "brainmask.nii.gz")]


def test_validate_false_in_any_spelling_reads_no_volume(tmp_path):
    # before: Fire kept "false" and "no" as strings, which count as true: every volume was read
    root = _brats_layout(tmp_path / "brats", 2)
    (root / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t2w.nii.gz").write_text("not an image")
    for spelling in ("false", "no"):
        stdout = _run("prepare_brats.py", "--root", str(root), "--output", str(tmp_path / "a.json"), "--sizes", "1,0,0",
                      "--validate", spelling)
        assert stdout.strip().endswith("2/0/0 training/validation/test cases of 2 usable, 0 skipped"), stdout
    stdout = _run("prepare_brats.py", "--root", str(root), "--output", str(tmp_path / "a.json"), "--sizes", "1,0,0",
                  "--validate=YES")
    assert stdout.strip().endswith("1/0/0 training/validation/test cases of 1 usable, 1 skipped"), stdout
    result = _run_failing("prepare_brats.py", "--root", str(root), "--output", str(tmp_path / "b.json"),
                          "--validate", "maybe")
    assert result.stderr.strip().splitlines()[-1] == "prepare_brats.py: error: --validate: got 'maybe', expected true or false"


def _splits_of(splits: dict) -> dict[str, str]:
    return {case["patient_id"]: name for name, cases in splits.items() for case in cases}


def test_growing_data_keeps_earlier_patients_in_their_splits():
    earlier = split_cases(_cases(100, timepoints=2), (0.8, 0.1, 0.1), seed=0)
    grown = _cases(110, timepoints=2)
    # without keep, ten patients more move earlier ones between splits (some from training into test)
    moved = {patient for patient, name in _splits_of(split_cases(grown, (0.8, 0.1, 0.1), seed=0)).items()
             if patient in _splits_of(earlier) and _splits_of(earlier)[patient] != name}
    assert moved
    extended = split_cases(grown, (0.8, 0.1, 0.1), seed=0, keep=_splits_of(earlier))
    after = _splits_of(extended)
    assert all(after[patient] == name for patient, name in _splits_of(earlier).items())
    assert [len(_patients(extended[name])) for name in ("training", "validation", "test")] == [88, 11, 11]
    assert len(extended["training"]) == 176  # a new patient's time points stay together too
    # counts: the new patients fill what the earlier splits lack, the rest are left out
    earlier = split_cases(_cases(50), (30, 5, 5), seed=3)
    extended = split_cases(_cases(60), (30, 8, 5), seed=3, keep=_splits_of(earlier))
    assert [len(extended[name]) for name in ("training", "validation", "test")] == [30, 8, 5]
    assert all(_splits_of(extended).get(patient, name) == name for patient, name in _splits_of(earlier).items())
    assert len(set(_splits_of(extended)) - set(_splits_of(earlier))) == 3  # validation's three more: new patients
    # kept patients beyond a size all stay; with fractions, new patients beyond full splits train
    keep = {f"BraTS-GLI-{p:05d}": "test" for p in range(5)}
    extended = split_cases(_cases(10), (0.8, 0.1, 0.1), keep=keep)
    assert _patients(extended["test"]) == set(keep) and len(extended["training"]) == 5
    assert split_cases(_cases(10), (0.8, 0.1, 0.1), keep={}) == split_cases(_cases(10), (0.8, 0.1, 0.1))


def test_prepare_with_extend_keeps_the_earlier_datalist_and_records_what_changed(tmp_path):
    root = _brats_layout(tmp_path / "brats", 8)
    output = tmp_path / "lists" / "brats.json"
    _run("prepare_brats.py", "--root", str(root), "--output", str(output), "--sizes", "0.5,0.25,0.25")
    earlier = json.loads(output.read_text(encoding="utf-8"))
    earlier_splits = {case["patient_id"]: name for name in ("training", "validation", "test") for case in earlier[name]}
    assert len(earlier_splits) == 8
    _brats_layout(root, 12)  # four new patients
    shutil.rmtree(root / "BraTS-GLI-00000-000")  # and one gone
    stdout = _run("prepare_brats.py", "--root", str(root), "--output", str(output), "--sizes", "0.5,0.25,0.25",
                  "--extend", str(output))
    assert stdout.strip().endswith("5/3/3 training/validation/test cases of 11 usable, 0 skipped"), stdout
    grown = json.loads(output.read_text(encoding="utf-8"))
    grown_splits = {case["patient_id"]: name for name in ("training", "validation", "test") for case in grown[name]}
    del earlier_splits["BraTS-GLI-00000"]
    assert {patient: grown_splits[patient] for patient in earlier_splits} == earlier_splits
    assert grown["_info"]["extends"] == str(output.resolve())
    assert (grown["_info"]["patients_kept"], grown["_info"]["patients_new"]) == (7, 4)
    assert grown["_info"]["earlier_patients_missing"] == ["BraTS-GLI-00000"]
    assert all((output.parent / case["T1"]).resolve().is_file() for case in grown["test"])


def test_extend_refuses_what_is_not_an_earlier_datalist_of_the_data(tmp_path, no_volume_read):
    root = _brats_layout(tmp_path / "brats", 2)
    contrasts = ("T1", "T2", "FLAIR", "T1Gd")
    earlier = tmp_path / "earlier.json"
    # refused before discovery
    earlier.write_text(json.dumps({"training": [{"patient_id": "p"}], "test": [{"case_id": "p"}]}))
    with pytest.raises(DataError, match="patient p is in both training and test"):
        prepare_datalist(root, tmp_path / "a.json", contrasts, (1, 0, 0), extend=earlier)
    earlier.write_text(json.dumps({"training": [{"T1": "a.nii.gz"}]}))
    with pytest.raises(DataError, match=r"training\[0\] has neither patient_id nor case_id"):
        prepare_datalist(root, tmp_path / "a.json", contrasts, (1, 0, 0), extend=earlier)
    earlier.write_text("[]")
    with pytest.raises(DataError, match="is JSON without any of the keys of a datalist"):
        prepare_datalist(root, tmp_path / "a.json", contrasts, (1, 0, 0), extend=earlier)
    with pytest.raises(DataError, match="missing.json: does not exist"):
        prepare_datalist(root, tmp_path / "a.json", contrasts, (1, 0, 0), extend=tmp_path / "missing.json")
    # refused once discovery has found the cases: a datalist of other data
    no_volume_read()
    earlier.write_text(json.dumps({"training": [{"case_id": "other-1", "patient_id": "other"}]}))
    with pytest.raises(DataError, match=r"earlier.json: none of its 1 patients is among the usable cases found"):
        prepare_datalist(root, tmp_path / "a.json", contrasts, (1, 0, 0), validate=False, progress=False, extend=earlier)
    assert not (tmp_path / "a.json").exists()
