"""BraTS download -> patient-level train/validation/test datalist (the paper's 500/40/40 of 580 patients).

Expects the BraTS 2023 training folders (``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz`` ...) or
older BraTS (``*_t1/_t1ce/_t2/_flair.nii.gz``) below one folder. Cases without all four contrasts, or
with a bad volume, are reported and left out; the time points of one patient stay in one split.

    python scripts/prepare_brats.py --root /data/BraTS2023-GLI-Training --output /data/brats_datalist.json
"""

from __future__ import annotations

from agi_monai.cli import check_whole_numbers, run_script
from agi_monai.data import preparation_summary, prepare_datalist

BRATS_CONTRASTS = ("T1", "T2", "FLAIR", "T1Gd")
PAPER_SIZES = (500, 40, 40)


def main(root: str, output: str, sizes: tuple[float, ...] = PAPER_SIZES, seed: int = 0, validate: bool = True,
         extend: str | None = None) -> None:
    """Write the BraTS datalist.

    Args:
        root: folder holding the BraTS case folders.
        output: the JSON datalist to write (atomically); paths in it are relative to its folder.
        sizes: training, validation, test: whole numbers of patients (e.g. 500,40,40), or fractions summing to 1
            (e.g. 0.8,0.1,0.1); anything else is refused before any volume is read.
        seed: seed of the patient shuffle.
        validate: (true/false, yes/no, 1/0) read every volume and leave out cases with a bad one.
        extend: a datalist prepared earlier from this data (may be --output itself): its patients keep
            their splits and only new ones are dealt out, so data that grows keeps its test set.
    """
    check_whole_numbers(seed=(seed, 0))
    splits, discovery = prepare_datalist(root, output, BRATS_CONTRASTS, sizes, seed, validate, extend=extend)
    print(preparation_summary(splits, discovery, output, "cases"))


if __name__ == "__main__":
    run_script(main, "prepare_brats.py")
