"""Slice datasets: from each shipped folder (registered or native) to 2D training items with the right
channel order and shapes, cached so that later builds and epochs are fast, skipping bad cases."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import Dataset

from agi_monai.data import (
    DataError,
    LoadVolumed,
    RandShiftChanneld,
    SliceDataset,
    build_inference_dataset,
    build_slice_dataset,
    build_volume_dataset,
    choose_reference,
    discover_cases,
    metatensor_to_sitk,
    preprocessing_transforms,
    restore_geometry_transforms,
    slice_dataset,
    write_dicom_series,
)
from agi_monai.data.transforms import PREPROCESSING_VERSION
from helpers import DATA, SUBPROCESS_ENV

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


def _assert_same_items(a: SliceDataset, b: SliceDataset, indices) -> None:
    for index in indices:
        x, y = a[index], b[index]
        assert (x["case_id"], x["slice_index"]) == (y["case_id"], y["slice_index"])
        for key in ("image", "target", "mask"):
            assert x[key].dtype == y[key].dtype == torch.float32
            assert torch.equal(x[key], y[key]), (index, key)


def _exploding_volumes(cases: list[dict]) -> Dataset:
    def explode(item):
        raise AssertionError(f"{item['case_id']}: the slices should come from the slice files")

    return Dataset(cases, transform=explode)


def test_slices_stored_on_disk_equal_those_in_memory_and_a_rebuild_reads_no_volume(brats_slices, brats_cases, tmp_path):
    in_memory, _, cache = brats_slices
    preprocessing = preprocessing_transforms(["T2", "FLAIR", "T1Gd"], "T1", spatial_size=(240, 240))
    storage = tmp_path / "slices"
    stored = SliceDataset(build_volume_dataset(brats_cases, preprocessing, cache), storage_dir=storage, progress=False)
    assert len(stored) == len(in_memory) and stored.case_ids == in_memory.case_ids
    files = sorted(storage.glob("*.npy"))
    assert len(files) == len(brats_cases) and all(f.with_suffix(".json").is_file() for f in files)
    assert sum(np.load(f, mmap_mode="r").shape[0] for f in files) == len(in_memory)
    _assert_same_items(in_memory, stored, range(0, len(in_memory), 37))

    # a resumed run builds the dataset again: every volume's slices come from its file, no volume is loaded
    again = SliceDataset(_exploding_volumes(brats_cases), storage_dir=storage, progress=False)
    assert again.case_ids == in_memory.case_ids and again.failures == []
    _assert_same_items(in_memory, again, [0, len(in_memory) // 2, len(in_memory) - 1])

    # pickled for a spawned DataLoader worker: the memory maps are reopened there, not copied into the pickle
    assert len(pickle.dumps(again)) < 100_000
    loader = torch.utils.data.DataLoader(again, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    batch = next(iter(loader))
    assert torch.equal(batch["image"], torch.stack([in_memory[i]["image"] for i in range(4)]))


def test_float16_slice_files_are_half_the_size_and_read_back_as_float32(brats_cases, tmp_path):
    preprocessing = preprocessing_transforms(["T2", "FLAIR"], "T1", spatial_size=(240, 240))
    volumes = build_volume_dataset(brats_cases[2:], preprocessing, tmp_path / "volumes")
    full = SliceDataset(volumes, storage_dir=tmp_path / "float32", progress=False)
    half = SliceDataset(volumes, storage_dir=tmp_path / "float16", storage_dtype=torch.float16, progress=False)
    (full_file,), (half_file,) = (tmp_path / "float32").glob("*.npy"), (tmp_path / "float16").glob("*.npy")
    assert np.load(half_file, mmap_mode="r").dtype == np.float16
    assert abs(half_file.stat().st_size / full_file.stat().st_size - 0.5) < 0.01
    item, rounded = full[10], half[10]
    assert rounded["image"].dtype == torch.float32
    torch.testing.assert_close(rounded["image"], item["image"], rtol=0, atol=2.0**-11)  # [0, 1] in float16
    with pytest.raises(ValueError, match="bfloat16 cannot be stored in a file"):
        SliceDataset(volumes, storage_dir=tmp_path / "bf16", storage_dtype=torch.bfloat16, progress=False)


def test_a_full_cache_folder_is_named_with_the_room_needed(brats_cases, tmp_path, monkeypatch):
    # before: "OSError: 2162688 requested and 2097120 written", numpy's words for a full disk, naming nothing
    def full_disk(file, array, *args, **kwargs):
        Path(file).write_bytes(b"part of the slices")
        raise OSError("2162688 requested and 2097120 written")

    monkeypatch.setattr(np, "save", full_disk)
    preprocessing = preprocessing_transforms(["T2", "FLAIR"], "T1", spatial_size=(240, 240))
    storage = tmp_path / "slices"
    with pytest.raises(DataError) as raised:
        SliceDataset(build_volume_dataset(brats_cases[:1], preprocessing), storage_dir=storage, progress=False)
    message = str(raised.value)
    assert message.startswith(f"{storage}/") and ".npy: could not be written (OSError: 2162688 requested and " \
        "2097120 written; " in message, message
    assert re.search(r"MB free on its file system\) \(expected room for BraTS-GLI-00001-000's preprocessed slices "
                     r"\([0-9]+ MB\) in the cache folder \(cache_dir\)\)$", message), message
    assert list(storage.iterdir()) == []  # no partial file, no record


def test_a_failed_volume_is_not_stored_and_the_next_build_tries_it_again(brats_cases, tmp_path):
    missing = tmp_path / "later-t2w.nii.gz"
    late = dict(brats_cases[2], case_id="late", T2=str(missing))
    preprocessing = preprocessing_transforms(["T2", "FLAIR"], "T1", spatial_size=(240, 240))
    storage, cases = tmp_path / "slices", [late, brats_cases[0]]
    first = SliceDataset(build_volume_dataset(cases, preprocessing), storage_dir=storage, progress=False)
    assert first.case_ids == ["BraTS-GLI-00001-000"] and [f.case_id for f in first.failures] == ["late"]
    assert len(list(storage.glob("*.npy"))) == 1
    shutil.copy(brats_cases[2]["T2"], missing)  # the user puts the missing file in place
    second = SliceDataset(build_volume_dataset(cases, preprocessing), storage_dir=storage, progress=False)
    assert second.case_ids == ["late", "BraTS-GLI-00001-000"] and second.failures == []
    assert len(list(storage.glob("*.npy"))) == 2


def test_slice_dataset_keeps_only_slice_files_in_a_folder_per_preprocessing(brats_cases, tmp_path, monkeypatch):
    cases = brats_cases[2:]
    first = slice_dataset(cases, ["T2", "FLAIR"], "T1", (240, 240), cache_dir=tmp_path, progress=False)
    scenario = tmp_path / "T2_FLAIR_to_T1_240x240"
    assert len(list((scenario / "slices").glob("*.npy"))) == 1
    assert not list(tmp_path.rglob("*.pt"))  # no volume cache: at the paper's scale it outweighs the slices
    # other preprocessing options: other slices, in a folder of their own
    other = slice_dataset(
        cases, ["T2", "FLAIR"], "T1", (240, 240), cache_dir=tmp_path, progress=False, reference="FLAIR"
    )
    (folder,) = [p for p in scenario.iterdir() if p.name.startswith("slices-")]
    assert len(list(folder.glob("*.npy"))) == 1 and len(other) == len(first)

    def no_loading(self, data):
        raise AssertionError("the slices should come from the slice files")

    monkeypatch.setattr(LoadVolumed, "__call__", no_loading)
    again = slice_dataset(cases, ["T2", "FLAIR"], "T1", (240, 240), cache_dir=tmp_path, progress=False)
    _assert_same_items(first, again, range(0, len(first), 20))


FAST_REGISTRATION = {"registration_options": {"sampling_fraction": 0.05}}


def _expected_plane(volume: np.ndarray, affine: np.ndarray, z: int, size: tuple[int, int]) -> np.ndarray:
    """Axial plane ``z`` of a volume on a file's grid as the chain should give it, computed here with nibabel
    and numpy: RAS orientation, then centred zero padding (or cropping) of the plane to ``size``."""
    plane = nib.as_closest_canonical(nib.Nifti1Image(volume, affine)).get_fdata(dtype=np.float32)[..., z]
    out = np.zeros(size, np.float32)
    source, destination = [], []
    for n, m in zip(plane.shape, size):
        start = abs(m - n) // 2
        source.append(slice(0, n) if m >= n else slice(start, start + m))
        destination.append(slice(start, start + n) if m >= n else slice(0, m))
    out[tuple(destination)] = plane[tuple(source)]
    return out


def _normalized_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    raw = image.get_fdata(dtype=np.float32)
    return np.clip(raw / np.percentile(raw, 99.5), 0, 1), image.affine


def _ixi_t1_on_t2_grid_by_ground_truth() -> tuple[np.ndarray, np.ndarray]:
    """The normalised ixi-sim T1 resampled onto the T2 grid with the simulation's ground-truth pose (not with
    the registration under test), as an array on the T2 file's grid."""
    folder = DATA / "ixi-sim"
    truth = np.array(
        json.loads((folder / "ground_truth_transforms.json").read_text(encoding="utf-8"))["subjects"][
            "IXI901-SIM-0001"
        ]["itk_lps_T1_from_T2"]
    )
    reference = sitk.ReadImage(str(folder / "IXI901-SIM-0001-T2.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(folder / "IXI901-SIM-0001-T1.nii.gz"), sitk.sitkFloat32)
    upper = float(np.percentile(sitk.GetArrayViewFromImage(moving), 99.5))
    moving = sitk.Clamp(moving / upper, sitk.sitkFloat32, 0.0, 1.0)
    pose = sitk.AffineTransform(truth[:3, :3].flatten().tolist(), truth[:3, 3].tolist())
    resampled = sitk.Resample(moving, reference, pose, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(resampled).transpose(2, 1, 0), nib.load(folder / "IXI901-SIM-0001-T2.nii.gz").affine


@pytest.mark.parametrize(
    "folder, inputs, target, size, labels, slices",
    [
        ("brats2023-gli", ["T1", "T2"], "FLAIR", (240, 240), [], (100, 155)),
        ("brats2023-mets", ["T2", "FLAIR"], "T1", (240, 240), [], (100, 155)),
        ("tcga-lgg/TCGA-FG-6692", ["T1", "T2", "FLAIR"], "T1Gd", (240, 240), ["seg"], (100, 155)),
        ("ixi-sim", ["T2", "PD"], "T1", (128, 128), [], (30, 72)),  # T1 registered to the T2/PD grid
        ("tcga-lgg/TCGA-FG-6692-native", ["T1", "T2"], "FLAIR", (256, 256), [], (10, 26)),  # T1, FLAIR registered
    ],
)
def test_one_call_turns_each_shipped_folder_into_slices(folder, inputs, target, size, labels, slices):
    dataset = build_slice_dataset(
        DATA / folder, inputs, target, size, labels=labels, progress=False, **FAST_REGISTRATION
    )
    assert dataset.failures == [] and len(dataset.case_ids) == 1
    assert slices[0] < len(dataset) <= slices[1]
    item = dataset[len(dataset) // 2]
    assert item["image"].shape == (len(inputs), *size) and item["target"].shape == (1, *size)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    if labels:
        assert item["seg"].shape == (1, *size) and set(item["seg"].unique().tolist()) <= {0.0, 1.0, 2.0, 4.0}
    # the channels are the right files in scenario order: each contrast already on the reference grid is its
    # own file normalised, reoriented and padded (exactly); a contrast on another grid was registered
    (case,) = discover_cases(DATA / folder, required=[*inputs, target]).cases
    reference_affine = nib.load(case[choose_reference(inputs)]).affine
    z = item["slice_index"]
    planes = dict(zip([*inputs, target], [*item["image"], item["target"][0]]))
    exact = [name for name in planes if np.allclose(nib.load(case[name]).affine, reference_affine, atol=1e-4)]
    assert choose_reference(inputs) in exact
    for name in exact:
        np.testing.assert_allclose(planes[name].numpy(), _expected_plane(*_normalized_file(case[name]), z, size))
    if folder == "ixi-sim":  # against the simulation's ground-truth pose: 0.002 off, the header alone 0.03 to 0.06
        expected = _expected_plane(*_ixi_t1_on_t2_grid_by_ground_truth(), z, size)
        assert np.abs(planes["T1"].numpy() - expected).mean() < 0.01


def test_one_call_from_dicom_to_slices_and_restorable_inference_items(tmp_path):
    study = tmp_path / "TCGA-FG-6692"
    native = DATA / "tcga-lgg" / "TCGA-FG-6692-native"
    for number, (name, description) in enumerate([("t2", "AX T2 FSE"), ("t1", "AX T1 SE"), ("flair", "AX FLAIR")], 1):
        write_dicom_series(
            sitk.ReadImage(str(native / f"{name}.nii.gz")), study, description, "TCGA-FG-6692", number, "1.2.3"
        )
    dataset = build_slice_dataset(tmp_path, ["T1", "T2"], "FLAIR", (256, 256), progress=False, **FAST_REGISTRATION)
    assert dataset.case_ids == ["TCGA-FG-6692"] and 10 < len(dataset) <= 26

    inference = build_inference_dataset(tmp_path, ["T1", "T2"], (256, 256), **FAST_REGISTRATION)
    item = inference[0]
    assert item["image"].shape == (2, 256, 256, 26) and "target" not in item
    item["pred"] = item["image"][1:].clone()
    restored = restore_geometry_transforms(inference.transform, "pred")(item)["pred"]
    t2 = sitk.ReadImage(str(native / "t2.nii.gz"))
    read_back = metatensor_to_sitk(restored)  # the T2 grid again (as DICOM stores it: slices in row x column order)
    assert read_back.GetSize() == t2.GetSize()
    read_back, t2 = sitk.DICOMOrient(read_back, "LPS"), sitk.DICOMOrient(t2, "LPS")
    for getter in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(read_back, getter)(), getattr(t2, getter)(), atol=1e-3)
    # nothing was cropped (224 x 256 padded to 256 x 256): the T2 channel comes back voxel for voxel
    raw = sitk.GetArrayFromImage(t2).astype(np.float32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(read_back), np.clip(raw / np.percentile(raw, 99.5), 0, 1))


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


# --- the caches are used only while a case's files are those they were built from --------------------------------


def _copied_case(source: Path, destination: Path) -> dict:
    """A shipped case copied into ``destination`` (so that its files can be replaced), as discovery finds it."""
    shutil.copytree(source, destination)
    (case,) = discover_cases(destination, required=["T1", "T2", "FLAIR"]).cases
    return case


def _replace_with_flipped(path: str) -> None:
    """Writes the image at ``path`` again under the same name, its voxels flipped left-right (a different image on
    the same grid, as a skull stripping or registration run again in place gives)."""
    image = nib.load(path)
    flipped = nib.Nifti1Image(np.ascontiguousarray(np.asarray(image.dataobj)[::-1]), image.affine, image.header)
    nib.save(flipped, path)


def _reference_target(case: dict) -> torch.Tensor:
    """The T1 (target) slices built from the files as they are now, without any cache."""
    fresh = slice_dataset([case], ["T2", "FLAIR"], "T1", (240, 240), progress=False)
    return torch.stack([fresh[i]["target"] for i in range(len(fresh))])


def _targets(dataset: SliceDataset) -> torch.Tensor:
    return torch.stack([dataset[i]["target"] for i in range(len(dataset))])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])  # .nii: the new file has exactly the old one's size
def test_a_slice_cache_entry_is_built_again_when_a_file_is_replaced_under_the_same_name(tmp_path, caplog, suffix):
    case = _copied_case(DATA / "brats2023-mets" / "aurora-example", tmp_path / "aurora-example")
    if suffix == ".nii":
        t1 = tmp_path / "aurora-example" / "t1.nii"
        nib.save(nib.load(case["T1"]), t1)
        Path(case["T1"]).unlink()
        case["T1"] = str(t1)
    cache = tmp_path / "cache"
    first = slice_dataset([case], ["T2", "FLAIR"], "T1", (240, 240), cache_dir=cache, progress=False)
    (record_file,) = cache.rglob("*.json")
    before = Path(case["T1"]).stat()

    _replace_with_flipped(case["T1"])  # same name, new content
    assert suffix == ".nii.gz" or Path(case["T1"]).stat().st_size == before.st_size
    expected = _reference_target(case)
    assert not torch.equal(expected, _targets(first))  # the old slices really differ from the new image's
    with caplog.at_level("INFO", logger="agi_monai.data.datasets"):
        again = slice_dataset([case], ["T2", "FLAIR"], "T1", (240, 240), cache_dir=cache, progress=False)
    assert torch.equal(_targets(again), expected)  # the new T1's slices, not the cached ones
    (line,) = [r.getMessage() for r in caplog.records if "built again" in r.getMessage() and "aurora" in r.getMessage()]
    assert line.startswith(f"aurora-example: T1 changed since it was cached ({Path(case['T1']).resolve()}")
    assert "1 stale volumes built again" in caplog.text and "read from" not in caplog.text
    # replaced, not added beside: one slice file, its record listing every file the case names, resolved
    assert len(list(cache.rglob("*.npy"))) == 1
    recorded = json.loads(record_file.read_text())["sources"]
    assert sorted(recorded) == ["FLAIR", "T1", "T1Gd", "T2"]
    now = Path(case["T1"]).stat()
    assert [entry[:3] for entry in recorded["T1"]] == [[str(Path(case["T1"]).resolve()), now.st_size, now.st_mtime_ns]]
    assert now.st_mtime_ns != before.st_mtime_ns

    # built from the current files, the entry is read again by the next build
    caplog.clear()
    with caplog.at_level("INFO", logger="agi_monai.data.datasets"):
        third = SliceDataset(_exploding_volumes([case]), storage_dir=record_file.parent, progress=False)
    assert torch.equal(_targets(third), expected) and "read from" in caplog.text and "built again" not in caplog.text


def test_a_file_touched_but_unchanged_keeps_its_cached_slices(tmp_path, caplog):
    case = _copied_case(DATA / "brats2023-mets" / "aurora-example", tmp_path / "aurora-example")
    cache = tmp_path / "cache"
    first = slice_dataset([case], ["T2", "FLAIR"], "T1", (240, 240), cache_dir=cache, progress=False)
    (record_file,) = cache.rglob("*.json")
    status = Path(case["T1"]).stat()
    os.utime(case["T1"], ns=(status.st_atime_ns, status.st_mtime_ns + 5_000_000_000))  # e.g. `touch`, `cp` again
    with caplog.at_level("INFO", logger="agi_monai.data.datasets"):
        again = SliceDataset(_exploding_volumes([case]), storage_dir=record_file.parent, progress=False)
    assert torch.equal(_targets(again), _targets(first))
    assert "read from" in caplog.text and "built again" not in caplog.text
    # the record now holds the new time: the next check is a stat again, no hash
    assert json.loads(record_file.read_text())["sources"]["T1"][0][2] == status.st_mtime_ns + 5_000_000_000


def test_a_slice_file_of_an_earlier_version_without_a_record_of_its_files_is_built_again(tmp_path, caplog):
    case = _copied_case(DATA / "brats2023-mets" / "aurora-example", tmp_path / "aurora-example")
    cache = tmp_path / "cache"
    first = slice_dataset([case], ["T2", "FLAIR"], "T1", (240, 240), cache_dir=cache, progress=False)
    (record_file,) = cache.rglob("*.json")
    record = json.loads(record_file.read_text())
    del record["sources"]  # as an earlier version wrote it
    record_file.write_text(json.dumps(record))
    with caplog.at_level("INFO", logger="agi_monai.data.datasets"):
        again = slice_dataset([case], ["T2", "FLAIR"], "T1", (240, 240), cache_dir=cache, progress=False)
    assert "aurora-example: cached without a record of its files (by an earlier version)" in caplog.text
    assert torch.equal(_targets(again), _targets(first)) and "sources" in json.loads(record_file.read_text())
    # an entry of an earlier preprocessing (before the coverage restriction): built again too
    record = json.loads(record_file.read_text())
    record["preprocessing_version"] = 1
    record_file.write_text(json.dumps(record))
    with caplog.at_level("INFO", logger="agi_monai.data.datasets"):
        slice_dataset([case], ["T2", "FLAIR"], "T1", (240, 240), cache_dir=cache, progress=False)
    assert f"aurora-example: built by an earlier preprocessing (version 1, now {PREPROCESSING_VERSION})" in caplog.text
    assert json.loads(record_file.read_text())["preprocessing_version"] == PREPROCESSING_VERSION


def test_a_volume_cache_entry_is_built_again_when_a_file_is_replaced_under_the_same_name(tmp_path, caplog):
    case = _copied_case(DATA / "brats2023-mets" / "aurora-example", tmp_path / "aurora-example")
    preprocessing = preprocessing_transforms(["T2", "FLAIR"], "T1", spatial_size=(240, 240))
    cache = tmp_path / "volumes"
    old = build_volume_dataset([case], preprocessing, cache)[0]["target"]
    (entry,) = cache.glob("*.pt")
    _replace_with_flipped(case["T1"])
    with caplog.at_level("INFO", logger="agi_monai.data.datasets"):
        cached = build_volume_dataset([case], preprocessing, cache)[0]["target"]
    uncached = build_volume_dataset([case], preprocessing)[0]["target"]
    assert not torch.equal(torch.as_tensor(old), torch.as_tensor(uncached))
    assert torch.equal(torch.as_tensor(cached), torch.as_tensor(uncached))
    assert "aurora-example: T1 changed since it was cached" in caplog.text
    assert list(cache.glob("*.pt")) == [entry]  # replaced in place, no stale file left beside it
    assert entry.with_suffix(".sources.json").is_file()

    # an entry of an earlier version (no record): built again; a touched file keeps the entry
    entry.with_suffix(".sources.json").unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="agi_monai.data.datasets"):
        build_volume_dataset([case], preprocessing, cache)[0]
    assert "cached without a record of its files" in caplog.text
    status = Path(case["T1"]).stat()
    os.utime(case["T1"], ns=(status.st_atime_ns, status.st_mtime_ns + 5_000_000_000))
    caplog.clear()

    def no_loading(self, data):
        raise AssertionError("the volume should come from the cache")

    with caplog.at_level("INFO", logger="agi_monai.data.datasets"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(LoadVolumed, "__call__", no_loading)
        touched = build_volume_dataset([case], preprocessing, cache)[0]["target"]
    assert torch.equal(torch.as_tensor(touched), torch.as_tensor(uncached)) and "built again" not in caplog.text


def test_each_file_of_a_dicom_series_is_checked(tmp_path):
    from agi_monai.data.datasets import _check_sources, _source_record

    def record(sources):  # as an entry's record holds them
        return {"sources": sources, "preprocessing_version": PREPROCESSING_VERSION}

    t2 = sitk.ReadImage(str(DATA / "tcga-lgg" / "TCGA-FG-6692-native" / "t2.nii.gz"))
    files = sorted(str(f) for f in write_dicom_series(t2, tmp_path / "t2", "AX T2 FSE", "TCGA-FG-6692", 1))
    # the three ways a case names a series: its folder, its files, one echo of its files
    item = {"case_id": "TCGA-FG-6692", "T2": str(tmp_path / "t2"), "T1": files,
            "PD": {"files": files, "echo_time": 9.0}}
    recorded = _source_record(item)
    assert [len(recorded[key]) for key in ("T2", "T1", "PD")] == [len(files)] * 3
    assert _check_sources(record(recorded), item) == (None, None)

    # one slice's file written again with another pixel value (same size; its time set apart from the build's, as
    # a later run's would be)
    data = Path(files[10]).read_bytes()
    Path(files[10]).write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    status = Path(files[10]).stat()
    os.utime(files[10], ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    reason, _ = _check_sources(record(recorded), item)  # keys in order: PD (an echo's files) first
    assert reason == f"PD changed since it was cached ({Path(files[10]).resolve()}: modified, other content)"
    assert _check_sources(record({**recorded, "PD": _source_record(item)["PD"]}), item)[0].startswith("T1 changed")

    # a file added to the series folder
    recorded = _source_record(item)
    shutil.copy(files[0], tmp_path / "t2" / "extra.dcm")
    assert _check_sources(record(recorded), item)[0] == "T2 changed since it was cached (other files: 1 added, 0 gone)"


_RANK_BUILD = """
import json, sys
import torch.distributed as dist
from monai.data import Dataset
from agi_monai.data import SliceDataset, build_volume_dataset, preprocessing_transforms

dist.init_process_group("gloo")
cases, storage, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
preprocessing = preprocessing_transforms(["T2", "FLAIR"], "T1", spatial_size=(240, 240))
built = []
real_build = SliceDataset._build
def recording_build(self, volumes, pending, *args):  # which volumes this rank preprocessed itself
    built.extend(pending)
    return real_build(self, volumes, pending, *args)
SliceDataset._build = recording_build
dataset = SliceDataset(build_volume_dataset(cases, preprocessing), storage_dir=storage, progress=False)
result = {"case_ids": dataset.case_ids, "failures": [f.case_id for f in dataset.failures], "built": built,
          "first": dataset[0]["image"].sum().item()}
json.dump(result, open(f"{out}/rank{dist.get_rank()}.json", "w"))
dist.destroy_process_group()
"""


def test_ranks_of_a_distributed_run_share_the_preprocessing_into_one_cache(brats_cases, tmp_path):
    """Two gloo processes (as multi_gpu_train.json runs) build one dataset of three cases, one of them bad, into one
    cache: each preprocesses the cases it owns (index mod 2), reads the other's, and both hold the same volumes and
    list the same failure (the bad case, tried by both)."""
    broken = dict(brats_cases[0], case_id="broken", T2=str(tmp_path / "gone-t2w.nii.gz"))
    cases = [brats_cases[0], brats_cases[2], broken]
    script = tmp_path / "rank_build.py"
    script.write_text(_RANK_BUILD)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               json.dumps(cases), str(tmp_path / "slices"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, seen in enumerate(ranks):
        assert seen["case_ids"] == ["BraTS-GLI-00001-000", "aurora-example"] and seen["failures"] == ["broken"]
    # rank 0 owns cases 0 and 2 (the bad one), rank 1 case 1, and then tries the bad case itself
    assert sorted(ranks[0]["built"]) == [0, 2] and sorted(ranks[1]["built"]) == [1, 2]
    assert ranks[0]["first"] == ranks[1]["first"]
    assert len(list((tmp_path / "slices").glob("*.npy"))) == 2
