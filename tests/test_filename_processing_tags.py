"""The processing tags a file name may carry after its contrast (brain extraction, bias correction, registration:
``P01_T2_reg.nii.gz``, ``P01-t1-n4-bet.nii.gz``) name no contrast and no case: the contrast before them is the file's.
Only ``bet`` and DeepMedic's ``subtrMeanDivStd`` were tested; a tag dropped from the list left such files ignored,
their case missing a contrast."""

from __future__ import annotations

import pytest

from agi_monai.data import discover_cases, parse_filename
from helpers import DATA

BRATS = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"


@pytest.mark.parametrize("tag", ["bet", "brain", "skullstripped", "SubtrMeanDivStd", "n4", "reg"])
def test_a_processing_tag_after_the_contrast_is_not_part_of_the_name(tag):
    assert parse_filename(f"P01_T2_{tag}.nii.gz") == ("P01", "T2")
    assert parse_filename(f"P01-flair-{tag}.nii") == ("P01", "FLAIR")


def test_a_folder_of_files_with_several_tags_is_one_case_with_every_contrast(tmp_path):
    names = {"t1n": "P01_t1_n4_reg_bet.nii.gz", "t2w": "P01_t2_reg_brain.nii.gz",
             "t2f": "P01_flair_skullstripped.nii.gz"}
    for shipped, name in names.items():
        (tmp_path / name).symlink_to(BRATS / f"BraTS-GLI-00001-000-{shipped}.nii.gz")
    discovery = discover_cases(tmp_path, required=["T1", "T2", "FLAIR"])
    assert discovery.failures == [] and discovery.ignored == []
    assert [(c["case_id"], c["T1"], c["T2"], c["FLAIR"]) for c in discovery.cases] == [
        ("P01", str(tmp_path / names["t1n"]), str(tmp_path / names["t2w"]), str(tmp_path / names["t2f"]))
    ]
