"""``agi-monai synthesize --overwrite --dicom`` replaces a case's DICOM series left without its NIfTI (the NIfTI
deleted, or a run stopped while setting outputs aside): without ``--overwrite`` the case fails with "pass --overwrite
to replace it" (tested in test_cli.py), and with it the case is synthesized again, NIfTI and series. Nothing tested the
second half, so a refusal that ignored ``--overwrite`` would have left the user no way but deleting by hand what the
message told them the flag would replace.

Run in-process through ``main()`` on the shipped aurora case cut to 40 slices, with a copy of the (T1, T2) -> FLAIR
bundle holding a freshly initialised narrow generator (as test_cli.py does), so that each run takes seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
import torch

from agi_monai.cli import main
from agi_monai.networks import AGINet
from helpers import DATA, REPO

AURORA = DATA / "brats2023-mets" / "aurora-example"
WIDTHS = [8, 8, 8, 8]
FAST = ["--network_def#channels", str(WIDTHS).replace(" ", ""), "--spatial_size", "[64,64]", "--progress", "False"]


def _bundle(folder: Path) -> Path:
    root = folder / "brats_t1_t2_to_flair"
    shutil.copytree(REPO / "bundles" / root.name, root, ignore=shutil.ignore_patterns("models", "eval"))
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(AGINet(in_channels=2, channels=WIDTHS).state_dict(), root / "models" / "model.pt")
    return root


def test_overwrite_replaces_a_series_left_without_its_nifti(tmp_path, capsys):
    case = tmp_path / "cases" / AURORA.name
    case.mkdir(parents=True)
    for name in ("t1", "t2"):
        nib.save(nib.load(AURORA / f"{name}.nii.gz").slicer[:, :, 60:100], case / f"{name}.nii.gz")
    output = tmp_path / "out"
    nifti, series = output / "aurora-example_FLAIR.nii.gz", output / "aurora-example_FLAIR_dicom"
    args = ["synthesize", str(case), "--bundle", str(_bundle(tmp_path)), "--output_dir", str(output), *FAST, "--dicom"]
    assert main(args) == 0
    earlier_uids = {pydicom.dcmread(p).SOPInstanceUID for p in series.iterdir()}
    nifti.unlink()

    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 of 1 cases written (FLAIR, NIfTI + DICOM)" in last and last.endswith("; 0 failed"), last
    assert sorted(output.iterdir()) == [nifti, series]  # no earlier output set aside and left behind
    files = sorted(series.iterdir())
    assert earlier_uids.isdisjoint(pydicom.dcmread(p).SOPInstanceUID for p in files)  # a new series
    # made from the new NIfTI: the same values, to the uint16 rescale's step
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    from_dicom, from_nifti = (sitk.DICOMOrient(i, "LPS") for i in (reader.Execute(), sitk.ReadImage(str(nifti))))
    values = sitk.GetArrayFromImage(from_nifti)
    np.testing.assert_allclose(sitk.GetArrayFromImage(from_dicom), values, atol=(values.max() - values.min()) / 65535)
