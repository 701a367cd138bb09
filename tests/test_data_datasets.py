"""Slice datasets: from each shipped folder (registered or native) to 2D training items with the right
channel order and shapes, cached so that later builds and epochs are fast, skipping bad cases."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agi_monai.data import (
    LoadVolumed,
    RandShiftChanneld,
    SliceDataset,
    build_volume_dataset,
    discover_cases,
    preprocessing_transforms,
)

DATA = Path(__file__).parent / "data"
BRATS_CONTRASTS = ["T1", "T2", "FLAIR", "T1Gd"]


@pytest.fixture(scope="module")
def brats_cases() -> list[dict]:
    cases = discover_cases(DATA, required=BRATS_CONTRASTS).cases
    return [case for case in cases if case["case_id"] != "TCGA-FG-6692-native"]


@pytest.fixture(scope="module")
def brats_slices(brats_cases, tmp_path_factory) -> tuple[SliceDataset, list[dict], Path]:
    cache = tmp_path_factory.mktemp("cache")
    preprocessing = preprocessing_transforms(["T2", "FLAIR", "T1Gd"], "T1", spatial_size=(240, 240))
    volume_dataset = build_volume_dataset(brats_cases, preprocessing, cache)
    slices = SliceDataset(volume_dataset, progress=False)
    volumes = [volume_dataset[i] for i in range(len(brats_cases))]  # the whole volumes, from the cache
    return slices, volumes, cache


def test_slice_items_have_scenario_channel_order_and_shapes(brats_slices):
    dataset, volumes, _ = brats_slices
    assert dataset.case_ids == ["BraTS-GLI-00001-000", "OtherEXampleFromTCIA", "aurora-example"]
    item = dataset[len(dataset) // 2]
    assert item["image"].shape == (3, 240, 240) and item["target"].shape == (1, 240, 240)
    assert item["mask"].shape == (1, 240, 240) and item["image"].dtype == torch.float32
    volume = volumes[dataset.case_ids.index(item["case_id"])]
    z = item["slice_index"]
    torch.testing.assert_close(item["image"], volume["image"][..., z])  # T2, FLAIR, T1Gd in that order
    torch.testing.assert_close(item["target"], volume["target"][..., z])


def test_only_slices_with_enough_foreground_are_kept(brats_slices):
    dataset, volumes, _ = brats_slices
    fractions = [v["mask"].float().mean(dim=(0, 1, 2)) for v in volumes]
    assert len(dataset) == sum(int((f >= 0.05).sum()) for f in fractions)
    assert 0.5 * 3 * 155 < len(dataset) < 3 * 155
    assert all(dataset[i]["mask"].mean() >= 0.05 for i in range(0, len(dataset), 25))


def test_cached_volumes_are_reused_and_an_epoch_takes_seconds(brats_slices, brats_cases, monkeypatch):
    dataset, _, cache = brats_slices
    assert len(list(cache.glob("*.pt"))) == len(brats_cases)

    def no_loading(self, data):
        raise AssertionError("the volumes should come from the cache")

    monkeypatch.setattr(LoadVolumed, "__call__", no_loading)
    preprocessing = preprocessing_transforms(["T2", "FLAIR", "T1Gd"], "T1", spatial_size=(240, 240))
    start = time.perf_counter()
    again = SliceDataset(build_volume_dataset(brats_cases, preprocessing, cache), progress=False)
    epoch = [again[i] for i in range(len(again))]
    assert time.perf_counter() - start < 20.0  # measured: about 1 s to rebuild, under 1 s per epoch
    torch.testing.assert_close(epoch[7]["image"], dataset[7]["image"])


def test_registered_ixi_and_native_tcga_become_slices():
    ixi = discover_cases(DATA / "ixi-sim", required=["T1", "T2", "PD"]).cases
    dataset = SliceDataset(
        build_volume_dataset(ixi, preprocessing_transforms(["T1", "PD"], "T2", (128, 128))), progress=False
    )
    item = dataset[0]
    assert item["image"].shape == (2, 128, 128) and item["case_id"] == "IXI901-SIM-0001"
    assert 30 < len(dataset) <= 72

    native = discover_cases(DATA / "tcga-lgg" / "TCGA-FG-6692-native").cases
    preprocessing = preprocessing_transforms(
        ["T1", "T2", "FLAIR"], "T1Gd", (256, 256), registration_options={"iterations": 50}
    )
    dataset = SliceDataset(build_volume_dataset(native, preprocessing), progress=False)
    assert dataset[0]["image"].shape == (3, 256, 256) and 10 < len(dataset) <= 26


def test_bad_case_is_skipped_and_reported(brats_cases, tmp_path):
    broken = dict(brats_cases[0], case_id="broken", T2=str(tmp_path / "gone-t2w.nii.gz"))
    preprocessing = preprocessing_transforms(["T2", "FLAIR"], "T1", spatial_size=(240, 240))
    dataset = SliceDataset(build_volume_dataset([broken, brats_cases[2]], preprocessing), num_workers=1, progress=False)
    assert dataset.case_ids == ["aurora-example"]
    (failure,) = dataset.failures
    assert (
        failure.case_id == "broken"
        and failure.reason == f"{tmp_path / 'gone-t2w.nii.gz'}: file not found (expected an existing NIfTI file)"
    )


def test_slice_transform_is_applied_on_access(brats_slices):
    dataset, _, _ = brats_slices
    shift = RandShiftChanneld("image", magnitude_px=(2.0, 2.0), channel=0)
    shifted = SliceDataset.__new__(SliceDataset)
    shifted.__dict__.update(dataset.__dict__, transform=shift)
    plain, moved = dataset[100], shifted[100]
    assert not torch.allclose(plain["image"][0], moved["image"][0])
    torch.testing.assert_close(plain["image"][1:], moved["image"][1:])
    assert np.isclose(np.linalg.norm(shift.shift), 2.0)
