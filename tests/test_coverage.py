"""Contrasts whose field of view covers only part of the reference grid (zero-filled there by the resampling):
training drops the slices they leave uncovered, evaluation measures only the voxels every contrast covers, and
inference warns about an input covering too little of the head. On the shipped BraTS case, cut to partial
coverage with nibabel's slicer (which keeps each cut file's affine: it lies where it lay in the scanner)."""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from agi_monai.data import (
    build_inference_dataset,
    build_slice_dataset,
    build_volume_dataset,
    discover_cases,
    patch_dataset,
    preprocessing_transforms,
)
from agi_monai.data.errors import failure_reason
from agi_monai.evaluation import volume_dataset
from helpers import DATA

BRATS = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
FILES = {"T1": "t1n", "T2": "t2w", "FLAIR": "t2f"}
HEADER = {"registration": "header"}  # the cut files lie exactly on the original grid: no registration to wait for
TRANSFORMS_LOGGER = "agi_monai.data.transforms"


def _case(folder: Path, case_id: str, slices: slice, cuts: dict[str, tuple[slice, slice, slice]]) -> Path:
    """``case_id``'s T1, T2 and FLAIR as the axial ``slices`` of the shipped case, each contrast in ``cuts`` cut
    further to its own (x, y, z) region of those."""
    folder.mkdir(parents=True, exist_ok=True)
    for contrast, token in FILES.items():
        image = nib.load(BRATS / f"BraTS-GLI-00001-000-{token}.nii.gz").slicer[:, :, slices]
        if contrast in cuts:
            image = image.slicer[cuts[contrast]]
        nib.save(image, folder / f"{case_id}-{token}.nii.gz")
    return folder


def _covered(item_image, path: Path) -> torch.Tensor:
    """(H, W, D) bool: the preprocessed grid's voxels whose centre lies inside ``path``'s voxel grid, from the two
    affines alone (independently of the code under test)."""
    shape = item_image.shape[1:]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = np.asarray(item_image.affine, dtype=np.float64) @ np.c_[index, np.ones(len(index))].T
    image = nib.load(path)
    voxel = (np.linalg.inv(image.affine) @ world)[:3].T
    inside = np.all((voxel >= -0.5) & (voxel <= np.array(image.shape) - 0.5), axis=1)
    return torch.from_numpy(inside.reshape(shape))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == TRANSFORMS_LOGGER and r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def slab(tmp_path_factory) -> dict[str, Path]:
    """80 axial slices; in "slab" the FLAIR covers only their lower 50 (its own 50-slice grid)."""
    root = tmp_path_factory.mktemp("coverage")
    whole = (slice(None), slice(None), slice(None))
    return {
        "intact": _case(root / "intact", "intact-01", slice(40, 120), {}),
        "slab": _case(root / "slab", "slab-01", slice(40, 120), {"FLAIR": (*whole[:2], slice(0, 50))}),
    }


def test_training_drops_the_slices_the_target_does_not_cover(slab, caplog):
    caplog.set_level(logging.WARNING, TRANSFORMS_LOGGER)
    intact = build_slice_dataset(slab["intact"], ["T1", "T2"], "FLAIR", (240, 240), progress=False, **HEADER)
    assert _warnings(caplog) == []  # every contrast on one grid: nothing to say
    partial = build_slice_dataset(slab["slab"], ["T1", "T2"], "FLAIR", (240, 240), progress=False, **HEADER)
    kept = [partial[i] for i in range(len(partial))]
    # the FLAIR's 50 slices are the first 50 of the (RAS, inferior first) preprocessed volume
    assert kept and max(item["slice_index"] for item in kept) < 50
    assert len(partial) == sum(intact[i]["slice_index"] < 50 for i in range(len(intact)))
    for item in kept:  # no slice pairs brain in the inputs with a zero-filled target
        inside = item["mask"][0] > 0
        assert float((item["target"][0][inside] > 0).float().mean()) > 0.9, item["slice_index"]
    (message,) = _warnings(caplog)
    assert message.startswith("slab-01: 30 of the 80 slices holding foreground dropped for lack of coverage")
    assert "FLAIR (the target) does not cover the foreground of 30 of them" in message


def test_3d_patches_lie_in_the_slices_the_target_covers(slab):
    patches = patch_dataset(
        discover_cases(slab["slab"]).cases, ["T1", "T2"], "FLAIR", (240, 240), patch_size=(32, 32, 32),
        samples_per_volume=40, progress=False, **HEADER,
    )
    (low, high) = patches.slices.foreground_box(0)[2]
    assert 0 <= low <= high < 50 and high - low + 1 >= 32  # the FLAIR's 50 slices hold a 32-slice patch
    last_slices = set()
    for index in range(len(patches)):
        last = int(patches[index]["patch_origin"][2]) + 31
        assert last < 50, last  # no patch reaches the zero-filled FLAIR slices
        last_slices.add(last)
    assert len(last_slices) > 5  # positions still vary


def test_evaluation_measures_only_the_voxels_every_contrast_covers(tmp_path, caplog):
    """A FLAIR (the target) of 150 of the grid's 240 columns, cutting the brain: the evaluation mask is the intact
    case's mask where the FLAIR has data, and the evaluation says how many voxels it left out."""
    caplog.set_level(logging.WARNING, TRANSFORMS_LOGGER)
    whole = slice(None)
    intact = _case(tmp_path / "intact", "intact-01", slice(60, 100), {})
    cut = _case(tmp_path / "cut", "cut-01", slice(60, 100), {"FLAIR": (slice(0, 150), whole, whole)})
    measured = {
        name: volume_dataset(discover_cases(folder).cases, ["T1", "T2"], "FLAIR", (240, 240), **HEADER)[0]
        for name, folder in (("intact", intact), ("cut", cut))
    }
    covered = _covered(measured["cut"]["mask"], cut / "cut-01-t2f.nii.gz")
    before = measured["intact"]["mask"][0] > 0
    after = measured["cut"]["mask"][0] > 0
    assert 0.5 < float((before & covered).sum() / before.sum()) < 0.95  # the cut takes part of the brain
    assert torch.equal(after, before & covered)
    left_out = int((before & ~covered).sum())
    (message,) = _warnings(caplog)
    assert message.startswith(f"cut-01: the mask keeps the {int(after.sum())} of its {int(before.sum())} voxels")
    assert f"{left_out} left out (outside the field of view of FLAIR (the target), which covers" in message
    # the one-call inference items with a target (the demo's, the robustness sweep's) are measured the same way
    measured_items = build_inference_dataset(cut, ["T1", "T2"], (240, 240), target="FLAIR", **HEADER)
    assert torch.equal(measured_items[0]["mask"], measured["cut"]["mask"])


def test_inference_warns_about_an_input_covering_part_of_the_head(tmp_path, caplog):
    """A T1 of 160 of the reference T2's 240 rows (67 % of the slice area): synthesized, with a warning naming the
    case, the input and the share of the head it covers; the intact case gets none."""
    caplog.set_level(logging.WARNING, TRANSFORMS_LOGGER)
    whole = slice(None)
    intact = _case(tmp_path / "intact", "intact-01", slice(60, 100), {})
    build_inference_dataset(intact, ["T1", "T2"], (240, 240), **HEADER)[0]
    assert _warnings(caplog) == []
    cut = _case(tmp_path / "cut", "cut-01", slice(60, 100), {"T1": (whole, slice(0, 160), whole)})
    item = build_inference_dataset(cut, ["T1", "T2"], (240, 240), **HEADER)[0]
    mask = item["mask"][0] > 0
    share = float((mask & _covered(item["image"], cut / "cut-01-t1n.nii.gz")).sum() / mask.sum())
    assert share < 0.9
    (message,) = _warnings(caplog)
    assert message.startswith(f"cut-01: T1 covers only {100 * share:.0f}% of the head/brain on the reference grid")
    assert "the synthesis outside its field of view is extrapolation" in message


def test_a_label_map_that_does_not_cover_the_brain_is_refused_with_its_file(tmp_path):
    """The shipped TCGA case's tumour label (an expert fusion on the images' grid) cut to its first 86 of 155 axial
    slices, through the tumour: where it does not reach, "no tumour" would be scored as drawn. The whole label
    passes, and so does one cropped around the tumour (labelling nothing on its grid's faces)."""
    case = DATA / "tcga-lgg" / "TCGA-FG-6692"
    files = {"T1": "OtherEXampleFromTCIA_t1_bet.nii.gz", "T2": "OtherEXampleFromTCIA_t2_bet.nii.gz",
             "FLAIR": "OtherEXampleFromTCIA_fla_bet.nii.gz"}
    cut = tmp_path / "mav-cut.nii.gz"
    nib.save(nib.load(case / "mav.nii.gz").slicer[:, :, :86], cut)
    item = {"case_id": "TCGA-FG-6692", **{c: str(case / f) for c, f in files.items()}}
    chain = dict(labels=("seg",), **HEADER)
    whole = build_volume_dataset([{**item, "seg": str(case / "mav.nii.gz")}],
                                 preprocessing_transforms(["T1", "T2"], "FLAIR", (240, 240), **chain))[0]
    assert int((whole["seg"] > 0).sum()) > 0
    for coverage in ("slices", "voxels", "warn"):
        chain_cut = preprocessing_transforms(["T1", "T2"], "FLAIR", (240, 240), coverage=coverage, **chain)
        with pytest.raises(RuntimeError) as refused:  # (MONAI's Compose wraps what a transform raises)
            build_volume_dataset([{**item, "seg": str(cut)}], chain_cut)[0]
        reason = failure_reason(refused.value)
        assert reason.startswith(f"{cut}: the label map covers only "), reason
        assert "labels the edge of its own field of view" in reason
        share = int(reason.split("covers only ")[1].split("%")[0])
        assert 40 <= share <= 75, share  # 86 of 155 slices, the brain not centred in them

    # the label drawn on a grid cropped around all it labels (a margin of 2 voxels): whole, so it is taken, and it
    # labels on the images' grid what the full label does
    labelled = np.nonzero(np.asarray(nib.load(case / "mav.nii.gz").dataobj))
    box = tuple(slice(max(int(axis.min()) - 2, 0), int(axis.max()) + 3) for axis in labelled)
    cropped = tmp_path / "mav-cropped.nii.gz"
    nib.save(nib.load(case / "mav.nii.gz").slicer[box], cropped)
    assert all(s.stop - s.start < n for s, n in zip(box, nib.load(case / "mav.nii.gz").shape))
    taken = build_volume_dataset([{**item, "seg": str(cropped)}],
                                 preprocessing_transforms(["T1", "T2"], "FLAIR", (240, 240), **chain))[0]
    assert torch.equal(torch.as_tensor(taken["seg"]), torch.as_tensor(whole["seg"]))


def test_3d_validation_measures_only_the_slices_the_target_covers(slab):
    """The 3D bundle validates whole volumes; its postprocessing (``CropToMaskSlabd``) cuts prediction and target to
    the mask's slices, so the zero-filled FLAIR slices of a partly covered case are not scored."""
    from agi_monai.engines import CropToMaskSlabd

    whole = patch_dataset(
        discover_cases(slab["slab"]).cases, ["T1", "T2"], "FLAIR", (240, 240), patch_size=None, progress=False,
        **HEADER,
    )[0]
    assert whole["target"].shape[-1] == 80
    covered = _covered(whole["target"], slab["slab"] / "slab-01-t2f.nii.gz").reshape(-1, 80).all(dim=0)
    assert int(covered.sum()) == 50 and not covered[50:].any()  # the preprocessed grid's first 50 slices
    item = {"pred": whole["image"][:1], "label": whole["target"], "mask": whole["mask"]}
    measured = CropToMaskSlabd(["pred", "label"])(item)
    brain = torch.nonzero((whole["mask"][0] > 0).reshape(-1, 80).any(dim=0)).flatten()
    first, last = int(brain[0]), int(brain[-1])
    assert last < 50 and measured["label"].shape == measured["pred"].shape == (1, 240, 240, last - first + 1)
    torch.testing.assert_close(measured["label"], whole["target"][..., first : last + 1])
    # a mask on fewer slices than SSIM's window is widened inside the volume; an empty one leaves the volume whole
    thin = torch.zeros_like(whole["mask"])
    thin[..., 78] = whole["mask"][..., 30]
    assert CropToMaskSlabd(["label"])({"label": whole["target"], "mask": thin})["label"].shape[-1] == 11
    empty = CropToMaskSlabd(["label"])({"label": whole["target"], "mask": torch.zeros_like(whole["mask"])})
    assert empty["label"].shape[-1] == 80


@pytest.mark.parametrize("shift_mm", [None, 300.0], ids=["identity affine", "moved 30 cm"])
def test_a_label_map_whose_header_places_it_off_the_images_is_refused(tmp_path, shift_mm):
    """The shipped TCGA tumour label saved with an identity affine (as a tool that drops the header writes it), or
    moved 30 cm: resampled onto the images, its labels vanished and the case was scored as one without tumour."""
    case = DATA / "tcga-lgg" / "TCGA-FG-6692"
    label = nib.load(case / "mav.nii.gz")
    affine = np.eye(4) if shift_mm is None else label.affine.copy()
    if shift_mm is not None:
        affine[0, 3] += shift_mm
    moved = tmp_path / "mav-moved.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), affine), moved)
    item = {"case_id": "TCGA-FG-6692", "T1": str(case / "OtherEXampleFromTCIA_t1_bet.nii.gz"),
            "T2": str(case / "OtherEXampleFromTCIA_t2_bet.nii.gz"), "seg": str(moved)}
    chain = preprocessing_transforms(["T1", "T2"], None, (240, 240), labels=("seg",), **HEADER)
    with pytest.raises(RuntimeError) as refused:  # (MONAI's Compose wraps what a transform raises)
        build_volume_dataset([item], chain)[0]
    reason = failure_reason(refused.value)
    assert reason.startswith(f"{moved}: labels ") and " mm³, of which 0 mm³ fall on the grid of " in reason, reason
    assert reason.endswith("(expected a label map on its case's images (the header geometry of the images it was "
                           "drawn on))"), reason
