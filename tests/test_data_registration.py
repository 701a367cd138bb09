"""Rigid registration: accuracy against the ixi-sim ground truth, a measurable gain on the native TCGA
scans, and the errors for images of another subject, size or place.

Run with ``-s`` to print the measured numbers (docs/data.md quotes them).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import SimpleITK as sitk

from agi_monai.data import DataError, normalized_mutual_information, register_rigid, resample_to_reference
from helpers import DATA

SHARED = Path(__file__).parents[2] / "shared" / "data"
NATIVE = DATA / "tcga-lgg" / "TCGA-FG-6692-native"
IXI_HEAD_CENTRE_LPS = np.array([0.0, 17.0, 10.0])  # the ground truth's rotation centre (0, -17, 10) mm RAS


def _read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


def _errors(estimated_lps: np.ndarray, truth_lps: np.ndarray, reference: sitk.Image) -> tuple[float, float, float]:
    """Rotation error (deg), displacement error at the head centre (mm) and the largest displacement error
    over the reference field of view's corners (mm)."""
    difference = np.linalg.inv(truth_lps) @ estimated_lps
    angle = np.degrees(np.arccos(np.clip((np.trace(difference[:3, :3]) - 1) / 2, -1, 1)))
    corners = [
        reference.TransformIndexToPhysicalPoint([b * (n - 1) for b, n in zip(bits, reference.GetSize())])
        for bits in np.ndindex(2, 2, 2)
    ]
    points = np.array([IXI_HEAD_CENTRE_LPS, *corners])
    moved = (difference[:3, :3] @ points.T).T + difference[:3, 3]
    displacement = np.linalg.norm(moved - points, axis=1)
    return float(angle), float(displacement[0]), float(displacement[1:].max())


def _ixi_cases() -> list[tuple[Path, str]]:
    cases = [(DATA / "ixi-sim", "IXI901-SIM-0001")]
    if SHARED.is_dir():
        cases += [(SHARED / "ixi-sim", f"IXI901-SIM-000{n}") for n in (2, 3)]
    return cases


@pytest.mark.parametrize("folder, subject", _ixi_cases(), ids=lambda value: getattr(value, "name", value))
def test_ixi_sim_t1_to_t2_within_1mm_and_1deg(folder, subject):
    truth = np.array(
        json.loads((folder / "ground_truth_transforms.json").read_text(encoding="utf-8"))["subjects"][subject][
            "itk_lps_T1_from_T2"
        ]
    )
    reference, moving = _read(folder / f"{subject}-T2.nii.gz"), _read(folder / f"{subject}-T1.nii.gz")
    header_only = _errors(np.eye(4), truth, reference)
    result = register_rigid(reference, moving)
    angle, centre, corners = _errors(result.matrix_lps, truth, reference)
    print(
        f"\n{subject} T1->T2: rotation error {angle:.3f} deg, displacement error {centre:.3f} mm at the head centre, "
        f"{corners:.3f} mm at worst FOV corner (header only: {header_only[0]:.2f} deg, {header_only[1]:.2f} mm)"
    )
    assert header_only[0] > 1.0 and header_only[1] > 2.0  # the headers alone are off, as with real IXI
    assert angle < 1.0 and centre < 1.0 and corners < 1.0


@pytest.fixture(scope="module")
def native_t2() -> sitk.Image:
    return _read(NATIVE / "t2.nii.gz")


@pytest.mark.parametrize("contrast", ["t1", "t1c", "flair"])
def test_native_tcga_registration_improves_mutual_information(native_t2, contrast):
    moving = _read(NATIVE / f"{contrast}.nii.gz")
    result = register_rigid(native_t2, moving, moving_name=contrast)
    inside = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(moving)
    reference = sitk.GetArrayFromImage(native_t2)
    scores = []
    for transform in (None, result.transform):  # header-only resampling, then registered
        resampled = sitk.GetArrayFromImage(resample_to_reference(moving, native_t2, transform))
        covered = sitk.GetArrayFromImage(resample_to_reference(inside, native_t2, transform, "nearest")) > 0
        scores.append(normalized_mutual_information(reference, resampled, covered))
    print(
        f"\nnative {contrast}->t2: NMI {scores[0]:.4f} header only -> {scores[1]:.4f} registered "
        f"({result.rotation_deg:.1f} deg, {result.translation_mm:.1f} mm)"
    )
    assert scores[1] > scores[0] + 0.05


def test_normalized_mutual_information_bounds():
    values = np.random.default_rng(0).random((16, 16, 16))
    assert normalized_mutual_information(values, values) == pytest.approx(2.0)
    assert normalized_mutual_information(values, np.random.default_rng(1).random((16, 16, 16))) < 1.1


def test_normalized_mutual_information_by_hand():
    # two bins; A = 0 0 0 1, B = 0 0 1 1: p(A) = (3/4, 1/4), p(B) = (1/2, 1/2), joint (0,0) 1/2, (0,1) 1/4,
    # (1,1) 1/4. In bits H(A) = 2 - 3/4 log2 3, H(B) = 1, H(A, B) = 3/2: NMI = (3 - 3/4 log2 3) / (3/2)
    first, second = np.array([0.0, 0.0, 0.0, 1.0]), np.array([0.0, 0.0, 1.0, 1.0])
    expected = (3 - 0.75 * np.log2(3)) / 1.5  # 1.2075
    assert normalized_mutual_information(first, second, bins=2) == pytest.approx(expected, rel=1e-12)
    # the mask drops the third voxel: A = 0 0 1, B = 0 0 1, identical: 2; without the mask it would be 1.2075
    mask = np.array([True, True, False, True])
    assert normalized_mutual_information(first, second, mask, bins=2) == pytest.approx(2.0, rel=1e-12)
    # independent halves: every joint cell 1/4, H(A) = H(B) = 1 bit, H(A, B) = 2 bits: NMI = 1
    assert normalized_mutual_information(np.array([0.0, 0, 1, 1]), np.array([0.0, 1, 0, 1]), bins=2) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def ixi_pair() -> tuple[sitk.Image, sitk.Image]:
    folder = DATA / "ixi-sim"
    return _read(folder / "IXI901-SIM-0001-T2.nii.gz"), _read(folder / "IXI901-SIM-0001-T1.nii.gz")


def _moved(image: sitk.Image, shift_mm=(0.0, 0.0, 0.0), scale: float = 1.0) -> sitk.Image:
    """The same pixels with another header: shifted, or with voxels ``scale`` times larger about the centre."""
    changed = sitk.Image(image)
    changed.SetSpacing([s * scale for s in image.GetSpacing()])
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    new_centre = np.array(changed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    changed.SetOrigin((np.array(changed.GetOrigin()) + centre - new_centre + np.array(shift_mm)).tolist())
    return changed


def test_field_of_view_elsewhere_is_rejected(ixi_pair):
    reference, moving = ixi_pair
    with pytest.raises(DataError, match=r"T1.nii.gz: overlaps the reference field of view by only 0%"):
        register_rigid(reference, _moved(moving, shift_mm=(0, 0, 400)), moving_name="T1.nii.gz")


@pytest.mark.parametrize("scale", [0.7, 1.3])
def test_head_of_another_size_is_rejected(ixi_pair, scale):
    reference, moving = ixi_pair
    with pytest.raises(
        DataError, match=r"T1.nii.gz: its head/brain mask matches the reference only with Dice 0\.[0-7]"
    ):
        register_rigid(reference, _moved(moving, scale=scale), moving_name="T1.nii.gz")


def test_motion_beyond_range_is_rejected(ixi_pair):
    reference, moving = ixi_pair
    with pytest.raises(
        DataError,
        match=r"T1.nii.gz: registration needed .* mm \(expected scans of one subject within 30 deg and 10 mm\)",
    ):
        register_rigid(reference, _moved(moving, shift_mm=(0, 0, 20)), moving_name="T1.nii.gz", max_translation_mm=10)


def test_coverage_mask_is_the_moving_field_of_view_on_the_reference_grid():
    """The native T1 (its own 5.5 mm slab and matrix) on the native T2 grid by header: 1 exactly at the T2 voxels
    whose centre falls inside the T1's voxel grid (computed here point by point with numpy), whatever the T1's
    intensities there (its air is 0 inside its field of view)."""
    from agi_monai.data.registration import coverage_mask

    reference, moving = _read(NATIVE / "t2.nii.gz"), _read(NATIVE / "t1.nii.gz")
    covered = sitk.GetArrayFromImage(coverage_mask(moving, reference)).transpose(2, 1, 0)  # (x, y, z) like the index
    assert covered.dtype == np.uint8 and covered.shape == reference.GetSize()

    def matrix(image: sitk.Image) -> np.ndarray:  # index -> LPS point
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
        affine[:3, 3] = image.GetOrigin()
        return affine

    index = np.stack(np.meshgrid(*[np.arange(n) for n in reference.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    inside_moving = (np.linalg.inv(matrix(moving)) @ matrix(reference) @ np.c_[index, np.ones(len(index))].T)[:3].T
    expected = np.all((inside_moving >= -0.5) & (inside_moving <= np.array(moving.GetSize()) - 0.5), axis=1)
    assert 0.5 < expected.mean() < 1.0  # the T1 slab covers part of the T2 grid only
    assert np.count_nonzero(covered.reshape(-1) != expected) <= 1e-4 * expected.size  # points on the border itself
    # what linear resampling fills (its zeros outside the field of view) is exactly this coverage
    ones = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving)
    linear = sitk.GetArrayFromImage(resample_to_reference(ones, reference)).transpose(2, 1, 0)
    np.testing.assert_array_equal(linear > 0, covered > 0)


def test_coverage_mask_of_a_skull_stripped_slab_ignores_its_zeros(tmp_path):
    """A BraTS FLAIR cut to slices 40-89 of its 155, on its own T2's grid: covered are exactly those 50 slices,
    the zeros around the brain (skull-stripped) included, which an intensity-based guess would call uncovered."""
    import nibabel as nib

    from agi_monai.data.registration import coverage_mask

    case = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
    nib.save(nib.load(case / "BraTS-GLI-00001-000-t2f.nii.gz").slicer[:, :, 40:90], tmp_path / "slab.nii.gz")
    reference, moving = _read(case / "BraTS-GLI-00001-000-t2w.nii.gz"), _read(tmp_path / "slab.nii.gz")
    covered = sitk.GetArrayFromImage(coverage_mask(moving, reference))  # (z, y, x)
    assert covered[40:90].all() and not covered[:40].any() and not covered[90:].any()
    intensities = sitk.GetArrayFromImage(resample_to_reference(moving, reference))
    assert np.count_nonzero(intensities[40:90] == 0) > 0.5 * covered.sum()  # mostly air, yet inside the slab


def test_a_contrast_stored_in_another_axis_order_is_reordered_exactly_not_registered(tmp_path):
    """The shipped BraTS-GLI case with its T1 saved in another storage order (nibabel: P, S, R instead of the file's
    L, P, S, i.e. sagittal slices, two axes flipped): the same voxel centres, so the chain resamples it by the header
    (identity transform) and the preprocessed volumes equal those of the case as shipped (to rounding). Registering
    it moved the T1 by 0.2-0.6 mm and blurred it."""
    import nibabel as nib

    from agi_monai.data import build_volume_dataset, preprocessing_transforms, same_grid, same_voxel_centres

    case = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
    files = {c: case / f"BraTS-GLI-00001-000-{t}.nii.gz" for c, t in (("T1", "t1n"), ("T2", "t2w"), ("FLAIR", "t2f"))}
    original = nib.load(files["T1"])
    to_psr = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(original.affine), nib.orientations.axcodes2ornt(("P", "S", "R"))
    )
    reordered = tmp_path / "t1-psr.nii.gz"
    nib.save(original.as_reoriented(to_psr), reordered)
    assert nib.aff2axcodes(nib.load(reordered).affine) == ("P", "S", "R")
    first, second = sitk.ReadImage(str(reordered)), sitk.ReadImage(str(files["FLAIR"]))
    assert same_voxel_centres(first, second) and not same_grid(first, second)
    shifted = sitk.Image(second)
    shifted.SetOrigin([o + 0.5 for o in second.GetOrigin()])  # half a voxel off: other centres
    assert not same_voxel_centres(first, shifted)

    chain = preprocessing_transforms(["T1", "T2"], "FLAIR", (240, 240), reference="T2")  # rigid registration
    shipped = build_volume_dataset([{"case_id": "c", **{k: str(v) for k, v in files.items()}}], chain)[0]
    stored = build_volume_dataset([{"case_id": "c", **{k: str(v) for k, v in files.items()}, "T1": str(reordered)}],
                                  chain)[0]
    np.testing.assert_array_equal(stored["registration"]["T1"], np.eye(4))
    for key in ("image", "target", "mask"):  # (the linear resampling at exact voxel centres: rounding only)
        torch.testing.assert_close(torch.as_tensor(stored[key]), torch.as_tensor(shipped[key]), rtol=0, atol=1e-9)
