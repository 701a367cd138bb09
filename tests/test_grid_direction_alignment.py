"""A contrast whose header shares the reference's size, spacing and origin but not its axis directions is on another
grid: it must be resampled onto the reference's, not taken as it is stored.

The shipped BraTS-GLI T1 is saved with its two in-plane axes swapped (array transposed, affine columns swapped): the
same image in the world, 240 x 240 x 155 at 1 mm with the same corner voxel, so only the direction matrix tells the
two grids apart. Taken as on the reference's grid, the T1 channel would come out transposed against the T2 and the
target.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from agi_monai.data import build_volume_dataset, preprocessing_transforms, same_grid
from helpers import DATA

CASE = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
FILES = {c: CASE / f"BraTS-GLI-00001-000-{t}.nii.gz" for c, t in (("T1", "t1n"), ("T2", "t2w"), ("FLAIR", "t2f"))}


def test_a_contrast_with_its_in_plane_axes_swapped_is_resampled_not_taken_as_stored(tmp_path):
    original = nib.load(FILES["T1"])
    affine = original.affine.copy()
    affine[:, [0, 1]] = affine[:, [1, 0]]  # voxel (j, i, k) of the new file is voxel (i, j, k) of the original
    swapped = tmp_path / "t1-swapped.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(original.get_fdata(dtype=np.float32).transpose(1, 0, 2)), affine),
             swapped)
    first, second = sitk.ReadImage(str(swapped)), sitk.ReadImage(str(FILES["T2"]))
    assert first.GetSize() == second.GetSize() and first.GetSpacing() == second.GetSpacing()
    np.testing.assert_allclose(first.GetOrigin(), second.GetOrigin(), atol=1e-4)
    assert not same_grid(first, second)  # the directions differ: x and y swapped

    chain = preprocessing_transforms(["T1", "T2"], "FLAIR", (240, 240), reference="T2", registration="header")
    case = {"case_id": "c", **{k: str(v) for k, v in FILES.items()}}
    shipped = build_volume_dataset([case], chain)[0]
    stored = build_volume_dataset([{**case, "T1": str(swapped)}], chain)[0]
    # every voxel centre of the swapped file is one of the T2 grid's: resampling it by the header only reorders them
    torch.testing.assert_close(torch.as_tensor(stored["image"]), torch.as_tensor(shipped["image"]), rtol=0, atol=1e-6)
