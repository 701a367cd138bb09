"""``scripts/prepare_brats.py`` splits by default as the paper does (METHOD: 580 BraTS 2023 patients, 500/40/40): run
with its defaults on the shipped BraTS case, it asks for 580 patients, sizes [500, 40, 40], before reading a volume.
The IXI script's default (500/37/40) was tested; BraTS's could have taken IXI's numbers unnoticed."""

from __future__ import annotations

import pytest

from agi_monai.data import DataError
from helpers import DATA, load_script


def test_the_default_split_is_the_papers_500_40_40(tmp_path):
    prepare = load_script("prepare_brats.py").main
    with pytest.raises(DataError) as refused:
        prepare(root=str(DATA / "brats2023-gli"), output=str(tmp_path / "datalist.json"))
    assert str(refused.value) == ("split: asks for 580 patients [500, 40, 40] but only 1 have every contrast "
                                  "(expected at least 580)")
    assert not (tmp_path / "datalist.json").exists()
