"""Loading one volume: the real files load with their geometry; every kind of bad file gets a clear error."""

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from agi_monai.data import DataError, load_volume, metatensor_to_sitk, sitk_to_metatensor
from helpers import DATA

NATIVE_T2 = DATA / "tcga-lgg" / "TCGA-FG-6692-native" / "t2.nii.gz"


def test_real_volume_loads_channel_first_with_its_affine():
    volume = load_volume(NATIVE_T2)
    image = nib.load(NATIVE_T2)
    assert volume.shape == (1, 224, 256, 26) and str(volume.dtype) == "torch.float32"
    np.testing.assert_allclose(volume.affine.numpy(), image.affine, atol=1e-4)
    np.testing.assert_array_equal(volume[0].numpy(), image.get_fdata(dtype=np.float32))
    assert volume.meta["filename_or_obj"] == str(NATIVE_T2)


def test_simpleitk_conversion_matches_simpleitk_reading_an_oblique_file():
    converted = metatensor_to_sitk(load_volume(NATIVE_T2))
    reference = sitk.ReadImage(str(NATIVE_T2))
    np.testing.assert_allclose(converted.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(converted.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(converted.GetDirection(), reference.GetDirection(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(sitk_to_metatensor(converted).affine.numpy(), nib.load(NATIVE_T2).affine, atol=1e-4)


def _save(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    real = NATIVE_T2.read_bytes()
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(real[: len(real) // 2])
    text = folder / "text.nii.gz"
    text.write_text("patient notes, not an image")
    gzipped_text = folder / "gzipped-text.nii.gz"
    gzipped_text.write_bytes(gzip.compress(b"not an image" * 100))
    volume = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    with_nan = volume.copy()
    with_nan[1, 2, 3], with_nan[4, 4, 4] = np.nan, np.inf
    return {
        "truncated": (truncated, "is truncated or its compressed data is corrupt"),
        "not gzip": (text, "is not a NIfTI file"),
        "gzip, not NIfTI": (gzipped_text, "is not a NIfTI file"),
        "missing": (folder / "missing.nii.gz", "file not found"),
        "NaN/Inf": (_save(folder / "nan.nii.gz", with_nan), "contains 2 NaN/Inf voxels"),
        "constant": (
            _save(folder / "constant.nii.gz", np.full((8, 8, 8), 7, np.int16)),
            r"is constant \(every voxel is 7\)",
        ),
        "empty": (_save(folder / "empty.nii.gz", np.zeros((8, 8, 8), np.int16)), r"is constant \(every voxel is 0\)"),
        "2D": (_save(folder / "plane.nii.gz", volume[0]), r"has 2 dimensions, shape \(8, 8\)"),
        "single slice": (_save(folder / "slice.nii.gz", volume[:, :, :1]), "is a single 2D slice"),
        "4D": (
            _save(folder / "series.nii.gz", np.stack([volume, volume], -1)),
            r"has 4 dimensions, shape \(8, 8, 8, 2\)",
        ),
        "no extension": (folder / "volume.img", "has no NIfTI extension"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "not gzip",
        "gzip, not NIfTI",
        "missing",
        "NaN/Inf",
        "constant",
        "empty",
        "2D",
        "single slice",
        "4D",
        "no extension",
    ],
)
def test_bad_file_error_names_the_file_and_the_problem(tmp_path, case):
    (tmp_path / "volume.img").write_bytes(b"\0" * 10)
    path, problem = _bad_files(tmp_path)[case]
    with pytest.raises(DataError, match=problem) as raised:
        load_volume(path)
    assert raised.value.source == str(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_trailing_singleton_time_axis_is_still_3d(tmp_path):
    volume = np.random.default_rng(0).random((8, 8, 8, 1)).astype(np.float32)
    loaded = load_volume(_save(tmp_path / "t.nii.gz", volume))
    assert loaded.shape == (1, 8, 8, 8)
    np.testing.assert_array_equal(loaded[0].numpy(), volume[..., 0])  # the same voxels, not just the shape


def test_a_data_error_survives_a_dataloader_worker_with_every_part():
    # a worker process pickles the error it raised; the main process must report the same file, problem,
    # expectation and skipped cases, and each "(expected …)" must follow its own problem
    import pickle

    from agi_monai.data import MissingFileError

    error = DataError("datalist.json", "no case of the 'training' split has T1", "at least one case with T1",
                      "skipped case-0: a.nii.gz: file not found (expected an existing NIfTI file)")
    assert str(error) == ("datalist.json: no case of the 'training' split has T1 (expected at least one case with "
                          "T1); skipped case-0: a.nii.gz: file not found (expected an existing NIfTI file)")
    for original in (error, MissingFileError("a.nii.gz", "file not found", "an existing NIfTI file")):
        copy = pickle.loads(pickle.dumps(original))
        assert type(copy) is type(original) and str(copy) == str(original)
        assert (copy.source, copy.problem, copy.expected, copy.details) == (
            original.source, original.problem, original.expected, original.details)
