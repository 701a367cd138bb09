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

from agi_monai.data import DataError, discover_cases, split_cases, write_datalist

REPO = Path(__file__).parents[1]
DATA = Path(__file__).parent / "data"


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
    with pytest.raises(ValueError, match="fractions must sum to 1"):
        split_cases(_cases(10), (0.5, 0.1, 0.1))


def test_written_datalist_reads_back_with_relative_paths(tmp_path):
    shutil.copytree(DATA / "brats2023-gli", tmp_path / "brats" / "gli")
    shutil.copytree(DATA / "tcga-lgg", tmp_path / "brats" / "tcga")
    cases = discover_cases(tmp_path / "brats", required=["T1", "T2", "FLAIR", "T1Gd"]).cases
    cases.append(discover_cases(DATA / "brats2023-mets").cases[0])  # outside the datalist's folder
    splits = split_cases(cases, (2, 1, 1), seed=0)
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
        str(tmp_path / "again.json"),
        "--sizes",
        "6,2,2",
        "--seed",
        "3",
    )
    assert json.loads((tmp_path / "again.json").read_text(encoding="utf-8"))["test"] == content["test"]
    # the paper's sizes need 577 subjects: one line and exit status 2, no traceback, no file
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_ixi.py"), "--root", str(root), "--output", str(tmp_path / "x")],
        capture_output=True, encoding="utf-8", cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "prepare_ixi.py: error: split: asks for 577 patients [500, 37, 40] but only 10 have every contrast "
        "(expected at least 577)"
    )
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
