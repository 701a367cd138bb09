"""IXI download -> patient-level train/validation/test datalist (the paper's 500/37/40 of 577 subjects).

Expects the official download unpacked in one folder, e.g. ``IXI-T1/IXI002-Guys-0828-T1.nii.gz``,
``IXI-T2/...-T2.nii.gz``, ``IXI-PD/...-PD.nii.gz`` (any layout below the folder works: files are matched
by name). Subjects without all three contrasts, or with a bad volume, are reported and left out.

    python scripts/prepare_ixi.py --root /data/IXI --output /data/IXI/datalist.json
"""

from __future__ import annotations

from agi_monai.cli import check_whole_numbers, run_script
from agi_monai.data import preparation_summary, prepare_datalist

IXI_CONTRASTS = ("T1", "T2", "PD")
PAPER_SIZES = (500, 37, 40)


def main(root: str, output: str, sizes: tuple[float, ...] = PAPER_SIZES, seed: int = 0, validate: bool = True,
         extend: str | None = None) -> None:
    """Write the IXI datalist.

    Args:
        root: folder holding the IXI download.
        output: the JSON datalist to write (atomically); paths in it are relative to its folder.
        sizes: training, validation, test: whole numbers of patients (e.g. 500,40,40), or fractions summing to 1
            (e.g. 0.8,0.1,0.1); anything else is refused before any volume is read.
        seed: seed of the patient shuffle.
        validate: (true/false, yes/no, 1/0) read every volume and leave out subjects with a bad one.
        extend: a datalist prepared earlier from this data (may be --output itself): its patients keep
            their splits and only new ones are dealt out, so data that grows keeps its test set.
    """
    check_whole_numbers(seed=(seed, 0))
    splits, discovery = prepare_datalist(root, output, IXI_CONTRASTS, sizes, seed, validate, extend=extend)
    print(preparation_summary(splits, discovery, output, "subjects"))


if __name__ == "__main__":
    run_script(main, "prepare_ixi.py")
