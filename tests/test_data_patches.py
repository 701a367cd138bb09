"""3D patches of preprocessed volumes (the 3D bundle's training items), on the shipped real BraTS case: each patch
is checked against the volume that ``preprocessing_transforms`` makes directly (no slice storage in between)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.utils import set_determinism

from agi_monai.data import PatchDataset, SliceDataset, build_volume_dataset, discover_cases, patch_dataset
from agi_monai.data.transforms import preprocessing_transforms

DATA = Path(__file__).resolve().parent / "data" / "brats2023-gli"
INPUTS, TARGET, SIZE = ["T1", "T2", "FLAIR"], "T1Gd", (96, 80)


@pytest.fixture(scope="module")
def cases():
    return discover_cases(DATA, required=[*INPUTS, TARGET]).cases


@pytest.fixture(scope="module")
def volume(cases):
    """The preprocessed volume as the inference and evaluation see it."""
    item = build_volume_dataset(cases, preprocessing_transforms(INPUTS, TARGET, SIZE))[0]
    return {key: torch.as_tensor(item[key]) for key in ("image", "target", "mask")}


@pytest.fixture(scope="module")
def stored(cases, tmp_path_factory):
    return patch_dataset(cases, INPUTS, TARGET, SIZE, patch_size=None, cache_dir=tmp_path_factory.mktemp("cache"),
                         progress=False).slices


def test_whole_volume_items_are_the_preprocessed_volume(stored, volume):
    whole = PatchDataset(stored, patch_size=None)
    assert len(whole) == 1
    item = whole[0]
    assert item["case_id"] == "BraTS-GLI-00001-000" and item["patch_origin"].tolist() == [0, 0, 0]
    for key, expected in volume.items():
        assert item[key].shape == expected.shape
        torch.testing.assert_close(item[key], expected.float())


def test_patches_are_regions_of_the_volume_around_the_brain(stored, volume):
    set_determinism(seed=0)
    patches = PatchDataset(stored, patch_size=(32, 24, 40), samples_per_volume=6)
    assert len(patches) == 6
    mask = volume["mask"][0] > 0
    nonzero = [torch.nonzero(mask.any(dim=tuple(d for d in range(3) if d != axis))).flatten() for axis in range(3)]
    origins = set()
    for index in range(len(patches)):
        item = patches[index]
        h, w, d = item["patch_origin"].tolist()
        origins.add((h, w, d))
        assert item["image"].shape == (3, 32, 24, 40) and item["target"].shape == item["mask"].shape == (1, 32, 24, 40)
        for key, expected in volume.items():
            torch.testing.assert_close(item[key], expected[:, h : h + 32, w : w + 24, d : d + 40].float())
        # along each axis the patch lies inside the brain's bounding box, or holds all of it where the box is
        # shorter than the patch (clamped to the volume only at its edges)
        for axis, (start, size, extent) in enumerate(zip((h, w, d), (32, 24, 40), mask.shape)):
            low, high = int(nonzero[axis][0]), int(nonzero[axis][-1])
            clamped = start in (0, extent - size)
            if high - low + 1 >= size:
                assert clamped or low <= start <= start + size - 1 <= high, (axis, start, low, high)
            else:
                assert clamped or start <= low <= high <= start + size - 1, (axis, start, low, high)
    assert len(origins) > 1  # random positions

    # the bundles' set_determinism makes the positions repeatable
    assert _origins(0, stored) == _origins(0, stored) != _origins(1, stored)
    set_determinism(seed=None)


def _origins(seed: int, stored: SliceDataset) -> list[tuple[int, ...]]:
    set_determinism(seed=seed)
    patches = PatchDataset(stored, patch_size=(32, 24, 40), samples_per_volume=6)
    return [tuple(patches[i]["patch_origin"].tolist()) for i in range(6)]


def test_a_patch_larger_than_the_volume_is_zero_padded_at_the_end(stored, volume):
    height, width, depth = volume["image"].shape[1:]
    patches = PatchDataset(stored, patch_size=(height + 8, 16, depth + 3), samples_per_volume=1)
    item = patches[0]
    h, w, d = item["patch_origin"].tolist()
    assert (h, d) == (0, 0) and item["image"].shape == (3, height + 8, 16, depth + 3)
    torch.testing.assert_close(item["image"][:, :height, :, :depth], volume["image"][:, :, w : w + 16].float())
    assert item["image"][:, height:].abs().sum() == 0 and item["image"][..., depth:].abs().sum() == 0


def test_bad_settings_are_refused_with_what_was_expected(cases, stored):
    gapped = SliceDataset(build_volume_dataset(cases, preprocessing_transforms(INPUTS, TARGET, SIZE)), progress=False)
    with pytest.raises(ValueError, match=r"keeps only slices with 5% foreground.*expected min_foreground_fraction=0"):
        PatchDataset(gapped)
    assert len(stored.case_ids) == 1
    with pytest.raises(ValueError, match=r"patch_size \[32, 32\] \(expected three positive sizes"):
        PatchDataset(stored, patch_size=(32, 32))
    with pytest.raises(ValueError, match=r"samples_per_volume 0 \(expected at least 1\)"):
        PatchDataset(stored, samples_per_volume=0)
    with pytest.raises(IndexError, match="item 4 out of range for 4 items"):
        PatchDataset(stored)[4]


def test_check_batches_counts_patches_and_advises_more_per_volume(stored):
    from torch.utils.data import DataLoader, DistributedSampler

    from agi_monai.bundle import check_batches
    from agi_monai.data import DataError

    patches = PatchDataset(stored, patch_size=(16, 16, 16), samples_per_volume=3)
    check_batches(DataLoader(patches, batch_size=3, drop_last=True), "training")
    with pytest.raises(DataError) as raised:
        check_batches(DataLoader(patches, batch_size=4, drop_last=True), "training")
    assert str(raised.value) == (
        "the 'training' split: 3 usable patches from 1 volume make no batch of batch_size 4 with drop_last, so an "
        "epoch would have no iteration (expected at least 4 patches: a smaller --batch_size, more training cases, or "
        "a larger --samples_per_volume, to draw more patches per volume)"
    )
    # validation by whole volumes under DDP: a process without a volume (1 case, 2 processes)
    whole = PatchDataset(stored, patch_size=None)
    sampler = DistributedSampler(whole, num_replicas=2, rank=1, drop_last=True)
    with pytest.raises(DataError) as raised:
        check_batches(DataLoader(whole, batch_size=1, sampler=sampler), "validation")
    assert str(raised.value) == (
        "the 'validation' split: 1 usable volume, 0 of them for this process of 2 makes no batch of batch_size 1, so "
        "an epoch would have no iteration (expected at least 1 volume per process: more validation cases or fewer "
        "processes)"
    )


def test_foreground_box_is_found_as_the_volume_is_built_and_kept_in_its_record(cases, stored, volume, caplog):
    mask = volume["mask"][0].numpy() > 0
    expected = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        expected.append((int(present[0]), int(present[-1])))
    assert stored.foreground_box(0) == expected
    (record_file,) = stored.storage_dir.glob("*.json")
    assert json.loads(record_file.read_text())["foreground_box"] == [list(pair) for pair in expected]

    # a record written before the box was kept: the volume is built again, in place, and its record completed
    record = json.loads(record_file.read_text())
    del record["foreground_box"]
    record_file.write_text(json.dumps(record))
    volumes = build_volume_dataset(cases, preprocessing_transforms(INPUTS, TARGET, SIZE))
    with caplog.at_level("INFO", logger="agi_monai.data.datasets"):
        again = SliceDataset(volumes, min_foreground_fraction=0.0, storage_dir=stored.storage_dir, progress=False)
    assert "read from" not in caplog.text and again.foreground_box(0) == expected
    assert json.loads(record_file.read_text())["foreground_box"] == [list(pair) for pair in expected]
