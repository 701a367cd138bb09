"""The evaluation's brain mask is the mask the preprocessing adds, on two real contrasts that differ.

``agi_monai.evaluation.brain_mask`` documents itself as the ``"mask"`` of the bundles' preprocessing
(``AddForegroundMaskd`` on the stacked inputs). Here both are computed on the native TCGA T2 and FLAIR (clinical scans,
not skull-stripped, each on its own oblique grid), taken through the preprocessing's own steps up to the mask:
load, scale to the 99.5th percentile, FLAIR aligned onto the T2 grid by its header, stacked. The two contrasts give
head masks that differ by tens of thousands of voxels, so a mask of one channel alone cannot pass for the mask of
the stacked inputs.
"""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, ConcatItemsd

from agi_monai.data.transforms import AddForegroundMaskd, AlignToReferenced, LoadVolumed, ScaleIntensityToPercentiled
from agi_monai.evaluation import brain_mask
from helpers import DATA

NATIVE = DATA / "tcga-lgg" / "TCGA-FG-6692-native"
INPUTS = ["T2", "FLAIR"]


@pytest.fixture(scope="module")
def preprocessed() -> dict:
    chain = Compose([
        LoadVolumed(INPUTS),
        ScaleIntensityToPercentiled(INPUTS),
        AlignToReferenced(INPUTS, "T2", registration="header"),
        ConcatItemsd(INPUTS, "image"),
        AddForegroundMaskd("image", "mask"),
    ])
    return chain({"T2": str(NATIVE / "t2.nii.gz"), "FLAIR": str(NATIVE / "flair.nii.gz")})


def test_brain_mask_of_the_stacked_inputs_is_the_preprocessing_mask(preprocessed):
    image, mask = preprocessed["image"], preprocessed["mask"]
    assert image.shape == (2, 224, 256, 26) and mask.shape == (1, 224, 256, 26)
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    assert isinstance(mask, MetaTensor) and torch.equal(mask.affine, image.affine)  # on the inputs' grid

    evaluated = brain_mask(image)
    assert evaluated.dtype == torch.bool and evaluated.shape == (224, 256, 26)
    assert torch.equal(evaluated, mask[0] > 0)
    assert 0.2 < evaluated.float().mean() < 0.8  # a head, not an empty or a full mask

    # The test can tell: each contrast alone gives another mask (the mean of the two is what is masked).
    for channel, name in enumerate(INPUTS):
        alone = brain_mask(image[channel])
        differing = int((alone != evaluated).sum())
        assert differing > 10_000, f"{name} alone gives the same mask but for {differing} voxels"
