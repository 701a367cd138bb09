"""A slice whose foreground covers exactly the minimum share (5 %) is kept, as stated ("covers >= 5 %"): by the
evaluation's slice selection (protocol slice2d, ``evaluated_slices``) and by the training slices (``SliceDataset``).
Tested before only at shares far from the bound, so either could drop the slices at the bound unnoticed."""

from __future__ import annotations

import torch

from agi_monai.data import SliceDataset
from agi_monai.evaluation import evaluated_slices


def _mask_with_counts(counts) -> torch.Tensor:
    """A (20, 20, D) mask whose slice k holds counts[k] voxels (of 400: 20 voxels are 5 %)."""
    mask = torch.zeros(20, 20, len(counts))
    for k, count in enumerate(counts):
        mask.view(400, -1)[:count, k] = 1  # (the first rows of the flattened slice)
    return mask


def test_the_evaluation_keeps_a_slice_at_exactly_the_minimum_share():
    mask = _mask_with_counts([19, 20, 21, 0, 400])
    assert mask[..., 1].mean().item() == torch.tensor(0.05).item()  # the share is 0.05 as float32 holds it
    assert evaluated_slices(mask, 0.05).tolist() == [1, 2, 4]


def test_training_keeps_a_slice_at_exactly_the_minimum_share():
    mask = _mask_with_counts([19, 20, 21, 0, 400])[None]
    volume = {"case_id": "c", "image": torch.rand(2, 20, 20, 5), "target": torch.rand(1, 20, 20, 5), "mask": mask}
    dataset = SliceDataset([volume], min_foreground_fraction=0.05, progress=False)
    assert [dataset[i]["slice_index"] for i in range(len(dataset))] == [1, 2, 4]
    torch.testing.assert_close(dataset[0]["image"], volume["image"][..., 1])
