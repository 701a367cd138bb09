"""Intensity normalization, foreground mask, the preprocessing chain, geometry restoration and the
misalignment transforms, on the shipped images."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from agi_monai.data import (
    AddForegroundMaskd,
    DataError,
    LoadVolumed,
    RandRigidMisalignChanneld,
    RandShiftChanneld,
    ScaleIntensityToPercentiled,
    discover_cases,
    preprocessing_transforms,
    restore_geometry_transforms,
    spacing_mismatch,
)
from helpers import DATA

BRATS_GLI = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
TCGA_T2 = DATA / "tcga-lgg" / "TCGA-FG-6692" / "OtherEXampleFromTCIA_t2_bet.nii.gz"


def _normalized(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    raw = nib.load(path).get_fdata(dtype=np.float32)
    item = ScaleIntensityToPercentiled("x")(LoadVolumed("x")({"x": str(path)}))
    return raw, item["x"][0].numpy(), item["x"].meta["intensity_percentile_value"]


@pytest.mark.parametrize(
    "path", [BRATS_GLI / "BraTS-GLI-00001-000-t1n.nii.gz", TCGA_T2], ids=["brats-t1n", "tcga-t2-negative"]
)
def test_normalization_maps_zero_and_the_995th_percentile_to_0_and_1(path):
    raw, normalized, upper = _normalized(path)
    assert upper == pytest.approx(np.percentile(raw, 99.5))
    assert normalized.min() == 0.0 and normalized.max() == 1.0
    assert (normalized == 1.0).mean() == pytest.approx((raw >= upper).mean())  # only the top 0.5 % saturate
    assert 0.004 <= (normalized == 1.0).mean() <= 0.006
    assert (normalized == 0.0).mean() == pytest.approx((raw <= 0).mean())  # negatives clip to 0, not a shifted min
    inside = (raw > 0) & (raw < upper)
    np.testing.assert_allclose(normalized[inside], raw[inside] / upper, rtol=1e-5)


def test_normalization_rejects_a_volume_without_positive_intensities(tmp_path):
    values = np.zeros((20, 20, 20), np.float32)
    values[:2, :2, :2] = 5.0  # 8 voxels: the 99.5th percentile is still 0
    path = tmp_path / "dark.nii.gz"
    nib.save(nib.Nifti1Image(values, np.eye(4)), path)
    with pytest.raises(DataError, match=r"dark.nii.gz: has its 99.5th intensity percentile at 0"):
        ScaleIntensityToPercentiled("x")(LoadVolumed("x")({"x": str(path)}))


def test_foreground_mask_of_a_skull_stripped_brain_is_the_brain():
    raw, normalized, _ = _normalized(BRATS_GLI / "BraTS-GLI-00001-000-t2w.nii.gz")
    mask = AddForegroundMaskd("image")({"image": torch.from_numpy(normalized)[None]})["mask"][0].numpy() > 0
    brain = raw > 0
    dice = 2 * (mask & brain).sum() / (mask.sum() + brain.sum())
    assert dice > 0.95


@pytest.fixture(scope="module")
def cases() -> dict[str, dict]:
    return {case["case_id"]: case for case in discover_cases(DATA).cases}


def test_preprocessing_stacks_inputs_in_scenario_order(cases):
    item = preprocessing_transforms(["FLAIR", "T1"], "T2", spatial_size=(240, 240))(cases["BraTS-GLI-00001-000"])
    assert item["image"].shape == (2, 240, 240, 155) and item["target"].shape == (1, 240, 240, 155)
    assert item["mask"].shape == (1, 240, 240, 155) and set(torch.unique(item["mask"]).tolist()) == {0.0, 1.0}
    assert not {"T1", "T2", "FLAIR"} & set(item)  # the per-contrast volumes are not kept twice
    for channel, name in enumerate(["t2f", "t1n"]):
        image = nib.as_closest_canonical(
            nib.load(BRATS_GLI / f"BraTS-GLI-00001-000-{name}.nii.gz")
        )  # RAS, as the chain
        raw = image.get_fdata(dtype=np.float32)
        expected = np.clip(raw / np.percentile(raw, 99.5), 0, 1)
        np.testing.assert_allclose(item["image"][channel].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(item["registration"]["T1"], np.eye(4))


@pytest.mark.parametrize(
    "case_id, inputs, target, size",
    [
        ("aurora-example", ["T1", "T2"], "FLAIR", (256, 256)),  # RAS header, padded
        ("BraTS-GLI-00001-000", ["T2", "FLAIR"], "T1", (200, 256)),  # LPS header, cropped and padded
        ("TCGA-FG-6692-native", ["T2", "T1"], "FLAIR", (256, 256)),  # oblique, other contrasts on other grids
    ],
)
def test_inference_items_restore_the_reference_geometry(cases, tmp_path, case_id, inputs, target, size):
    # header alignment is enough here: the reference is never resampled, registration is tested elsewhere
    preprocessing = preprocessing_transforms(inputs, target, spatial_size=size, registration="header")
    item = preprocessing(cases[case_id])
    assert item["image"].shape[1:3] == size
    reference_path = cases[case_id][inputs[0]]  # T2 is the reference of every scenario here
    reference = nib.load(reference_path)
    item["pred"] = MetaTensor(
        item["image"][:1].clone(), meta=item["image"].meta, applied_operations=item["image"].applied_operations
    )
    restored = restore_geometry_transforms(preprocessing, "pred", output_dir=tmp_path, output_postfix="synth")(item)
    assert restored["pred"].shape[1:] == reference.shape
    np.testing.assert_allclose(restored["pred"].affine.numpy(), reference.affine, atol=1e-4)
    raw = reference.get_fdata(dtype=np.float32)
    expected = np.clip(raw / np.percentile(raw, 99.5), 0, 1)
    if size[0] >= reference.shape[0]:  # nothing cropped away: the round trip is exact
        np.testing.assert_allclose(restored["pred"][0].numpy(), expected, atol=1e-5)
    written = nib.load(tmp_path / f"{case_id}_synth.nii.gz")
    assert written.shape == reference.shape and np.allclose(written.affine, reference.affine, atol=1e-4)


def _centre_of_mass(image: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij")
    return np.array([(grid * image).sum() / image.sum() for grid in grids])


@pytest.fixture(scope="module")
def brats_slices() -> torch.Tensor:
    planes = [nib.load(BRATS_GLI / f"BraTS-GLI-00001-000-{n}.nii.gz").dataobj[:, :, 80] for n in ("t1n", "t2w")]
    return torch.from_numpy(np.stack(planes).astype(np.float32))


@pytest.mark.parametrize("level", [0.0, 0.5, 1.5, 3.0])
def test_shift_moves_only_the_chosen_channel_by_the_level(brats_slices, level):
    shift = RandShiftChanneld("image", magnitude_px=(level, level), channel=1)
    shift.set_random_state(seed=int(level * 10))
    moved = shift({"image": brats_slices})["image"]
    torch.testing.assert_close(moved[0], brats_slices[0])
    displacement = _centre_of_mass(moved[1].numpy()) - _centre_of_mass(brats_slices[1].numpy())
    assert np.linalg.norm(displacement) == pytest.approx(level, abs=0.02)
    assert np.linalg.norm(shift.shift) == pytest.approx(level)


def test_in_plane_shift_of_a_volume_moves_every_slice_alike():
    volume = torch.from_numpy(nib.load(BRATS_GLI / "BraTS-GLI-00001-000-t2w.nii.gz").get_fdata(dtype=np.float32)[None])
    shift = RandShiftChanneld("image", magnitude_px=(2.5, 2.5), channel=0, in_plane=True)
    shift.set_random_state(seed=1)
    moved = shift({"image": volume})["image"]
    assert shift.shift[2] == 0.0 and np.linalg.norm(shift.shift) == pytest.approx(2.5)
    # MONAI's Affine samples at x + shift, so the content moves by -shift: in-plane, on every slice
    for planes in (
        (moved[0], volume[0]),
        (moved[0, ..., 60], volume[0, ..., 60]),
        (moved[0, ..., 100], volume[0, ..., 100]),
    ):
        displacement = _centre_of_mass(planes[0].numpy()) - _centre_of_mass(planes[1].numpy())
        np.testing.assert_allclose(displacement, -shift.shift[: displacement.size], atol=0.02)


def test_shift_picks_a_channel_at_random_reproducibly(brats_slices):
    chosen = []
    for seed in range(6):
        shift = RandShiftChanneld("image", magnitude_px=(1.0, 1.0))
        shift.set_random_state(seed=seed)
        shift({"image": brats_slices})
        chosen.append(shift.shifted_channel)
    assert set(chosen) == {0, 1}
    again = RandShiftChanneld("image", magnitude_px=(1.0, 1.0)).set_random_state(seed=3)
    again({"image": brats_slices})
    assert again.shifted_channel == chosen[3]


def test_rigid_misalignment_in_mm_and_degrees_matches_simpleitk():
    t2 = nib.load(DATA / "ixi-sim" / "IXI901-SIM-0001-T2.nii.gz")  # anisotropic 1.875 x 1.875 x 2.4 mm
    volume = torch.from_numpy(np.stack([t2.get_fdata(dtype=np.float32)] * 2))
    spacing = np.array(t2.header.get_zooms())
    image = MetaTensor(volume, affine=torch.as_tensor(np.diag([*spacing, 1.0])))
    misalign = RandRigidMisalignChanneld("image", rotation_deg=(4.0, 4.0), translation_mm=(3.0, 3.0), channel=0)
    misalign.set_random_state(seed=0)
    moved = misalign({"image": image})["image"]
    torch.testing.assert_close(moved[1], volume[1])
    angle = np.degrees(np.arccos((np.trace(misalign.rotation) - 1) / 2))
    assert angle == pytest.approx(4.0) and np.linalg.norm(misalign.translation) == pytest.approx(3.0)

    # the same motion with SimpleITK: the content moves by x -> R x + t about the volume centre (mm)
    original = sitk.GetImageFromArray(volume[0].numpy().transpose(2, 1, 0))
    original.SetSpacing(spacing.tolist())
    original.SetOrigin((-(np.array(volume.shape[1:]) - 1) / 2 * spacing).tolist())
    motion = sitk.AffineTransform(misalign.rotation.flatten().tolist(), misalign.translation.tolist())
    expected = sitk.GetArrayFromImage(
        sitk.Resample(original, original, motion.GetInverse(), sitk.sitkLinear, 0.0)
    ).transpose(2, 1, 0)
    difference = np.abs(moved[0].numpy() - expected)
    assert np.percentile(difference, 99) < 0.01 * volume.max().item()


def test_rigid_misalignment_needs_a_volume(brats_slices):
    with pytest.raises(ValueError, match=r"needs \(C, X, Y, Z\) volumes"):
        RandRigidMisalignChanneld("image")({"image": brats_slices})


BUNDLES = Path(__file__).parents[1] / "bundles"


def _training_spacing(bundle: str) -> list[float]:
    import json

    return json.loads((BUNDLES / bundle / "configs" / "inference.json").read_text(encoding="utf-8"))["training_spacing"]


def test_3d_bundle_compares_the_slice_spacing_too(cases, caplog):
    """The native TCGA T2 (0.9 mm in plane, 5.5 mm slices) through the 3D bundle (1 mm isotropic training data):
    warned about, naming the three spacings; through the 2D bundle of the same scenario, which works slice by
    slice, not (in plane it is within 25 % of 1 mm). The 3D bundle's warning comes from the synthesis loop itself."""
    import logging

    from monai.inferers import SimpleInferer

    from agi_monai.bundle.inference import FolderSynthesis
    from agi_monai.data import build_volume_dataset

    spacing_2d, spacing_3d = _training_spacing("brats_t1_t2_flair_to_t1gd"), _training_spacing(
        "brats_t1_t2_flair_to_t1gd_3d"
    )
    assert spacing_2d == [1.0, 1.0] and spacing_3d == [1.0, 1.0, 1.0]
    case = {"case_id": "TCGA-FG-6692-native", "T2": cases["TCGA-FG-6692-native"]["T2"]}
    dataset = build_volume_dataset([case], preprocessing_transforms(["T2"], None, (256, 256), crop=False))
    image = dataset[0]["image"]
    assert spacing_mismatch(image, spacing_2d) is None
    expected = (
        "spacing 0.898 x 0.898 x 5.5 mm, the bundle's training data 1 x 1 x 1 mm: the network sees the anatomy at "
        "another scale than it learned"
    )
    assert spacing_mismatch(image, spacing_3d).startswith(expected)
    caplog.set_level(logging.WARNING, "agi_monai.bundle.inference")
    synthesis = FolderSynthesis(
        dataset, torch.nn.Identity(), SimpleInferer(), lambda item: None, "unused", "T1Gd", progress=False,
        training_spacing=spacing_3d,
    )
    synthesis._synthesize(0)
    assert any(r.getMessage().startswith(f"TCGA-FG-6692-native: {expected}") for r in caplog.records)


def test_spacing_mismatch_checks_its_training_spacing():
    image = MetaTensor(torch.zeros(1, 8, 8, 4), affine=torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0])))
    assert spacing_mismatch(image, [1.0, 1.0, 3.5]) is None  # within 25 % on every axis
    assert spacing_mismatch(image, [1.0, 1.0]) is None  # a 2D bundle: in plane only
    assert spacing_mismatch(image, [1.0, 1.0, 1.0]).startswith("spacing 1 x 1 x 3 mm, the bundle's training data 1 x 1 x 1 mm")
    for wrong in ([1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0]):
        with pytest.raises(ValueError, match="expected two positive spacings in mm"):
            spacing_mismatch(image, wrong)


def _synthesize_onto_t2(tmp_path: Path, forms: dict) -> tuple[Path, dict]:
    """A BraTS T1 and T2 slab written with the header forms ``{contrast: (sform_code, qform_code, qform shift mm)}``,
    taken through the preprocessing (reference T2) and written back as a synthesis: the output and the inputs."""
    files = {}
    for contrast, suffix in (("T1", "t1n"), ("T2", "t2w")):
        sform_code, qform_code, shift = forms[contrast]
        image = nib.load(BRATS_GLI / f"BraTS-GLI-00001-000-{suffix}.nii.gz").slicer[:, :, 76:80]
        qform = image.affine.copy()
        qform[0, 3] += shift
        image.set_sform(image.affine, code=sform_code)
        image.set_qform(qform, code=qform_code)
        files[contrast] = tmp_path / f"case-{suffix}.nii.gz"
        nib.save(image, files[contrast])
    preprocessing = preprocessing_transforms(["T1", "T2"], None, spatial_size=(240, 240), reference="T2")
    item = preprocessing({"case_id": "case", **{k: str(v) for k, v in files.items()}})
    item["pred"] = MetaTensor(
        item["image"][:1].clone(), meta=item["image"].meta, applied_operations=item["image"].applied_operations
    )
    restore_geometry_transforms(preprocessing, "pred", output_dir=tmp_path / "out", output_postfix="synth")(item)
    return tmp_path / "out" / "case_synth.nii.gz", files


def test_outputs_take_the_reference_contrasts_form_codes(tmp_path):
    """The output lies on the reference's grid, so its sform/qform codes are the reference's, also when the first
    input (whose metadata the stacked image carries) shares that grid but says it maps to another space."""
    output, files = _synthesize_onto_t2(tmp_path, {"T1": (1, 1, 0.0), "T2": (2, 0, 0.0)})
    written = nib.load(output)
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (2, 0)
    assert [int(nib.load(f).header["sform_code"]) for f in files.values()] == [1, 2]  # inputs unchanged


def test_outputs_keep_a_reference_qform_that_differs_from_its_sform(tmp_path):
    """A reference whose qform lies 3 mm from its sform: nibabel and MONAI place it by the sform, ITK by the qform.
    The output keeps both (its qform was the sform), so that every reader places it where it places the reference."""
    output, files = _synthesize_onto_t2(tmp_path, {"T1": (2, 1, 0.0), "T2": (2, 1, 3.0)})
    written, reference = nib.load(output), nib.load(files["T2"])
    np.testing.assert_allclose(written.header.get_sform(), reference.header.get_sform(), atol=1e-4)
    np.testing.assert_allclose(written.header.get_qform(), reference.header.get_qform(), atol=1e-4)
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (2, 1)
    itk_origin = lambda path: np.array(sitk.ReadImage(str(path)).GetOrigin())  # noqa: E731
    np.testing.assert_allclose(itk_origin(output), itk_origin(files["T2"]), atol=1e-3)


def test_rigid_all_registers_a_contrast_on_the_references_grid_that_moved(tmp_path):
    """Two acquisitions of one slice prescription share a header grid, the head having moved between them: "rigid"
    trusts the header (identity), "rigid_all" registers them and finds the motion (here 6 degrees about z)."""
    t1 = sitk.ReadImage(str(BRATS_GLI / "BraTS-GLI-00001-000-t1n.nii.gz"), sitk.sitkFloat32)[40:200, 30:210, 30:120]
    motion = sitk.Euler3DTransform()
    motion.SetCenter(t1.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in t1.GetSize()]))
    motion.SetRotation(0.0, 0.0, np.radians(6.0))
    moved = sitk.Resample(t1, t1, motion, sitk.sitkLinear, 0.0)  # the same grid, the head turned
    files = {"T1": tmp_path / "case-t1n.nii.gz", "T2": tmp_path / "case-t2w.nii.gz"}
    sitk.WriteImage(t1, str(files["T1"]))
    sitk.WriteImage(moved, str(files["T2"]))
    angles = {}
    for registration in ("rigid", "rigid_all"):
        preprocessing = preprocessing_transforms(["T1", "T2"], None, spatial_size=(240, 240), reference="T2",
                                                 registration=registration)
        matrix = preprocessing({"case_id": "case", **{k: str(v) for k, v in files.items()}})["registration"]["T1"]
        angles[registration] = float(np.degrees(np.arccos(np.clip((np.trace(matrix[:3, :3]) - 1) / 2, -1, 1))))
    assert angles["rigid"] == 0.0
    assert abs(angles["rigid_all"] - 6.0) < 0.5, angles
    with pytest.raises(ValueError, match="registration must be one of 'rigid', 'rigid_all', 'header', got 'all'"):
        preprocessing_transforms(["T1", "T2"], None, spatial_size=(240, 240), registration="all")
