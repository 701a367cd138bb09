"""Two outcomes of the bundles' ``FolderSynthesis`` (``inference.json``'s evaluator) that no test pinned:

- an output whose name is one of the case's own input files is refused, and the file left as it was, also when the
  output folder reaches it through a link (the paths are compared resolved): a segmentation's ``<case>_seg.nii.gz``
  written into the folder that holds the case's ground-truth ``<case>_seg.nii.gz`` would replace the label map (a
  segmentation's outputs are not checked for a synthesis' mark, so this check is all that protects it);
- with ``exit_on_failure`` (``python -m monai.bundle run``), a run that had no case at all (an empty or wrong input
  folder) ends with exit status 1, as one whose cases failed does: a scheduler must not read it as success.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset
from monai.inferers import SimpleInferer

from agi_monai.bundle import FolderSynthesis


class FirstChannel(torch.nn.Module):
    def forward(self, x):
        return x[:, :1]


def test_an_output_that_is_the_cases_own_input_file_is_refused_and_left_as_it_was(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    label = labels / "P01_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(8, dtype=np.uint8).reshape(2, 2, 2), np.eye(4)), label)
    before = label.read_bytes()
    (tmp_path / "linked").symlink_to(labels)  # the output folder, named otherwise
    written = []
    cases = [{"case_id": "P01", "image": torch.rand(4, 8, 8, 4), "seg": str(label)},
             {"case_id": "P02", "image": torch.rand(4, 8, 8, 4)}]
    summary = FolderSynthesis(Dataset(cases), FirstChannel(), SimpleInferer(),
                              lambda item: written.append(item["case_id"]), tmp_path / "linked", "seg",
                              task="segmentation", progress=False)()
    assert written == ["P02"] and summary.written == [tmp_path / "linked" / "P02_seg.nii.gz"]
    assert [(f.case_id, f.reason) for f in summary.failures] == [(
        "P01", f"its output {tmp_path / 'linked' / 'P01_seg.nii.gz'} would be its seg input file: expected another "
               "--output_dir (it is left as it was)",
    )]
    assert label.read_bytes() == before


@pytest.mark.parametrize("exit_on_failure", [True, False])
def test_a_run_without_any_case_fails_when_asked_to_say_so(tmp_path, exit_on_failure, capsys):
    synthesis = FolderSynthesis(Dataset([]), FirstChannel(), SimpleInferer(), lambda item: None, tmp_path, "FLAIR",
                                progress=False, exit_on_failure=exit_on_failure)
    if exit_on_failure:
        with pytest.raises(SystemExit) as stopped:
            synthesis()
        assert stopped.value.code == 1
    else:  # (agi-monai synthesize sets its own exit status)
        assert synthesis().cases == 0
    assert capsys.readouterr().out.splitlines() == [f"synthesized 0 of 0 cases into {tmp_path}, 0 failed"]
